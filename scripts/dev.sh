#!/usr/bin/env bash
# Runs the tracker on this machine: one tracker-api and one tracker-reaper in
# the foreground against the local Redis and PostgreSQL.
#
# - installs Redis/PostgreSQL with apt if missing, starts them if stopped
#   (scripts/services.sh), and creates the database `tracker_dev`;
# - builds both binaries; the reaper applies the migrations at start;
# - TRACKER_ELECTION=redis, TRACKER_PLATFORM=none (no Kubernetes), auth disabled;
# - Ctrl-C stops both.
#
# Usage: scripts/dev.sh            (API on :8080, reaper metrics on :9090)
# Any TRACKER_* variable already set wins over the defaults below.
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
export TRACKER_PLATFORM="${TRACKER_PLATFORM:-none}"
export RUST_LOG="${RUST_LOG:-info}"

cargo build -p tracker-api -p tracker-reaper
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

cat <<MSG

  tracker is running: API $api, reaper metrics http://127.0.0.1:9090/metrics
  (auth disabled, no Kubernetes: hibernation is decided and recorded, not performed)

  Try:
    curl -s -X POST $api/v1/sessions/demo/connections -H 'content-type: application/json' \\
         -d '{"protocol":"vnc","user_id":"alice","client_ip":"10.0.0.7"}'
    curl -s -X POST $api/v1/sessions/demo/connections/<connection_id>/heartbeat
    curl -s $api/v1/sessions/demo/connections
    curl -s $api/v1/sessions/demo
    curl -s $api/v1/stats
    curl -s -X DELETE $api/v1/sessions/demo/connections/<connection_id>
    curl -s $api/v1/sessions/demo/history
    websocat ${api/http/ws}/v1/sessions/demo/ws      # a tracked WebSocket

  Ctrl-C stops both.

MSG

# Exit as soon as either process does, taking the other down with it.
wait -n
