#!/usr/bin/env bash
# Drops the databases earlier test runs left behind (bank_test_*).
set -euo pipefail
url=${TEST_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
dbs=$(psql "$url" -qtAXc "SELECT datname FROM pg_database WHERE datname LIKE 'bank\_test\_%'")
n=0
for db in $dbs; do
  psql "$url" -qtAXc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null && n=$((n + 1))
done
echo "[tests] dropped $n old test database(s)"
