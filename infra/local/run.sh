#!/usr/bin/env bash
# Starts (or stops) core-bank, transfer and projector in the background for
# `make run`, waits until each answers /readyz, creates demo accounts once,
# and prints a customer token and curl examples.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOCAL="$ROOT/.local"
PROFILE=${PROFILE:-debug}
BIN="$ROOT/target/$PROFILE"
mkdir -p "$LOCAL/logs" "$LOCAL/pids"

# Demo settings: the business clock may be moved (to show interest accruing).
export BANK_TEST_CLOCK=${BANK_TEST_CLOCK:-1}
export CORE_API_TOKEN=${CORE_API_TOKEN:-dev-core-token}
# The projector only reads from the core: it gets the read-only credential.
export CORE_READ_API_TOKEN=${CORE_READ_API_TOKEN:-dev-core-read-token}
export AUTH_JWT_SECRET=${AUTH_JWT_SECRET:-dev-jwt-secret}
# The local infrastructure's ports (infra/local/services.sh).
export CORE_DATABASE_URL=${CORE_DATABASE_URL:-postgres://postgres@127.0.0.1:${PG_PORT:-5432}/bank_core?sslmode=disable}
export CHANNEL_DATABASE_URL=${CHANNEL_DATABASE_URL:-postgres://postgres@127.0.0.1:${PG_PORT:-5432}/bank_channel?sslmode=disable}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:${NATS_PORT:-4222}}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:${REDIS_PORT:-6379}}
CORE=${CORE_URL:-http://127.0.0.1:8081}
TRANSFER=http://${TRANSFER_HTTP_ADDR:-127.0.0.1:8080}
PROJECTOR=http://${PROJECTOR_HTTP_ADDR:-127.0.0.1:8082}

log() { printf '[run] %s\n' "$*" >&2; }

# True when the pid file of $1 names a live process of that program (a pid
# file left by a crash or a reboot may name an unrelated process now).
running() {
  [ -f "$LOCAL/pids/$1.pid" ] && [ "$(cat "/proc/$(cat "$LOCAL/pids/$1.pid")/comm" 2>/dev/null)" = "$1" ]
}

start_one() {
  local name=$1 token=$CORE_API_TOKEN
  if running "$name"; then log "$name already running (pid $(cat "$LOCAL/pids/$name.pid"))"; return; fi
  [ "$name" = projector ] && token=$CORE_READ_API_TOKEN
  CORE_API_TOKEN=$token nohup "$BIN/$name" >>"$LOCAL/logs/$name.log" 2>&1 &
  echo $! >"$LOCAL/pids/$name.pid"
  log "$name started (pid $!, log .local/logs/$name.log)"
}

wait_ready() {
  local name=$1 url=$2 i
  for i in $(seq 1 150); do
    if curl -fsS -m 2 "$url/readyz" >/dev/null 2>&1; then log "$name ready at $url"; return; fi
    running "$name" || { tail -n 20 "$LOCAL/logs/$name.log" >&2; log "$name exited; see .local/logs/$name.log"; exit 1; }
    sleep 0.2
  done
  log "$name did not become ready; see .local/logs/$name.log"; exit 1
}

core() { curl -fsS -m 10 -H "Authorization: Bearer $CORE_API_TOKEN" -H 'Content-Type: application/json' "$@"; }
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

demo_accounts() {
  if [ -f "$LOCAL/demo.env" ]; then
    # shellcheck disable=SC1091
    . "$LOCAL/demo.env"
    if core "$CORE/v1/accounts/$DEMO_FROM" >/dev/null 2>&1; then return; fi
  fi
  local alice bob
  alice=$(core -X POST "$CORE/v1/customers" -d '{"name":"Alice Kim"}' | json_field customer_id)
  bob=$(core -X POST "$CORE/v1/customers" -d '{"name":"Bob Lee"}' | json_field customer_id)
  DEMO_CUSTOMER=$alice
  DEMO_FROM=$(core -X POST "$CORE/v1/accounts" -d "{\"customer_id\":\"$alice\"}" | json_field account_id)
  DEMO_TO=$(core -X POST "$CORE/v1/accounts" -d "{\"customer_id\":\"$bob\"}" | json_field account_id)
  core -X POST "$CORE/v1/deposits" -d "{\"deposit_id\":\"demo-$DEMO_FROM\",\"to_account\":\"$DEMO_FROM\",\"amount\":\"60000000\",\"sender_bank\":\"KB Kookmin\",\"sender_name\":\"Alice Kim\"}" >/dev/null
  printf 'DEMO_CUSTOMER=%s\nDEMO_FROM=%s\nDEMO_TO=%s\n' "$DEMO_CUSTOMER" "$DEMO_FROM" "$DEMO_TO" >"$LOCAL/demo.env"
  log "demo accounts created (Alice: $DEMO_FROM with 60,000,000 won; Bob: $DEMO_TO)"
}

start() {
  if ! command -v curl >/dev/null; then
    log "installing curl"
    local sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
  fi
  start_one core-bank; wait_ready core-bank "$CORE"
  start_one transfer; wait_ready transfer "$TRANSFER"
  start_one projector; wait_ready projector "$PROJECTOR"
  demo_accounts
  local token
  token=$("$BIN/transfer" issue-token --customer "$DEMO_CUSTOMER" --ttl-secs 86400)
  cat <<MSG

The bank backbone is running:
  core-bank  $CORE       (service API, token: $CORE_API_TOKEN; OpenAPI: $CORE/openapi.json)
  transfer   $TRANSFER       (customer API; OpenAPI: $TRANSFER/openapi.json)
  projector  $PROJECTOR       (dead letters, tax records; OpenAPI: $PROJECTOR/openapi.json)
  metrics    /metrics on each; health /healthz, /readyz
  logs       .local/logs/*.log        stop: make stop      stop everything: make down

A customer token for Alice ($DEMO_CUSTOMER), valid 24 h:
  export TOKEN=$token

Send 15,000 won from Alice ($DEMO_FROM) to Bob ($DEMO_TO):
  curl -s -X POST $TRANSFER/v1/transfers -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-1' \\
       -d '{"from_account":"$DEMO_FROM","to_account":"$DEMO_TO","amount":"15000","memo":"lunch"}'

Alice's history, newest first (then pass next_cursor as ?cursor=...):
  curl -s "$TRANSFER/v1/accounts/$DEMO_FROM/history?limit=20" -H "Authorization: Bearer \$TOKEN"

Interest: move the business date a few days ahead (demo clock), look, receive:
  curl -s -X POST $CORE/v1/admin/clock -H "Authorization: Bearer $CORE_API_TOKEN" -H 'Content-Type: application/json' -d "{\"today\":\"\$(date -d '+4 days' +%F)\"}"
  curl -s $TRANSFER/v1/accounts/$DEMO_FROM/interest -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST $TRANSFER/v1/accounts/$DEMO_FROM/interest/receive -H "Authorization: Bearer \$TOKEN" -H 'Idempotency-Key: interest-1'
MSG
}

stop() {
  local name pid
  for name in projector transfer core-bank; do
    if running "$name"; then
      pid=$(cat "$LOCAL/pids/$name.pid"); kill -TERM "$pid"
      # A service drains for up to its shutdown budget (45-55 s in Kubernetes);
      # here 30 s, then it is killed rather than left running unlisted.
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop within 30 s; killing it"; kill -KILL "$pid" 2>/dev/null || true
      fi
      log "$name stopped"
    fi
    rm -f "$LOCAL/pids/$name.pid"
  done
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
