#!/usr/bin/env bash
# Local services for the bank backbone: PostgreSQL, NATS with JetStream, Redis.
#
#   infra/local/services.sh up      use what is reachable, start what is not
#   infra/local/services.sh down    stop only what this script started
#   infra/local/services.sh status  show what answers
#
# For each service: if something answers on its port (127.0.0.1), it is used
# as it is. Otherwise the Debian package is installed if its program is
# missing, and the service is started on loopback with its data under
# $LOCAL_DIR (default .local/, ignored by git). Idempotent: running `up` twice
# starts nothing the second time. Ports: PG_PORT, NATS_PORT, REDIS_PORT.
#
# A NATS server started here runs JetStream with `sync_interval: always`
# (fsync before every acknowledgement; the default, fsync every two minutes,
# loses acknowledged messages on power loss, as Jepsen showed in 2025). That
# option needs nats-server >= 2.10; Debian 12 ships 2.9.10, so when the
# installed server is older, the nats-server package of the next Debian release
# (a static Go binary) is unpacked into $LOCAL_DIR/bin and used instead.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOCAL_DIR=${LOCAL_DIR:-$ROOT/.local}
PG_PORT=${PG_PORT:-5432}
NATS_PORT=${NATS_PORT:-4222}
REDIS_PORT=${REDIS_PORT:-6379}
DATABASES=${DATABASES:-"bank_core bank_channel"}
# The Debian package unpacked when the installed nats-server is too old. Its
# download is checked against a SHA-256 before it is unpacked: the default
# version's, for amd64 and arm64, are pinned below (as Debian's trixie index,
# dists/trixie/main/binary-<arch>/Packages, lists them); another version,
# architecture or NATS_DEB_URL needs NATS_DEB_SHA256 set, or the bring-up stops.
NATS_DEB_PINNED=2.10.27-1+b2
NATS_DEB_VERSION=${NATS_DEB_VERSION:-$NATS_DEB_PINNED}
STARTED="$LOCAL_DIR/started"
BIN_DIR=${BIN_DIR:-$ROOT/.local/bin}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root (or sudo) to run: $*"; fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 100); do port_open "$port" && return 0; sleep 0.2; done
  die "$what did not start listening on 127.0.0.1:$port (see $LOCAL_DIR/*.log)"
}

apt_updated=
apt_install() {
  log "installing Debian packages: $*"
  if [ -z "$apt_updated" ]; then as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Installs a server package without letting Debian start it: the package's
# own service would take the port this script is about to start on, with
# Debian's settings (password auth on TCP, no JetStream). invoke-rc.d and
# deb-systemd-invoke ask policy-rc.d before starting anything; the units are
# disabled afterwards so that a reboot does not start them either.
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_MARK="# bank-backbone services.sh: no service starts during its install"
# Removes the policy-rc.d this script wrote, and only that one.
drop_policy() { grep -qxF "$POLICY_MARK" "$POLICY_RC" 2>/dev/null && as_root rm -f "$POLICY_RC"; return 0; }
apt_install_server() {
  local unit=$1 rc=0; shift
  if [ -e "$POLICY_RC" ]; then
    apt_install "$@" || rc=$?
  else
    # Never left behind (it would keep every later install on this machine
    # from restarting its services): removed on any exit.
    trap drop_policy EXIT
    trap 'drop_policy; exit 130' INT TERM
    as_root sh -c "printf '#!/bin/sh\n%s\nexit 101\n' '$POLICY_MARK' >$POLICY_RC && chmod 755 $POLICY_RC"
    apt_install "$@" || rc=$?
    drop_policy
    trap - EXIT INT TERM
  fi
  [ "$rc" = 0 ] || die "installing $* failed"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    as_root systemctl disable --now "$unit" >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null; then
    as_root update-rc.d "$unit" disable >/dev/null 2>&1 || true
  fi
}

mark_started() { mkdir -p "$LOCAL_DIR"; grep -qx "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"; }

# The server programs: those of the version that made the data directory
# $1 when there is one (after an upgrade the newest cannot start it), else
# the newest installed.
pg_bindir() {
  if [ -n "${1:-}" ] && [ -f "$1/PG_VERSION" ] && [ -d "/usr/lib/postgresql/$(cat "$1/PG_VERSION")/bin" ]; then
    echo "/usr/lib/postgresql/$(cat "$1/PG_VERSION")/bin"; return
  fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# Where this script's PostgreSQL keeps its data, socket and log. As root the
# server runs as `postgres`, which must be able to reach them: a checkout
# under a 0700 home directory (root's, or a user's) is out of its reach, so
# they go under /var/lib/bank-backbone then (root's; not /var/tmp, where
# another user could plant a link, and which is aged out). Remembered, so
# that `down` finds them.
pg_home() {
  if [ -f "$LOCAL_DIR/postgres.home" ]; then cat "$LOCAL_DIR/postgres.home"; return; fi
  local home="$LOCAL_DIR"
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$LOCAL_DIR" 2>/dev/null; then
    home="/var/lib/bank-backbone/$(printf %s "$LOCAL_DIR" | md5sum | cut -c1-12)"
    install -d -o root -g root -m 755 /var/lib/bank-backbone "$home"
    log "PostgreSQL: $LOCAL_DIR is out of the postgres user's reach; its data goes to $home"
  fi
  echo "$home" >"$LOCAL_DIR/postgres.home"
  echo "$home"
}

# Runs a PostgreSQL server program as a non-root user (initdb refuses root).
pg_run() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_admin() {
  psql "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -v ON_ERROR_STOP=1 -qtAX "$@"
}

up_postgres() {
  if port_open "$PG_PORT"; then
    log "PostgreSQL: using the server already listening on 127.0.0.1:$PG_PORT"
  else
    [ -n "$(pg_bindir)" ] || apt_install_server postgresql postgresql
    local bin home data run
    home=$(pg_home); data="$home/postgres"; run="$home/postgres-run"
    bin=$(pg_bindir "$data")
    mkdir -p "$data" "$run"
    [ "$(id -u)" = 0 ] && chown -h postgres:postgres "$data" "$run" && chmod 700 "$data"
    if [ ! -f "$data/PG_VERSION" ]; then
      log "PostgreSQL: initialising $data"
      pg_run "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$LOCAL_DIR/postgres-initdb.log" \
        || die "initdb failed; see $LOCAL_DIR/postgres-initdb.log"
    fi
    log "PostgreSQL: starting on 127.0.0.1:$PG_PORT"
    touch "$home/postgres.log"; [ "$(id -u)" = 0 ] && chown -h postgres "$home/postgres.log"
    pg_run "$bin/pg_ctl" -D "$data" -l "$home/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$run -c max_connections=300 -c fsync=on" >/dev/null \
      || die "PostgreSQL did not start; see $home/postgres.log"
    mark_started postgres
    wait_port "$PG_PORT" PostgreSQL
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  local db
  for db in $DATABASES; do
    if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
      log "PostgreSQL: creating database $db"
      psql_admin -c "CREATE DATABASE \"$db\""
    fi
  done
}

# The SHA-256 the nats-server package for architecture $1 must have: the
# one given, or the pinned one of the default package ($NATS_DEB_PINNED:
# change the hashes with it); empty if neither.
nats_deb_sha256() {
  if [ -n "${NATS_DEB_SHA256:-}" ]; then echo "$NATS_DEB_SHA256"; return; fi
  [ -z "${NATS_DEB_URL:-}" ] && [ "$NATS_DEB_VERSION" = "$NATS_DEB_PINNED" ] || return 0
  case "$1" in
    amd64) echo 6d913ac987b78734c08537c2adeb1526cf735f216173a9170d94b185fcfe6f8a ;;
    arm64) echo 0c9a617510b28c1b4fb4a38aabea6ab8cd7f026247f2abdff8b955b2278ce049 ;;
  esac
}

# Prints the path of a nats-server that supports sync_interval (>= 2.10).
nats_binary() {
  local sys ver
  sys=$(command -v nats-server || true)
  if [ -n "$sys" ]; then
    ver=$("$sys" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    set -- $ver
    if [ "${1:-0}" -gt 2 ] || { [ "${1:-0}" -eq 2 ] && [ "${2:-0}" -ge 10 ]; }; then echo "$sys"; return; fi
  fi
  local own="$BIN_DIR/nats-server"
  # A binary that does not run (another architecture's, a truncated copy)
  # is fetched again rather than kept.
  if [ -x "$own" ] && ! "$own" --version >/dev/null 2>&1; then rm -f "$own"; fi
  if [ ! -x "$own" ]; then
    local arch url want got
    arch=$(dpkg --print-architecture)
    url=${NATS_DEB_URL:-https://deb.debian.org/debian/pool/main/n/nats-server/nats-server_${NATS_DEB_VERSION}_${arch}.deb}
    want=$(nats_deb_sha256 "$arch")
    [ -n "$want" ] || die "no SHA-256 known for $url: set NATS_DEB_SHA256 (the Packages index of the Debian release it comes from lists it), or install a nats-server >= 2.10 on PATH"
    log "NATS: installed nats-server is older than 2.10 (no sync_interval); unpacking Debian's 2.10 package ($arch) into $BIN_DIR"
    command -v curl >/dev/null || apt_install curl ca-certificates
    local tmp; tmp=$(mktemp -d)
    curl -fsSL -m 300 -o "$tmp/nats.deb" "$url" \
      || { rm -rf "$tmp"; die "cannot download $url (set NATS_DEB_URL to a nats-server >= 2.10 .deb, or install one on PATH)"; }
    got=$(sha256sum "$tmp/nats.deb" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { rm -rf "$tmp"; die "$url has SHA-256 $got, expected $want: not unpacked"; }
    dpkg-deb -x "$tmp/nats.deb" "$tmp/x"
    mkdir -p "$BIN_DIR"; cp "$tmp/x/usr/sbin/nats-server" "$own.new"; rm -rf "$tmp"
    "$own.new" --version >/dev/null 2>&1 || { rm -f "$own.new"; die "the nats-server from $url does not run here"; }
    mv "$own.new" "$own"
  fi
  echo "$own"
}

# A server already listening on the NATS port is used only if it is NATS
# with JetStream (the services create streams and consumers on it; without
# JetStream they would fail at start-up, each with its own error). One older
# than 2.10 is used with a warning: it cannot fsync every write.
check_running_nats() {
  local info major minor
  info=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT; head -n1 <&3" 2>/dev/null || true)
  case $info in
    INFO*) ;;
    *) die "the server on 127.0.0.1:$NATS_PORT did not greet as NATS does; free the port or set NATS_PORT" ;;
  esac
  grep -q '"jetstream":true' <<<"$info" \
    || die "the NATS server on 127.0.0.1:$NATS_PORT runs without JetStream; restart it with JetStream (-js) or stop it, and this script starts one"
  read -r major minor < <(sed -n 's/.*"version":"\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p' <<<"$info") || true
  if [ -n "${minor:-}" ] && { [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 10 ]; }; }; then
    log "NATS: WARNING: the server on 127.0.0.1:$NATS_PORT is $major.$minor, older than 2.10: it cannot be set to fsync every write (sync_interval), so acknowledged events can be lost on power loss"
  fi
}

up_nats() {
  if port_open "$NATS_PORT"; then
    check_running_nats
    log "NATS: using the server already listening on 127.0.0.1:$NATS_PORT (its JetStream settings are its own)"
    return
  fi
  command -v nats-server >/dev/null || [ -x "$BIN_DIR/nats-server" ] || apt_install_server nats-server nats-server
  local bin dir="$LOCAL_DIR/nats"
  bin=$(nats_binary)
  mkdir -p "$dir"
  cat >"$LOCAL_DIR/nats.conf" <<CONF
listen: 127.0.0.1:$NATS_PORT
pid_file: "$LOCAL_DIR/nats.pid"
jetstream {
  store_dir: "$dir"
  sync_interval: always
}
CONF
  log "NATS: starting $("$bin" --version) with JetStream (sync_interval: always) on 127.0.0.1:$NATS_PORT"
  nohup "$bin" -c "$LOCAL_DIR/nats.conf" >"$LOCAL_DIR/nats.log" 2>&1 &
  local pid=$!
  mark_started nats
  wait_port "$NATS_PORT" NATS
  # The port answers; make sure it is this server and not another one that
  # took the port meanwhile (ours would have exited).
  sleep 0.5
  kill -0 "$pid" 2>/dev/null || die "NATS exited at start; see $LOCAL_DIR/nats.log"
}

up_redis() {
  if port_open "$REDIS_PORT"; then
    log "Redis: using the server already listening on 127.0.0.1:$REDIS_PORT"
    return
  fi
  command -v redis-server >/dev/null || apt_install_server redis-server redis-server
  mkdir -p "$LOCAL_DIR/redis"
  log "Redis: starting on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --dir "$LOCAL_DIR/redis" \
    --pidfile "$LOCAL_DIR/redis.pid" --logfile "$LOCAL_DIR/redis.log" --save "" --appendonly no
  mark_started redis
  wait_port "$REDIS_PORT" Redis
  sleep 0.5
  { [ -f "$LOCAL_DIR/redis.pid" ] && kill -0 "$(cat "$LOCAL_DIR/redis.pid")" 2>/dev/null; } \
    || die "Redis exited at start; see $LOCAL_DIR/redis.log"
}

# Sends TERM to the process in pid file $1, if it is still program $2 (a pid
# file left by a crash or a reboot may name an unrelated process now), and
# waits (10 s) for it to exit.
stop_pidfile() {
  local pid i
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || { rm -f "$1"; return 0; }
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  log "pid $pid did not exit after 10 s; killing it"; kill -9 "$pid" 2>/dev/null || true
}

down() {
  [ -f "$STARTED" ] || { log "nothing was started here"; return; }
  local s
  while read -r s; do
    case $s in
      postgres)
        log "stopping PostgreSQL"
        local data; data="$(pg_home)/postgres"
        pg_run "$(pg_bindir "$data")/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true ;;
      nats) log "stopping NATS"; stop_pidfile "$LOCAL_DIR/nats.pid" nats-server ;;
      redis) log "stopping Redis"; stop_pidfile "$LOCAL_DIR/redis.pid" redis-server ;;
    esac
  done <"$STARTED"
  rm -f "$STARTED"
}

status() {
  local name port
  for name in PostgreSQL:$PG_PORT NATS:$NATS_PORT Redis:$REDIS_PORT; do
    port=${name#*:}
    if port_open "$port"; then echo "${name%%:*} 127.0.0.1:$port up"; else echo "${name%%:*} 127.0.0.1:$port down"; fi
  done
}

# The test kit starts a redis-server of its own (F8) and `make bench` runs
# pgbench (Debian ships it with the server package): `make test` and `make
# bench` make both be at hand even when the servers on the ports are not
# this machine's packages (a container, another install), installed without
# starting anything. `make run` needs neither.
test_programs() {
  command -v redis-server >/dev/null || apt_install_server redis-server redis-server
  pgbench --version >/dev/null 2>&1 || apt_install_server postgresql postgresql
}

case ${1:-up} in
  # `up` also makes sure a nats-server >= 2.10 is at hand even when the
  # running server is older: the test kit, `make bench` and `make chaos`
  # start their own servers with `sync_interval: always`, and refuse to run
  # on one that cannot fsync every write.
  up) mkdir -p "$LOCAL_DIR"; up_postgres; up_nats; up_redis; nats_binary >/dev/null; status ;;
  test-programs) test_programs ;;
  down) down ;;
  status) status ;;
  nats-binary) nats_binary ;;
  *) die "usage: $0 up|down|status|nats-binary|test-programs" ;;
esac
