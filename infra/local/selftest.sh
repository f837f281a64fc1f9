#!/usr/bin/env bash
# Exercises the "start our own" path of services.sh, which a machine with the
# services already running never takes: bring all three up on free alternate
# ports, check each answers (SQL, JetStream, PING), and stop them again.
# The ports lie below Linux's ephemeral range (32768-60999): a port inside it
# can be the local end of some client's connection at that moment, and
# nats-server once failed to bind 54222 that way during a `.ci/run`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export LOCAL_DIR="$ROOT/.local/selftest" PG_PORT=${SELFTEST_PG_PORT:-15432} NATS_PORT=${SELFTEST_NATS_PORT:-14222} REDIS_PORT=${SELFTEST_REDIS_PORT:-16379}
svc="$ROOT/infra/local/services.sh"

# A selftest killed before its trap ran (SIGKILL, a CI timeout) left its
# servers running: stop what it recorded as started before checking ports.
"$svc" down >/dev/null 2>&1 || true
for p in "$PG_PORT" "$NATS_PORT" "$REDIS_PORT"; do
  if timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$p" 2>/dev/null; then
    echo "[selftest] port $p is in use; set SELFTEST_*_PORT to free ports" >&2; exit 1
  fi
done
# The nats-server package is checked before it is unpacked: a download with
# another SHA-256 than the expected one, or one whose SHA-256 nobody gave,
# leaves nothing behind, and one with the expected SHA-256 is unpacked (a
# stand-in nats-server older than 2.10 on PATH makes services.sh take the
# download path; the "package" is a local file, a real .deb in the last case).
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
mkdir -p "$fake/tmp" "$fake/deb/DEBIAN" "$fake/deb/usr/sbin"
chmod 755 "$fake/deb/DEBIAN"  # dpkg-deb refuses one a umask of 077 made
printf '#!/bin/sh\necho "nats-server: v2.9.0"\n' >"$fake/nats-server"; chmod +x "$fake/nats-server"
echo "not a package" >"$fake/pkg.deb"
fetch() { PATH="$fake:$PATH" TMPDIR="$fake/tmp" BIN_DIR="$fake/bin" NATS_DEB_URL="file://$fake/pkg.deb" "$svc" nats-binary 2>&1; }
left() { [ ! -e "$fake/bin/nats-server" ] && [ -z "$(ls -A "$fake/tmp")" ] || { echo "[selftest] a refused package left files behind: $(ls -R "$fake/bin" "$fake/tmp" 2>&1)" >&2; exit 1; }; }
out=$(NATS_DEB_SHA256=0000 fetch) && { echo "[selftest] a package with the wrong SHA-256 was taken: $out" >&2; exit 1; }
grep -q 'expected 0000: not unpacked' <<<"$out" || { echo "[selftest] wrong SHA-256 not reported: $out" >&2; exit 1; }
left
out=$(NATS_DEB_SHA256= fetch) && { echo "[selftest] a package without a known SHA-256 was taken: $out" >&2; exit 1; }
grep -q 'no SHA-256 known' <<<"$out" || { echo "[selftest] missing SHA-256 not reported: $out" >&2; exit 1; }
left
printf 'Package: nats-server\nVersion: 2.10.99\nArchitecture: all\nMaintainer: selftest <selftest@localhost>\nDescription: selftest stand-in\n' >"$fake/deb/DEBIAN/control"
printf '#!/bin/sh\necho "nats-server: v2.10.99"\n' >"$fake/deb/usr/sbin/nats-server"; chmod 755 "$fake/deb/usr/sbin/nats-server"
dpkg-deb -b --root-owner-group "$fake/deb" "$fake/pkg.deb" >/dev/null
out=$(NATS_DEB_SHA256=$(sha256sum "$fake/pkg.deb" | cut -d' ' -f1) fetch) || { echo "[selftest] a package with the expected SHA-256 was refused: $out" >&2; exit 1; }
[ "$(tail -n1 <<<"$out")" = "$fake/bin/nats-server" ] && [ "$("$fake/bin/nats-server" --version)" = "nats-server: v2.10.99" ] \
  || { echo "[selftest] a package with the expected SHA-256 was not unpacked: $out" >&2; exit 1; }
[ -z "$(ls -A "$fake/tmp")" ] || { echo "[selftest] unpacking left $(ls "$fake/tmp") in the temporary directory" >&2; exit 1; }
rm -rf "$fake"; trap - EXIT
echo "[selftest] a nats-server package is unpacked with the expected SHA-256 and refused, nothing left behind, with a wrong or unknown one"

# A server already on the NATS port without JetStream is refused, not used
# (the services would each fail at start-up with an error of their own).
"$("$svc" nats-binary)" -a 127.0.0.1 -p "$NATS_PORT" >/dev/null 2>&1 &
plain=$!
trap 'kill "$plain" 2>/dev/null; "$svc" down' EXIT
for _ in $(seq 1 50); do timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT" 2>/dev/null && break; sleep 0.1; done
timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT" 2>/dev/null \
  || { echo "[selftest] the nats-server without JetStream did not start on $NATS_PORT" >&2; exit 1; }
out=$("$svc" up 2>&1) && { echo "[selftest] a NATS server without JetStream was used: $out" >&2; exit 1; }
grep -q 'runs without JetStream' <<<"$out" || { echo "[selftest] a NATS server without JetStream was not reported: $out" >&2; exit 1; }
kill "$plain" 2>/dev/null || true; wait "$plain" 2>/dev/null || true
echo "[selftest] a NATS server without JetStream on the port is refused"
# (The refused `up` had started PostgreSQL: the `up` below finds it running,
# and the trap's `down` stops it with the rest.)

trap '"$svc" down' EXIT
"$svc" up

# PostgreSQL: both databases exist and answer SQL.
for db in bank_core bank_channel; do
  [ "$(psql "postgresql://postgres@127.0.0.1:$PG_PORT/$db" -qtAXc 'SELECT 1')" = 1 ] || { echo "[selftest] $db does not answer" >&2; exit 1; }
done
# NATS: JetStream answers an account info request ($JS.API.INFO).
reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT
  printf 'CONNECT {\"verbose\":false}\r\nSUB _INBOX.selftest 1\r\nPUB \$JS.API.INFO _INBOX.selftest 0\r\n\r\nPING\r\n' >&3
  timeout 2 cat <&3" || true)
grep -q '"memory"' <<<"$reply" || { echo "[selftest] JetStream did not answer: $reply" >&2; exit 1; }
grep -q 'sync_interval: always' "$LOCAL_DIR/nats.conf" || { echo "[selftest] nats.conf lacks sync_interval" >&2; exit 1; }
# Redis: PING.
reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT; printf 'PING\r\n' >&3; timeout 1 head -c 7 <&3" || true)
grep -q PONG <<<"$reply" || { echo "[selftest] Redis did not answer PING: $reply" >&2; exit 1; }
echo "[selftest] own PostgreSQL, NATS (JetStream, sync_interval: always) and Redis started, answered, and stopped"
