#!/usr/bin/env bash
# Start the local services (Kafka, PostgreSQL) and write .local/env for the app and tests:
#   KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<KAFKA_PORT>
#   DATABASE_URL=postgresql+asyncpg://bizcenter:bizcenter@127.0.0.1:<PG_PORT>/bizcenter
#   BIZ_ENVIRONMENT=development (the development secrets are accepted on this machine)
# (or the DATABASE_URL given by the environment, which is then only checked).
# Idempotent: services already running are left as they are. Stop them with infra/down.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_PORT="${KAFKA_PORT:-19092}"
PG_PORT="${PG_PORT:-15432}"
export KAFKA_PORT PG_PORT
started=$SECONDS

"$ROOT/infra/kafka.sh" fetch

# PostgreSQL starts alongside Kafka; both must succeed.
"$ROOT/infra/postgres.sh" start &
pg_job=$!
kafka_rc=0
"$ROOT/infra/kafka.sh" start || kafka_rc=$?
pg_rc=0
wait "$pg_job" || pg_rc=$?
((kafka_rc == 0)) || { echo "up: Kafka did not start (exit $kafka_rc)" >&2; exit 1; }
((pg_rc == 0)) || { echo "up: PostgreSQL did not start (exit $pg_rc)" >&2; exit 1; }

database_url="${DATABASE_URL:-postgresql+asyncpg://bizcenter:bizcenter@127.0.0.1:$PG_PORT/bizcenter}"
mkdir -p "$ROOT/.local"
{
    printf 'KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:%s\nDATABASE_URL=%s\n' "$KAFKA_PORT" "$database_url"
    printf '%s\n' \
        '# A local system: the development secrets (app/settings.py DEV_*) are accepted.' \
        '# Production is the default and refuses them; see README "Secrets in production".' \
        'BIZ_ENVIRONMENT=development'
} >"$ROOT/.local/env.tmp"
mv "$ROOT/.local/env.tmp" "$ROOT/.local/env"
echo "up: services ready in $((SECONDS - started)) s; settings in .local/env" >&2
