#!/usr/bin/env bash
# Runs the tracker on this machine, the whole loop without Kubernetes: one
# tracker-api and one tracker-reaper on the docker platform, NATS with
# JetStream, a demo session declared with a short idle timeout, and
# tracker-events printing the events a controller receives (and acting as a
# toy controller that reports each hibernate / wake as done).
#
# - installs Redis/PostgreSQL/NATS with apt if missing, starts them if stopped
#   (scripts/services.sh), and creates the database `tracker_dev`;
# - builds the binaries; the reaper applies the migrations at start;
# - TRACKER_ELECTION=redis, TRACKER_PLATFORM=docker, auth disabled;
# - Ctrl-C stops everything.
#
# Usage: scripts/dev.sh            (API on :8080, reaper metrics on :9090)
# Any TRACKER_* variable already set wins over the defaults below
# (TRACKER_PLATFORM=none runs without NATS; DEMO_IDLE_TIMEOUT=30s by default).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/services.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "dev.sh: cargo is missing; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

DB=tracker_dev
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname = '$DB'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $DB"
  echo "dev.sh: created database $DB"
fi

export TRACKER_REDIS_URL="${TRACKER_REDIS_URL:-redis://127.0.0.1:6379}"
export TRACKER_KEY_PREFIX="${TRACKER_KEY_PREFIX:-trk-dev}"
export TRACKER_DATABASE_URL="${TRACKER_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/$DB}"
export TRACKER_LISTEN="${TRACKER_LISTEN:-127.0.0.1:8080}"
export TRACKER_AUTH="${TRACKER_AUTH:-disabled}"
export TRACKER_ELECTION="${TRACKER_ELECTION:-redis}"
export TRACKER_PLATFORM="${TRACKER_PLATFORM:-docker}"
export TRACKER_NATS_URL="${TRACKER_NATS_URL:-nats://127.0.0.1:4222}"
export TRACKER_HEARTBEAT_WINDOW="${TRACKER_HEARTBEAT_WINDOW:-20s}"
export TRACKER_HEARTBEAT_INTERVAL="${TRACKER_HEARTBEAT_INTERVAL:-5s}"
export TRACKER_SWEEP_INTERVAL="${TRACKER_SWEEP_INTERVAL:-1s}"
export RUST_LOG="${RUST_LOG:-info}"
DEMO_IDLE_TIMEOUT="${DEMO_IDLE_TIMEOUT:-30s}"

cargo build -p tracker-api -p tracker-reaper --bins
BIN="${CARGO_TARGET_DIR:-target}/debug"

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT

TRACKER_METRICS_LISTEN="${TRACKER_REAPER_METRICS_LISTEN:-127.0.0.1:9090}" "$BIN/tracker-reaper" &
pids+=($!)
"$BIN/tracker-api" &
pids+=($!)

api="http://${TRACKER_LISTEN/0.0.0.0/127.0.0.1}"
for _ in $(seq 1 100); do
  curl -fsS "$api/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

if [[ "$TRACKER_PLATFORM" != kubernetes ]]; then
  if [[ "$TRACKER_PLATFORM" == docker ]]; then
    # What a docker controller would receive, as it happens; it also reports
    # each hibernate / wake as carried out, like a controller does.
    "$BIN/tracker-events" --nats-url "$TRACKER_NATS_URL" --controller "$api" &
    pids+=($!)
  fi
  # The demo session, as a controller declares it when it starts the container.
  curl -fsS -X PUT "$api/v1/sessions/demo" -H 'content-type: application/json' \
    -d "{\"user\":\"alice\",\"state\":\"running\",\"idle_timeout\":\"$DEMO_IDLE_TIMEOUT\"}" >/dev/null &&
    echo "dev.sh: declared session demo (user alice, idle timeout $DEMO_IDLE_TIMEOUT)"
fi

cat <<MSG

  tracker is running: API $api, reaper metrics http://127.0.0.1:9090/metrics
  (auth disabled, platform $TRACKER_PLATFORM, no Kubernetes; events on $TRACKER_NATS_URL)

  The loop (session "demo", idle timeout $DEMO_IDLE_TIMEOUT): connect, close, wait for the
  hibernate event below, connect again and see the wake event:
    c=\$(curl -s -X POST $api/v1/sessions/demo/connections -H 'content-type: application/json' \\
         -d '{"protocol":"vnc","user_id":"alice"}' | sed 's/.*"connection_id":"\([^"]*\)".*/\1/')
    curl -s -X DELETE $api/v1/sessions/demo/connections/\$c
    curl -s $api/v1/sessions/demo          # idle -> hibernating -> hibernated

  More:
    curl -s -X POST $api/v1/sessions/demo/connections -H 'content-type: application/json' \\
         -d '{"protocol":"vnc","user_id":"alice","client_ip":"10.0.0.7"}'
    curl -s -X POST $api/v1/sessions/demo/connections/<connection_id>/heartbeat
    curl -s $api/v1/sessions/demo/connections
    curl -s $api/v1/sessions/demo
    curl -s $api/v1/stats
    curl -s -X DELETE $api/v1/sessions/demo/connections/<connection_id>
    curl -s $api/v1/sessions/demo/history
    websocat ${api/http/ws}/v1/sessions/demo/ws      # a tracked WebSocket

  Ctrl-C stops everything.

MSG

# Exit as soon as either process does, taking the other down with it.
wait -n
