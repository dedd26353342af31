{{/*
Names and labels shared by every template.
*/}}

{{- define "tracker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name: the release name, with the chart name unless it already contains it. */}}
{{- define "tracker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tracker.api.fullname" -}}
{{- printf "%s-api" (include "tracker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tracker.reaper.fullname" -}}
{{- printf "%s-reaper" (include "tracker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tracker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tracker.labels" -}}
helm.sh/chart: {{ include "tracker.chart" . }}
app.kubernetes.io/name: {{ include "tracker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tracker
{{- end }}

{{- define "tracker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tracker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tracker.api.selectorLabels" -}}
{{ include "tracker.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "tracker.reaper.selectorLabels" -}}
{{ include "tracker.selectorLabels" . }}
app.kubernetes.io/component: reaper
{{- end }}

{{- define "tracker.api.labels" -}}
{{ include "tracker.labels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "tracker.reaper.labels" -}}
{{ include "tracker.labels" . }}
app.kubernetes.io/component: reaper
{{- end }}

{{- define "tracker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the Secret holding TRACKER_JWT_SECRET, TRACKER_DATABASE_URL (and maybe TRACKER_REDIS_URL, TRACKER_NATS_URL, the JWT public key). */}}
{{- define "tracker.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else }}
{{- include "tracker.fullname" . }}
{{- end }}
{{- end }}

{{/* Namespace of the Session resources and the Lease. */}}
{{- define "tracker.watchNamespace" -}}
{{- default .Release.Namespace .Values.reaper.namespace }}
{{- end }}

{{/*
Environment both processes share. One definition, so TRACKER_REDIS_SHARDS
(part of the data layout), the heartbeat window, the platform and the
session defaults cannot differ between the API and the reaper.
*/}}
{{- define "tracker.commonEnv" -}}
- name: TRACKER_REDIS_URL
{{- if .Values.redis.urlFromSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tracker.secretName" . }}
      key: {{ .Values.secret.keys.redisUrl }}
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
- name: TRACKER_REDIS_MODE
  value: {{ .Values.redis.mode | quote }}
- name: TRACKER_KEY_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
- name: TRACKER_REDIS_SHARDS
  value: {{ .Values.redis.shards | int | quote }}
- name: TRACKER_REDIS_TIMEOUT
  value: {{ .Values.redis.timeout | quote }}
- name: TRACKER_CONNECTION_ID_RETENTION
  value: {{ .Values.redis.connectionIdRetention | quote }}
- name: TRACKER_PLATFORM
  value: {{ .Values.platform | quote }}
- name: TRACKER_DEFAULT_IDLE_TIMEOUT
  value: {{ .Values.sessions.defaultIdleTimeout | quote }}
- name: TRACKER_WARN_BEFORE
  value: {{ .Values.sessions.warnBefore | quote }}
- name: TRACKER_HEARTBEAT_WINDOW
  value: {{ .Values.heartbeat.window | quote }}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
- name: TRACKER_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end }}

{{/* Preferred spreading of one component's pods over nodes. */}}
{{- define "tracker.topologySpread" -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- .selector | nindent 6 }}
{{- end }}

{{/*
Values the chart refuses, with a message naming the value. Settings that
moved fail instead of being silently ignored: the API and the reaper would
then disagree.
*/}}
{{- define "tracker.checkValues" -}}
{{- if hasKey .Values.reaper "platform" }}
{{- fail "reaper.platform moved to platform: the API and the reaper read TRACKER_PLATFORM, and get this one value" }}
{{- end }}
{{- if hasKey .Values.reaper "defaultIdleTimeout" }}
{{- fail "reaper.defaultIdleTimeout moved to sessions.defaultIdleTimeout: the API and the reaper read TRACKER_DEFAULT_IDLE_TIMEOUT, and get this one value" }}
{{- end }}
{{- if not (has .Values.platform (list "kubernetes" "docker" "none")) }}
{{- fail (printf "platform must be kubernetes, docker or none, not %q" (toString .Values.platform)) }}
{{- end }}
{{- if and (eq .Values.platform "docker") (not .Values.nats.url) .Values.secret.create (not .Values.secret.existingSecret) (not .Values.secret.natsUrl) }}
{{- fail "platform docker needs a NATS URL: set nats.url, or secret.natsUrl for a URL with credentials" }}
{{- end }}
{{- if and .Values.api.jwt.publicKeyFromSecret .Values.secret.create (not .Values.secret.existingSecret) (not .Values.secret.jwtPublicKey) }}
{{- fail "api.jwt.publicKeyFromSecret needs secret.jwtPublicKey (a PEM public key), or secret.existingSecret holding it" }}
{{- end }}
{{- end }}
