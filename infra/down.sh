#!/usr/bin/env bash
# Stop the local services started by infra/up.sh. Both are stopped even if one fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rc=0
"$ROOT/infra/kafka.sh" stop || rc=1
"$ROOT/infra/postgres.sh" stop || rc=1
exit "$rc"
