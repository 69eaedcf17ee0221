#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a PostgreSQL server.
#
#   scripts/with-postgres.sh cargo test -p lablink-postgres
#
# If DATABASE_URL is already set, the command runs as is. Otherwise a throwaway cluster is
# created in a temporary directory (initdb, trust auth, 127.0.0.1 only), DATABASE_URL is
# exported for the command, and the cluster is stopped and deleted when the command exits.
#
# Environment:
#   PG_BIN             directory holding initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin)
#   PG_PORT            port for the throwaway cluster (default: a free port from 55433)
#   PG_MAX_CONNECTIONS max_connections of the throwaway cluster (default: 300)
#
# Exports for the command (throwaway cluster only): DATABASE_URL, LABLINK_PG_DATA (data
# directory), LABLINK_PG_BIN (binaries), so tests may restart the server.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <command> [args...]" >&2
    exit 2
fi

if [[ -n "${DATABASE_URL:-}" ]]; then
    exec "$@"
fi

if [[ -z "${PG_BIN:-}" ]]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
if [[ -z "${PG_BIN:-}" || ! -x "$PG_BIN/initdb" || ! -x "$PG_BIN/pg_ctl" ]]; then
    echo "$0: DATABASE_URL is not set and no PostgreSQL binaries were found" \
        "(set PG_BIN to the directory holding initdb and pg_ctl)" >&2
    exit 1
fi

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
next_free_port() {
    PORT=$1
    while ! port_free "$PORT"; do
        PORT=$((PORT + 1))
    done
}
if [[ -n "${PG_PORT:-}" ]]; then
    PORT=$PG_PORT
else
    next_free_port 55433
fi

# initdb and postgres refuse to run as root: run them as the postgres user then.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

DIR=$(mktemp -d -t lablink-pg.XXXXXX)
chmod 755 "$DIR"
if [[ $(id -u) -eq 0 ]]; then
    chown postgres "$DIR"
fi
DATA="$DIR/data"

cleanup() {
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_pg "$PG_BIN/initdb" --auth=trust --username=postgres -D "$DATA" >"$DIR/initdb.log" 2>&1 || {
    cat "$DIR/initdb.log" >&2
    exit 1
}
# Another run on this machine may take the port between the check and the start: then the
# next free port is tried (unless PG_PORT was given).
for attempt in 1 2 3 4 5; do
    if as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=${PG_MAX_CONNECTIONS:-300} -c fsync=off" \
        start >/dev/null; then
        break
    fi
    if [[ -n "${PG_PORT:-}" || $attempt -eq 5 ]]; then
        cat "$DIR/server.log" >&2
        exit 1
    fi
    next_free_port $((PORT + 1))
done
for _ in $(seq 1 100); do
    if as_pg "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
        break
    fi
    sleep 0.1
done

export DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
export LABLINK_PG_DATA="$DATA"
export LABLINK_PG_BIN="$PG_BIN"
echo "$0: PostgreSQL running at $DATABASE_URL" >&2
"$@"
