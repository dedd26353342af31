#!/usr/bin/env bash
# Throwaway 3-master Redis Cluster on loopback for the integration tests.
#
# Usage: scripts/redis-cluster.sh start|stop|status|urls
#   start   reuse a healthy cluster on the ports, else kill leftovers, wipe the
#           ports' state dirs, start the nodes, create the cluster, wait until ok
#   stop    shut every node down (errors ignored)
#   status  print each node's state; exit 0 only if the cluster is healthy
#   urls    print the comma-separated redis:// URLs of the nodes
# Env: TRACKER_TEST_CLUSTER_PORTS (default "7101 7102 7103"),
#      TRACKER_CLUSTER_DIR (default <repo>/.ci/state/redis-cluster).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${TRACKER_CLUSTER_DIR:-$REPO/.ci/state/redis-cluster}"
read -r -a PORTS <<<"${TRACKER_TEST_CLUSTER_PORTS:-7101 7102 7103}"
HOST=127.0.0.1

die() { echo "redis-cluster: ERROR: $*" >&2; exit 1; }
# timeout: a non-Redis listener on a port must not hang us.
cli() { local port=$1; shift; timeout 3 redis-cli -h "$HOST" -p "$port" "$@" </dev/null 2>/dev/null; }
# Port accepts TCP (a connect that hangs counts as in use too).
listening() {
  local rc=0
  # shellcheck disable=SC2016 # $0/$1 are expanded by the inner bash
  timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null || rc=$?
  ((rc == 0 || rc == 124))
}

# Healthy = every node says state ok, all slots assigned, knows all nodes,
# no slot is half migrated (a slot-migration test killed midway leaves
# one "[slot->-node]" behind; such a cluster is rebuilt, not reused), and its
# working directory still exists: a node started from a checkout that was
# since deleted dies at its next write of nodes.conf (the first slot move).
node_ok() {
  local info nodes dir
  info="$(cli "$1" cluster info | tr -d '\r')" || return 1
  nodes="$(cli "$1" cluster nodes | tr -d '\r')" || return 1
  dir="$(cli "$1" config get dir | tr -d '\r' | sed -n 2p)" || return 1
  grep -qx 'cluster_state:ok' <<<"$info" &&
    grep -qx 'cluster_slots_assigned:16384' <<<"$info" &&
    grep -qx "cluster_known_nodes:${#PORTS[@]}" <<<"$info" &&
    ! grep -q '\[' <<<"$nodes" &&
    [[ -n "$dir" && -d "$dir" ]]
}
cluster_ok() { local p; for p in "${PORTS[@]}"; do node_ok "$p" || return 1; done; }

stop_nodes() {
  local p i
  for p in "${PORTS[@]}"; do cli "$p" shutdown nosave >/dev/null || true; done
  for p in "${PORTS[@]}"; do
    for ((i = 0; i < 50; i++)); do listening "$p" || continue 2; sleep 0.2; done
    # Not a Redis that obeys SHUTDOWN: try the pid file from a previous run.
    if [[ -f "$DIR/$p/redis.pid" ]]; then kill "$(cat "$DIR/$p/redis.pid")" 2>/dev/null || true; sleep 1; fi
    listening "$p" && die "port $p is still in use by another process; free it or set TRACKER_TEST_CLUSTER_PORTS"
  done
  return 0
}

dump_logs() {
  local p
  for p in "${PORTS[@]}"; do
    echo "--- $DIR/$p/redis.log (tail) ---" >&2
    tail -n 30 "$DIR/$p/redis.log" >&2 2>/dev/null || echo "(no log)" >&2
    echo "--- cluster info $p ---" >&2
    cli "$p" cluster info >&2 || echo "(no answer)" >&2
  done
}

start() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    die "redis-server/redis-cli not found (run scripts/services.sh or apt-get install redis-server)"
  fi
  ((${#PORTS[@]} >= 3)) || die "a cluster needs at least 3 masters; got ports: ${PORTS[*]}"
  if cluster_ok; then
    echo "redis-cluster: reusing healthy cluster on ports ${PORTS[*]}"
    return 0
  fi
  stop_nodes
  local p i addrs=()
  for p in "${PORTS[@]}"; do
    rm -rf "${DIR:?}/$p" # fresh state; only our ports' dirs, the dir may be shared
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
      --save '' --appendonly no --daemonize yes --dir "$DIR/$p" --bind "$HOST" \
      --logfile "$DIR/$p/redis.log" --pidfile "$DIR/$p/redis.pid" --cluster-node-timeout 5000 ||
      { dump_logs; die "redis-server failed to start on port $p"; }
    addrs+=("$HOST:$p")
  done
  for p in "${PORTS[@]}"; do
    for ((i = 0; i < 50; i++)); do [[ "$(cli "$p" ping)" == PONG ]] && continue 2; sleep 0.2; done
    dump_logs; die "node on port $p did not answer PING within 10 s"
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes </dev/null >"$DIR/${PORTS[0]}/create.log" 2>&1 ||
    { cat "$DIR/${PORTS[0]}/create.log" >&2; dump_logs; die "redis-cli --cluster create failed"; }
  for ((i = 0; i < 150; i++)); do
    if cluster_ok; then echo "redis-cluster: started fresh cluster on ports ${PORTS[*]} (state: $DIR)"; return 0; fi
    sleep 0.2
  done
  dump_logs; die "cluster on ports ${PORTS[*]} not ok after 30 s"
}

status() {
  local p
  for p in "${PORTS[@]}"; do
    if [[ "$(cli "$p" ping)" == PONG ]]; then
      echo "$HOST:$p up   $(cli "$p" cluster info | tr -d '\r' |
        grep -E '^cluster_(state|slots_assigned|known_nodes):' | tr '\n' ' ')"
    else
      echo "$HOST:$p down"
    fi
  done
  if cluster_ok; then echo "cluster: ok"; else echo "cluster: NOT ok"; return 1; fi
}

urls() { local p out=(); for p in "${PORTS[@]}"; do out+=("redis://$HOST:$p"); done; (IFS=,; echo "${out[*]}"); }

case "${1:-}" in
  start) start ;;
  stop) stop_nodes >/dev/null 2>&1 || true; echo "redis-cluster: stopped ports ${PORTS[*]}" ;;
  status) status ;;
  urls) urls ;;
  *) echo "usage: $0 start|stop|status|urls" >&2; exit 2 ;;
esac
