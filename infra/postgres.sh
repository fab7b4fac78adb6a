#!/usr/bin/env bash
# A private PostgreSQL cluster for development and tests, without Docker.
#
#   infra/postgres.sh start    start it (idempotent) and wait until it accepts connections
#   infra/postgres.sh stop     stop it (fast shutdown; immediate after PG_STOP_TIMEOUT)
#   infra/postgres.sh status   exit 0 = running and answering, 1 = not answering, 3 = stopped
#
# The cluster lives in <repo>/.local/pg (git-ignored): data/, run/ (unix socket),
# postgres.log. It listens on 127.0.0.1:$PG_PORT only, trusts 127.0.0.1, and has a role
# and database `bizcenter` (password `bizcenter`). Durability settings stay at their
# defaults (fsync, synchronous_commit, full_page_writes on).
#
# If DATABASE_URL is set (and is not this cluster's own URL), `start` only checks that
# database answers and starts nothing.
#
# Environment (all optional):
#   PG_PORT             15432
#   PG_BINDIR           directory holding initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin)
#   PG_START_TIMEOUT    60
#   PG_STOP_TIMEOUT     60
#   DATABASE_URL        an external database to use instead
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PG_PORT="${PG_PORT:-15432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-60}"
HOST=127.0.0.1
LOCAL="$ROOT/.local/pg"
DATA="$LOCAL/data"
SOCK="$LOCAL/run"
LOG="$LOCAL/postgres.log"
DB_USER=bizcenter
DB_PASSWORD=bizcenter
DB_NAME=bizcenter
OWN_URL="postgresql+asyncpg://$DB_USER:$DB_PASSWORD@$HOST:$PG_PORT/$DB_NAME"

log() { printf 'postgres: %s\n' "$*" >&2; }
die() { printf 'postgres: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- binaries

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        [[ -x "$PG_BINDIR/initdb" ]] || die "PG_BINDIR=$PG_BINDIR holds no initdb"
        return 0
    fi
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null \
        | sort -V | tail -n 1) || true
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then
        PG_BINDIR=$dir
    elif command -v initdb >/dev/null 2>&1; then
        PG_BINDIR=$(dirname "$(command -v initdb)")
    else
        return 1
    fi
}

ensure_binaries() {
    find_bindir && return 0
    if ! command -v apt-get >/dev/null 2>&1 || ((EUID != 0)); then
        die "PostgreSQL is not installed (no initdb); install it or set PG_BINDIR"
    fi
    log "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql postgresql-client </dev/null
    find_bindir || die "initdb still not found after installing postgresql"
}

# Run a server binary as the `postgres` user when we are root (postgres refuses root).
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ---------------------------------------------------------------- helpers

port_open() {
    # shellcheck disable=SC2016  # $0 and $1 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

# The postmaster pid, if our cluster's postmaster is alive.
our_pid() {
    local pid
    [[ -f "$DATA/postmaster.pid" ]] || return 1
    pid=$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DATA" ]] || return 1
    printf '%s\n' "$pid"
}

pg_tool() {  # client tools: prefer the cluster's own version, else PATH
    local tool=$1
    shift
    if [[ -n "${PG_BINDIR:-}" && -x "$PG_BINDIR/$tool" ]]; then
        "$PG_BINDIR/$tool" "$@"
    else
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install postgresql-client)"
        "$tool" "$@"
    fi
}

ready() {
    pg_tool pg_isready -q -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -t 2 >/dev/null 2>&1
}

tail_log() {
    if [[ -f "$LOG" ]]; then
        printf -- '--- last lines of %s ---\n' "$LOG" >&2
        tail -n 30 "$LOG" >&2
        printf -- '---\n' >&2
    fi
}

# The postgres user must be able to reach $LOCAL: grant search (x, not read) permission on
# any directory on the path that lacks it.
ensure_traversable() {
    local dir="" part
    local -a parts
    IFS=/ read -r -a parts <<<"${LOCAL#/}"
    for part in "${parts[@]}"; do     # top-down: a child can only be tested once its parent is
        dir="$dir/$part"
        [[ -d "$dir" ]] || break
        if ! runuser -u postgres -- test -x "$dir"; then
            log "granting o+x on $dir so that the postgres user can reach $LOCAL"
            chmod o+x "$dir"
        fi
    done
}

prepare_dirs() {
    mkdir -p "$LOCAL" "$SOCK"
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' system user"
        ensure_traversable
        chown postgres:postgres "$LOCAL" "$SOCK"
        [[ -d "$DATA" ]] && chown -R postgres:postgres "$DATA"
        touch "$LOG"
        chown postgres:postgres "$LOG"
    fi
    chmod 0700 "$SOCK"
}

init_cluster() {
    [[ -f "$DATA/PG_VERSION" ]] && return 0
    log "initdb ${DATA#"$ROOT"/}"
    rm -rf "$DATA"
    as_pg "$PG_BINDIR/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
        --no-instructions >/dev/null 9>&-
    # Durability stays at its defaults: this is a payments product.
    as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<'EOF'

# --- infra/postgres.sh ---
shared_buffers = 128MB
max_connections = 200
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = 'local_listen.conf'
EOF
    as_pg tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# Private development cluster: trusted over the unix socket and from 127.0.0.1 only.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  trust
EOF
}

# Rewritten on every start so that a changed PG_PORT takes effect.
write_listen_conf() {
    as_pg tee "$DATA/local_listen.conf" >/dev/null <<EOF
# Written by infra/postgres.sh on every start.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$SOCK'
EOF
}

ensure_role_and_db() {
    pg_tool psql -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U postgres -d postgres \
        >/dev/null <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
    CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
EOF
}

wait_ready() {
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    until ready; do
        if ((SECONDS >= deadline)); then
            tail_log
            die "no answer on $HOST:$PG_PORT within ${PG_START_TIMEOUT}s (log: $LOG)"
        fi
        sleep 0.3
    done
}

external_url() {  # DATABASE_URL set and pointing somewhere else than this cluster
    [[ -n "${DATABASE_URL:-}" && "$DATABASE_URL" != "$OWN_URL" ]]
}

check_external() {
    local url=${DATABASE_URL/#postgresql+asyncpg:/postgresql:}
    url=${url/#postgres+asyncpg:/postgresql:}
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    find_bindir || true
    until pg_tool psql -X -q -At "$url" -c 'select 1' >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            pg_tool psql -X -q -At "$url" -c 'select 1' >/dev/null || true
            die "DATABASE_URL does not answer (unset it to use the private cluster)"
        fi
        sleep 1
    done
    log "using DATABASE_URL from the environment; it answers"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    if external_url; then
        check_external
        return 0
    fi
    mkdir -p "$LOCAL"
    exec 9>"$LOCAL/.start.lock"
    flock -w $((PG_START_TIMEOUT + 60)) 9 || die "another start holds $LOCAL/.start.lock"

    ensure_binaries
    local pid started=$SECONDS running_port
    if pid=$(our_pid); then
        running_port=$(sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)
        if [[ "$running_port" != "$PG_PORT" ]]; then
            die "our cluster (pid $pid) already runs on port ${running_port:-?}, not" \
                "PG_PORT=$PG_PORT; run 'infra/postgres.sh stop' first to change ports"
        fi
        wait_ready
        ensure_role_and_db
        log "already running (pid $pid) on $HOST:$PG_PORT"
        return 0
    fi
    if port_open "$PG_PORT"; then
        die "port $PG_PORT on $HOST is taken by another program (not our cluster);" \
            "set PG_PORT to a free port"
    fi
    prepare_dirs
    init_cluster
    write_listen_conf
    [[ -f "$LOG" ]] && [[ -s "$LOG" ]] && cp -f "$LOG" "$LOG.1" && : >"$LOG"
    # pg_ctl puts the postmaster in its own session (Ctrl-C in this terminal spares it).
    if ! as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$PG_START_TIMEOUT" \
        start >/dev/null 9>&-; then
        tail_log
        die "pg_ctl start failed (log: $LOG)"
    fi
    wait_ready
    ensure_role_and_db
    pid=$(our_pid) || die "postmaster not found after start"
    log "ready on $HOST:$PG_PORT (pid $pid) after $((SECONDS - started)) s"
}

cmd_stop() {
    local pid
    if ! pid=$(our_pid); then
        log "not running"
        return 0
    fi
    find_bindir || die "pg_ctl not found"
    log "stopping (pid $pid)"
    if ! as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" -m fast -w -t "$PG_STOP_TIMEOUT" stop >/dev/null; then
        log "fast shutdown timed out; immediate shutdown"
        as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" -m immediate -w -t 20 stop >/dev/null || true
    fi
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && die "postmaster $pid is still running"
    log "stopped"
}

cmd_status() {
    if external_url; then
        local url=${DATABASE_URL/#postgresql+asyncpg:/postgresql:}
        find_bindir || true
        if pg_tool psql -X -q -At "$url" -c 'select 1' >/dev/null 2>&1; then
            echo "postgres: external DATABASE_URL answers"
            return 0
        fi
        echo "postgres: external DATABASE_URL does NOT answer"
        return 1
    fi
    local pid
    if ! pid=$(our_pid); then
        echo "postgres: not running"
        return 3
    fi
    find_bindir || true
    if ready; then
        echo "postgres: running (pid $pid), answering on $HOST:$PG_PORT"
        return 0
    fi
    echo "postgres: running (pid $pid), NOT answering on $HOST:$PG_PORT"
    return 1
}

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
