#!/usr/bin/env bash
# Ensure the local test services run: Redis on 127.0.0.1:6379, PostgreSQL
# on 127.0.0.1:5432 (user postgres, trust auth, database "test") and NATS
# with JetStream on 127.0.0.1:4222 (Debian's nats-server), and that
# the operator page's browser tests have Debian's headless Chromium and its
# chromedriver (/usr/bin/chromium, /usr/bin/chromedriver).
# Installs missing packages via apt, starts stopped services, creates the
# PostgreSQL cluster/database if needed. Idempotent; fast when all is up.
#
# Usage: scripts/services.sh
set -euo pipefail

die() { echo "services: ERROR: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run as root: directly, via sudo, or fail naming what needed root.
as_root() {
  if ((EUID == 0)); then "$@"
  elif have sudo; then sudo "$@"
  else die "need root (or sudo) to: $* -- install/start it by hand"; fi
}
as_postgres() {
  if ((EUID == 0)) && have runuser; then runuser -u postgres -- "$@"
  elif have sudo; then sudo -u postgres "$@"
  else die "need root (or sudo) to run $1 as user postgres"; fi
}

# --- packages -----------------------------------------------------------
missing=()
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
if ! have pg_ctlcluster || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  missing+=(postgresql)
fi
# The docker platform's tests and the e2e scenarios' NATS checks start their
# own nats-server from here (or PATH).
[[ -x /usr/sbin/nats-server ]] || have nats-server || missing+=(nats-server)
# The browser tests (crates/tracker-browser) use these paths unless
# TRACKER_CHROMIUM / TRACKER_CHROMEDRIVER name others.
[[ -x "${TRACKER_CHROMIUM:-/usr/bin/chromium}" ]] || missing+=(chromium)
[[ -x "${TRACKER_CHROMEDRIVER:-/usr/bin/chromedriver}" ]] || missing+=(chromium-driver)
if ((${#missing[@]})); then
  echo "services: installing ${missing[*]} with apt-get"
  ((EUID == 0)) || have sudo || die "not root and no sudo: install ${missing[*]} by hand (apt-get install -y ${missing[*]})"
  as_root apt-get update -q || die "apt-get update failed (needed for ${missing[*]})"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null ||
    die "apt-get install ${missing[*]} failed"
fi

# wait_for SECONDS CMD... : poll CMD every 0.2 s until it succeeds.
wait_for() {
  local n=$(($1 * 5)) i; shift
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

# --- Redis --------------------------------------------------------------
redis_up() { [[ "$(timeout 3 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]; }
if redis_up; then
  echo "services: redis      127.0.0.1:6379 already running"
else
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log ||
    die "redis-server failed to start (see /var/log/redis/ci.log)"
  if ! wait_for 15 redis_up; then
    tail -n 30 /var/log/redis/ci.log >&2 || true
    die "redis on 127.0.0.1:6379 does not answer PING after 15 s"
  fi
  echo "services: redis      127.0.0.1:6379 started"
fi

# --- NATS (JetStream) -----------------------------------------------------
nats_bin=/usr/sbin/nats-server
[[ -x "$nats_bin" ]] || nats_bin="$(command -v nats-server)"
# The server greets every client with an INFO line that says whether JetStream is on.
nats_up() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222 && head -n 1 <&3' 2>/dev/null | grep -q '"jetstream":true'; }
if nats_up; then
  echo "services: nats       127.0.0.1:4222 already running (JetStream)"
else
  as_root mkdir -p /var/lib/nats /var/log/nats
  # setsid + nohup: the server outlives this script, like the daemonized Redis.
  as_root setsid nohup "$nats_bin" -js -sd /var/lib/nats -a 127.0.0.1 -p 4222 \
    -l /var/log/nats/ci.log </dev/null >/dev/null 2>&1 &
  if ! wait_for 15 nats_up; then
    tail -n 30 /var/log/nats/ci.log >&2 || true
    die "nats-server on 127.0.0.1:4222 does not greet with JetStream after 15 s (see /var/log/nats/ci.log)"
  fi
  echo "services: nats       127.0.0.1:4222 started (JetStream, store /var/lib/nats)"
fi

# --- PostgreSQL ---------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
pgsql() { psql -h 127.0.0.1 -p 5432 -U postgres -w -X -q -Atv ON_ERROR_STOP=1 "$@" </dev/null; }
pg_did="already running"
if ! pg_up; then
  ver="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
  [[ -n "$ver" ]] || ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
  [[ -n "$ver" ]] || die "no PostgreSQL version found under /etc/postgresql or /usr/lib/postgresql"
  if [[ ! -f "/etc/postgresql/$ver/main/postgresql.conf" ]]; then
    as_root pg_createcluster --port 5432 "$ver" main || die "pg_createcluster $ver main failed"
    pg_did="created cluster $ver/main and started"
  else
    pg_did="started $ver/main"
  fi
  if ! as_root pg_ctlcluster "$ver" main status >/dev/null 2>&1; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
      die "pg_ctlcluster $ver main start failed (see /var/log/postgresql/postgresql-$ver-main.log)"
  fi
  if ! wait_for 30 pg_up; then
    tail -n 30 "/var/log/postgresql/postgresql-$ver-main.log" >&2 || true
    die "PostgreSQL $ver/main does not accept connections on 127.0.0.1:5432 after 30 s (port set in /etc/postgresql/$ver/main/postgresql.conf?)"
  fi
fi

# Password-less TCP login for user postgres (dev/CI machine only!).
if ! pgsql -c 'select 1' >/dev/null 2>&1; then
  hba="$(as_postgres psql -p 5432 -X -Atc 'show hba_file' </dev/null)" || die "cannot ask PostgreSQL for its pg_hba.conf over the local socket"
  echo "services: WARNING: 'psql -h 127.0.0.1 -U postgres' needs a password; this is a dev/CI machine, so" >&2
  echo "services: WARNING: prepending 'host all all 127.0.0.1/32 trust' and '::1/128 trust' to $hba and reloading" >&2
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_postgres psql -p 5432 -X -qAtc 'select pg_reload_conf()' </dev/null >/dev/null || die "reloading PostgreSQL config failed"
  wait_for 10 pgsql -c 'select 1' || die "still cannot log in as postgres on 127.0.0.1:5432 without a password (check $hba)"
  pg_did+="; enabled trust auth on 127.0.0.1"
fi

if [[ "$(pgsql -c "select 1 from pg_database where datname = 'test'")" != 1 ]]; then
  pgsql -c 'create database test' || die "creating database test failed"
  pg_did+="; created database test"
fi
echo "services: postgresql 127.0.0.1:5432 $pg_did (database test ready)"
echo "services: browser    $("${TRACKER_CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null | head -n 1), $("${TRACKER_CHROMEDRIVER:-/usr/bin/chromedriver}" --version 2>/dev/null | cut -d' ' -f1-2)"
