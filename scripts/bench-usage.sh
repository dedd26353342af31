#!/usr/bin/env bash
# Usage query benchmark: builds its own database, fills connection_history
# with ROWS generated rows (USERS users, SESSIONS sessions, over MONTHS
# months), refreshes the daily rollup the way the reaper does, then runs the
# SQL that GET /v1/usage runs (crates/tracker-api/src/routes/usage.sql, as a
# prepared statement) RUNS times per case and prints p50/p95/max in ms.
#
#   scripts/bench-usage.sh                    # 10 million rows
#   ROWS=1000000 scripts/bench-usage.sh       # quicker
#   KEEP=1 scripts/bench-usage.sh             # keep the database afterwards
#   REUSE=1 scripts/bench-usage.sh            # query an existing database only
#
# PG* variables choose the server (default 127.0.0.1:5432, user postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
DB=${BENCH_DB:-tracker_bench_usage}
ROWS=${ROWS:-10000000}
USERS=${USERS:-10000}
SESSIONS=${SESSIONS:-50000}
MONTHS=${MONTHS:-12}
RUNS=${RUNS:-50}
CHUNK=1000000
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
now() { date +%s; }

if [[ "${REUSE:-0}" != 1 ]]; then
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
  echo "database $DB: $ROWS rows, $USERS users, $SESSIONS sessions, $MONTHS months"
  # The rows are loaded into the history as it was before partitioning, and
  # the later migrations then run over them as they would on an upgrade:
  # their timings are printed too.
  for m in migrations/000[1-3]_*.sql; do psql_db -1 -f "$m"; done
  psql_db -c "DROP INDEX connection_history_session_time, connection_history_user_time, connection_history_session_uid_idx"
  t0=$(now)
  # A session belongs to one user (SESSIONS / USERS each); durations are 1 min
  # to 4 h, skewed short; ends spread evenly over the months.
  for ((done = 0; done < ROWS; done += CHUNK)); do
    n=$(( ROWS - done < CHUNK ? ROWS - done : CHUNK ))
    psql_db <<SQL
INSERT INTO connection_history (connection_id, session_id, user_id, protocol, client_ip,
    user_agent, connected_at, disconnected_at, last_heartbeat_at, end_reason, archived_at)
SELECT gen_random_uuid(), 'sess-' || (u * ($SESSIONS / $USERS) + s), 'user-' || u,
       (ARRAY['websocket', 'vnc', 'http'])[1 + (g % 3)], '10.0.0.1'::inet, 'bench',
       e - d, e, e - interval '10 seconds', CASE WHEN g % 5 = 0 THEN 'expired' ELSE 'closed' END, e
FROM (SELECT g, (random() * ($USERS - 1))::int AS u, (random() * ($SESSIONS / $USERS - 1))::int AS s,
             now() - random() * (interval '1 month' * $MONTHS - interval '1 day') AS e,
             make_interval(secs => 60 + random() * random() * 14340) AS d
      FROM generate_series(1, $n) g) x;
SQL
    echo "  $((done + n)) rows ($(( $(now) - t0 )) s)"
  done
  for m in migrations/*.sql; do
    case "$m" in migrations/000[1-3]_*) continue ;; esac
    t1=$(now)
    psql_db -1 -f "$m"
    echo "migration $(basename "$m") over the rows: $(( $(now) - t1 )) s"
  done
  psql_db -c "VACUUM ANALYZE"
  t1=$(now)
  # What the reaper's rollup upkeep does: one refresh per ended dirty day.
  psql_db -At -c "SELECT day FROM connection_usage_dirty WHERE day + interval '24 hours' <= now() ORDER BY day" |
    while read -r day; do echo "SELECT connection_usage_refresh('$day');"; done | psql_db -o /dev/null
  echo "rollup of $(psql_db -At -c "SELECT count(DISTINCT day) FROM connection_usage_daily") days refreshed in $(( $(now) - t1 )) s"
  psql_db -c "VACUUM ANALYZE connection_usage_daily"
fi

sql=$(cat crates/tracker-api/src/routes/usage.sql)
# Runs one case RUNS times as the API does (a prepared statement) and prints
# its percentiles from psql's own timing.
bench_case() {
  local name=$1 args=$2 runs=${3:-$RUNS}
  {
    # As the API sets them for the query (USAGE_SETTINGS in usage.rs).
    echo "SET plan_cache_mode = force_custom_plan; SET jit = off; SET work_mem = '64MB';"
    echo "PREPARE usage(timestamptz, timestamptz, text, text, boolean) AS $sql;"
    echo "EXECUTE usage($args);"  # warm-up, not counted
    echo '\timing on'
    for ((i = 0; i < runs; i++)); do echo "EXECUTE usage($args);"; done
  } | psql_db -o /dev/null 2>&1 | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | sort -n |
    awk -v name="$name" '{ v[NR] = $1 } END {
      p = v[int((NR - 1) * 0.50) + 1]; q = v[int((NR - 1) * 0.95) + 1];
      printf "%-44s n=%d p50=%.1f ms p95=%.1f ms max=%.1f ms\n", name, NR, p, q, v[NR] }'
}
rows=$(psql_db -At -c "SELECT count(*) FROM connection_history")
month=$(psql_db -At -c "SELECT to_char(date_trunc('month', now(), 'UTC') - interval '2 months', 'YYYY-MM')")
from="${month}-01T00:00:00Z"
to=$(psql_db -At -c "SELECT to_char(('${from}'::timestamptz AT TIME ZONE 'UTC' + interval '1 month'), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
echo "queries over $rows rows; month $from .. $to; $RUNS runs each"
bench_case "month by user" "'$from', '$to', 'user', NULL, true"
bench_case "month by user, unaligned (raw first/last day)" "'${month}-03T13:17:00Z', '${to%T*}T09:41:00Z', 'user', NULL, true"
bench_case "month of one user" "'$from', '$to', 'user', 'user-42', true"
bench_case "month by session, one user" "'$from', '$to', 'session', 'user-42', false"
bench_case "month by session" "'$from', '$to', 'session', NULL, true"
# The same month without the rollup, as plain SQL over the history would do it.
bench_case "month by user, history only (no rollup)" "'$from', '$to', 'user', NULL, false" 10
bench_case "year by user" "'$(date -u -d '-365 days' +%Y-%m-%dT00:00:00Z)', '$(date -u +%Y-%m-%dT00:00:00Z)', 'user', NULL, true"

# A few through the API itself (auth disabled on loopback): the same month,
# with the JSON of every row. API_BIN names the binary (default: the release
# build, if there is one).
API_BIN=${API_BIN:-target/release/tracker-api}
API_RUNS=${API_RUNS:-10}
if [[ -x "$API_BIN" ]]; then
  port=$(( 20000 + RANDOM % 10000 ))
  TRACKER_AUTH=disabled TRACKER_LISTEN=127.0.0.1:$port \
    TRACKER_DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB" \
    TRACKER_REDIS_URL=${TRACKER_REDIS_URL:-redis://127.0.0.1:6379} "$API_BIN" >/tmp/bench-usage-api.log 2>&1 &
  api=$!
  trap 'kill $api 2>/dev/null' EXIT
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
  url="http://127.0.0.1:$port/v1/usage?from=$from&to=$to&group_by=user"
  curl -sf "$url" -o /tmp/bench-usage-answer.json  # warm-up
  echo "through the API ($API_BIN): $(grep -o '"key"' /tmp/bench-usage-answer.json | wc -l) rows, $(wc -c </tmp/bench-usage-answer.json) bytes"
  for ((i = 0; i < API_RUNS; i++)); do curl -sf -o /dev/null -w '%{time_total}\n' "$url"; done | sort -n |
    awk '{ v[NR] = $1 * 1000 } END {
      printf "%-44s n=%d p50=%.1f ms p95=%.1f ms max=%.1f ms\n", "month by user, HTTP", NR,
        v[int((NR - 1) * 0.50) + 1], v[int((NR - 1) * 0.95) + 1], v[NR] }'
  kill $api
else
  echo "no API binary at $API_BIN: HTTP runs skipped (cargo build --release -p tracker-api)"
fi

if [[ "${KEEP:-0}" != 1 && "${REUSE:-0}" != 1 ]]; then
  psql -X -q -d postgres -c "DROP DATABASE $DB"
fi
