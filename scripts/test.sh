#!/usr/bin/env bash
# THE test command: ensures Redis + PostgreSQL (scripts/services.sh), starts
# the throwaway Redis Cluster (scripts/redis-cluster.sh), exports the test
# URLs (already-set values win) and runs the whole workspace's tests.
# A cluster started here is stopped on exit unless TRACKER_KEEP_CLUSTER=1;
# a cluster that was already running is reused and left running.
#
# Usage: scripts/test.sh [extra cargo test args...]
#   e.g. scripts/test.sh -p tracker-core -- --nocapture
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/services.sh

if bash scripts/redis-cluster.sh status >/dev/null 2>&1; then
  started_cluster=0
else
  started_cluster=1
fi
bash scripts/redis-cluster.sh start
if ((started_cluster)) && [[ "${TRACKER_KEEP_CLUSTER:-0}" != 1 ]]; then
  trap 'bash scripts/redis-cluster.sh stop || true' EXIT
fi

export TRACKER_TEST_REDIS_URL="${TRACKER_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
TRACKER_TEST_CLUSTER_URLS="${TRACKER_TEST_CLUSTER_URLS:-$(bash scripts/redis-cluster.sh urls)}"
export TRACKER_TEST_CLUSTER_URLS
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
echo "test: TRACKER_TEST_REDIS_URL=$TRACKER_TEST_REDIS_URL"
echo "test: TRACKER_TEST_CLUSTER_URLS=$TRACKER_TEST_CLUSTER_URLS"
echo "test: DATABASE_URL=$DATABASE_URL"

rc=0
cargo test --workspace "$@" || rc=$?
exit "$rc"
