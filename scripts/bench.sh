#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, measured in one run on this machine.
#
# - store level (tracker-core bench: heartbeats, memory per connection, sweep
#   cost), next to redis-benchmark on its own private redis-server;
# - API level: single HTTP heartbeats driven by wrk next to a do-nothing axum
#   handler driven the same way, redis-benchmark ZADD, and pgbench running the
#   original design's per-heartbeat UPDATE; batch heartbeats (loadgen) next to
#   pipelined ZADD; 10,000 WebSockets on one replica (loadgen);
# - reaper: archive throughput and wake latency (its ignored bench tests),
#   and what an idle reaper costs (Redis calls/s counted with MONITOR, CPU
#   from /proc).
#
# The API and the idle reaper run against a private redis-server, so that
# INFO commandstats and MONITOR see nothing but them.
#
# Needs: Redis and PostgreSQL (scripts/services.sh), wrk, redis-benchmark,
# pgbench (apt-get install -y wrk redis-tools postgresql-contrib if missing).
# Every load is bounded in time and stays on 127.0.0.1.
#
# Usage: scripts/bench.sh [--quick] [--only store|idle|api|reaper]
#        (output: a report on stdout; --only runs one part; API_BIN=<path>
#        measures another tracker-api build, e.g. an older commit's)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
QUICK=""; DUR=10; ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK="--quick"; DUR=3 ;;
    --only) ONLY="$2"; shift ;;
    *) echo "bench: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [[ -z "$ONLY" || "$ONLY" == "$1" ]]; }

for tool in wrk redis-benchmark pgbench python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install -y wrk redis-tools postgresql-contrib)" >&2; exit 1; }
done
bash scripts/services.sh >/dev/null

WORK="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "# tracker benchmarks — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)"
echo
if want store; then
echo "## store (cargo bench -p tracker-core --bench store -- $QUICK)"
cargo bench -q -p tracker-core --bench store -- $QUICK | grep -v '^#'
fi

if want api; then cargo build -q --release -p tracker-api --bin tracker-api --bench loadgen; fi
if want idle; then cargo build -q --release -p tracker-reaper --bin tracker-reaper; fi

RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
pids+=($!)
RCLI=(redis-cli -p "$RPORT")
for _ in $(seq 50); do [[ "$("${RCLI[@]}" ping 2>/dev/null)" == PONG ]] && break; sleep 0.1; done
# CPU seconds a process used so far (utime + stime).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
# usec and calls of one command since the last CONFIG RESETSTAT: "usec calls".
cmdstat() { "${RCLI[@]}" info commandstats | awk -F'[:,=]' -v c="cmdstat_$1" '$1 == c {print $5, $3}'; }
TARGET="${CARGO_TARGET_DIR:-target}"
LOADGEN=$(find "$TARGET"/release/deps -maxdepth 1 -type f -executable -name 'loadgen-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)

# At least 32 bytes: shorter HS256 secrets are refused at start.
SECRET=bench-secret-bench-secret-bench-secret
token() { # role -> an HS256 token of user "bench" with that role, valid for an hour
python3 - "$SECRET" "$1" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "roles": [sys.argv[2]], "exp": int(time.time()) + 3600}).encode())
sig = b64(hmac.new(sys.argv[1].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
}
TOKEN=$(token service)
# A plain user: its heartbeats must come from the sessions' owner.
USER_TOKEN=$(token user)

API=127.0.0.1:18080; NOOP=127.0.0.1:18099
# One service user holds every connection: the per-user and per-session limits are off.
if want idle; then
echo
echo "## idle reaper (leader, nothing to do; private redis-server, 32 shards, standalone)"
psql -qh 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS trk_bench_reaper' -c 'CREATE DATABASE trk_bench_reaper' >/dev/null
TRACKER_REDIS_URL="redis://127.0.0.1:$RPORT" TRACKER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/trk_bench_reaper \
  TRACKER_ELECTION=redis TRACKER_PLATFORM=none TRACKER_METRICS_LISTEN=127.0.0.1:0 TRACKER_KEY_PREFIX="idle-$$" RUST_LOG=warn \
  TRACKER_HEARTBEAT_WINDOW=2s \
  "$TARGET"/release/tracker-reaper >"$WORK/reaper.log" 2>&1 &
pids+=($!); REAPER_PID=$!
# Leadership and the first passes settle within a few seconds, and the
# hibernator's guard (one heartbeat window, 2 s here) is over: steady state.
sleep 5
IDLE_S=10
cpu0=$(cpu_s "$REAPER_PID")
timeout "$IDLE_S" "${RCLI[@]}" monitor >"$WORK/monitor.out" 2>/dev/null || true
cpu1=$(cpu_s "$REAPER_PID")
# Commands issued by clients; those run inside scripts show as [... lua].
calls=$(grep -vc ' lua\]' "$WORK/monitor.out" || true)
echo "redis calls:  $(python3 -c "print(f'{($calls - 1) / $IDLE_S:.1f}')") /s   (MONITOR over ${IDLE_S}s)"
echo "by command:   $(grep -v ' lua\]' "$WORK/monitor.out" | awk 'NR > 1 {print tolower($4)}' | sort | uniq -c | sort -rn | awk '{printf "%s %s, ", $2, $1}')"
# The first key of each call names what it reads (due, epoch, outbox, ...).
echo "by key:       $(grep -v ' lua\]' "$WORK/monitor.out" | awk 'NR > 1 && NF >= 5 {k = (tolower($4) ~ /eval/ ? $7 : $5); gsub(/"/, "", k); n = split(k, p, ":"); print tolower($4) " " p[n]}' | sort | uniq -c | sort -rn | awk '{printf "%s %s %s, ", $2, $3, $1}')"
echo "cpu:          $(python3 -c "print(f'{100 * ($cpu1 - $cpu0) / $IDLE_S:.2f}')") % of a core"
kill "$REAPER_PID" 2>/dev/null || true
wait "$REAPER_PID" 2>/dev/null || true
psql -qh 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE trk_bench_reaper' >/dev/null
fi

if want api; then

# Platform none: the sessions are declared (PUT), so that they have an owner.
TRACKER_REDIS_URL="redis://127.0.0.1:$RPORT" TRACKER_PLATFORM=none \
TRACKER_JWT_SECRET=$SECRET TRACKER_LISTEN=$API TRACKER_KEY_PREFIX="bench-$$" RUST_LOG=warn \
  TRACKER_MAX_CONNECTIONS_PER_SESSION=0 TRACKER_MAX_CONNECTIONS_PER_USER=0 \
  "${API_BIN:-$TARGET/release/tracker-api}" >"$WORK/api.log" 2>&1 &
pids+=($!); API_PID=$!
"$LOADGEN" noop --listen $NOOP --duration 600s >/dev/null &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$API/readyz" >/dev/null && break; sleep 0.1; done

# 1,000 registered connections on 200 sessions of user "bench", whose
# heartbeat paths wrk cycles through.
python3 - "$API" "$TOKEN" >"$WORK/paths" <<'PY'
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1])
for i in range(200):
    conn.request("PUT", f"/v1/sessions/bench-{i}", json.dumps({"user": "bench", "state": "running", "idle_timeout": ""}),
                 {"authorization": f"Bearer {sys.argv[2]}", "content-type": "application/json"})
    assert conn.getresponse().read() is not None
for i in range(1000):
    sid = f"bench-{i % 200}"
    conn.request("POST", f"/v1/sessions/{sid}/connections", json.dumps({"protocol": "http", "user_id": "bench"}),
                 {"authorization": f"Bearer {sys.argv[2]}", "content-type": "application/json"})
    cid = json.loads(conn.getresponse().read())["connection"]["connection_id"]
    print(f"/v1/sessions/{sid}/connections/{cid}/heartbeat")
PY
cat >"$WORK/hb.lua" <<'LUA'
local paths, i = {}, 0
for line in io.lines(os.getenv("HB_PATHS")) do paths[#paths + 1] = line end
local headers = { ["Authorization"] = "Bearer " .. os.getenv("HB_TOKEN"), ["Content-Length"] = "0" }
request = function()
  i = i + 1
  return wrk.format("POST", paths[(i % #paths) + 1], headers)
end
LUA
wrk_rate() { # url [token] -> "rps p50 p99"
  HB_PATHS="$WORK/paths" HB_TOKEN="${2:-$TOKEN}" wrk -t2 -c50 -d"${DUR}s" --latency -s "$WORK/hb.lua" "$1" >"$WORK/wrk.out"
  awk '/Requests\/sec/ {r=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$NF} END {printf "%s req/s  p50 %s  p99 %s%s\n", r, p50, p99, (bad ? "  NON-2xx: " bad : "")}' "$WORK/wrk.out"
}
rb() { redis-benchmark -p "$RPORT" -n "$1" --csv "${@:2}" | awk -F'"' '$2 != "test" {print $4; exit}'; }

echo
echo "## API, single heartbeats (wrk -t2 -c50 -d${DUR}s, service token, metrics on)"
"${RCLI[@]}" config resetstat >/dev/null
cpu0=$(cpu_s "$API_PID")
echo "tracker-api heartbeat:         $(wrk_rate "http://$API")"
cpu1=$(cpu_s "$API_PID")
read -r hb_usec hb_calls <<<"$(cmdstat evalsha)"
read -r zi_usec zi_calls <<<"$(cmdstat zadd)"
hb_n=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
echo "  API cpu per heartbeat:       $(python3 -c "print(f'{1e6 * ($cpu1 - $cpu0) / $hb_n:.1f}')") us"
echo "  redis time per heartbeat:    $(python3 -c "print(f'{$hb_usec / $hb_n:.2f}')") us ($(python3 -c "print(f'{$hb_n / max($hb_calls, 1):.1f}')") heartbeats a script call; the ZADD inside: $(python3 -c "print(f'{$zi_usec / max($zi_calls, 1):.2f}')") us)"
"${RCLI[@]}" config resetstat >/dev/null
cpu0=$(cpu_s "$API_PID")
echo "the same, user token:          $(wrk_rate "http://$API" "$USER_TOKEN")"
cpu1=$(cpu_s "$API_PID")
read -r u_usec u_calls <<<"$(cmdstat evalsha)"
u_n=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
echo "  API cpu per heartbeat:       $(python3 -c "print(f'{1e6 * ($cpu1 - $cpu0) / $u_n:.1f}')") us"
echo "  redis time per heartbeat:    $(python3 -c "print(f'{$u_usec / $u_n:.2f}')") us ($(python3 -c "print(f'{$u_calls / $u_n:.2f}')") script calls a heartbeat)"
echo "do-nothing axum handler:       $(wrk_rate "http://$NOOP")"
"${RCLI[@]}" config resetstat >/dev/null
echo "redis-benchmark -t zadd -c 50: $(rb 300000 -t zadd -c 50) req/s"
read -r z_usec z_calls <<<"$(cmdstat zadd)"
echo "  redis time per ZADD:         $(python3 -c "print(f'{$z_usec / $z_calls:.2f}')") us"

# The original design: one UPDATE per heartbeat on a 100,000-row table, 50 clients, prepared.
psql -qh 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS trk_bench' -c 'CREATE DATABASE trk_bench' >/dev/null
psql -qh 127.0.0.1 -U postgres -d trk_bench >/dev/null <<'SQL'
CREATE TABLE connections (id bigint PRIMARY KEY, last_heartbeat timestamptz NOT NULL DEFAULT now());
INSERT INTO connections SELECT g FROM generate_series(1, 100000) g;
VACUUM ANALYZE connections;
SQL
printf '\\set id random(1, 100000)\nUPDATE connections SET last_heartbeat = now() WHERE id = :id;\n' >"$WORK/hb.sql"
echo "pgbench per-heartbeat UPDATE:  $(pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 50 -j 2 -T "$DUR" -f "$WORK/hb.sql" trk_bench 2>/dev/null | awk '/^tps/ {print $3 " tps"}')"
psql -qh 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE trk_bench' >/dev/null

echo
echo "## API, batch heartbeats (loadgen, 1,000 pairs a request, 4 in flight)"
"$LOADGEN" batch --url "http://$API" --secret $SECRET --connections 10000 --batch 1000 --concurrency 4 --duration "${DUR}s" | tail -2
echo "redis-benchmark -t zadd -c 50 -P 16: $(rb 3000000 -t zadd -c 50 -P 16) req/s"

echo
echo "## API, 10,000 WebSockets on one replica (loadgen ws)"
"$LOADGEN" ws --url "http://$API" --secret $SECRET --sockets 10000 --server-pid "$API_PID" --concurrency 50 --duration "${DUR}s" | tail -4
fi

want reaper || exit 0
echo
echo "## reaper (cargo test -p tracker-reaper --release --test it -- --ignored bench_)"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" \
  cargo test -q -p tracker-reaper --release --test it -- --ignored bench_ --nocapture --test-threads 1 2>/dev/null |
  grep -Ei 'rows/s|latency|p50|p99' || true
