#!/usr/bin/env bash
# Regenerates the committed offline data of lablink-postgres's compile-time checked queries
# (lablink-postgres/.sqlx, one JSON file per statement), or checks that it is up to date.
#
#   scripts/sqlx-prepare.sh           rewrite lablink-postgres/.sqlx
#   scripts/sqlx-prepare.sh --check   fail if lablink-postgres/.sqlx differs from what the
#                                     current SQL and migrations give (CI runs this)
#
# Builds never need a database: .cargo/config.toml sets SQLX_OFFLINE=true, so the sqlx
# macros read lablink-postgres/.sqlx. This script creates a fresh database (on the server in
# DATABASE_URL, or on a throwaway cluster from scripts/with-postgres.sh when it is unset),
# applies lablink-postgres/migrations/*.sql to it, and compiles lablink-postgres with the
# macros online (SQLX_OFFLINE=false) and SQLX_OFFLINE_DIR set, which makes every macro write
# its query's data there (what `cargo sqlx prepare` does, without needing sqlx-cli).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=write
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

if [[ -z "${DATABASE_URL:-}" ]]; then
    exec bash scripts/with-postgres.sh bash "$0" "$@"
fi

PSQL=psql
if [[ -n "${LABLINK_PG_BIN:-}" && -x "$LABLINK_PG_BIN/psql" ]]; then
    PSQL="$LABLINK_PG_BIN/psql"
fi
command -v "$PSQL" >/dev/null || { echo "$0: psql is needed (PostgreSQL client)" >&2; exit 1; }

DB="lablink_sqlx_prepare_$$"
# The same server, database $DB (the URL's path is the database name).
BASE="${DATABASE_URL%%\?*}"
DB_URL="${BASE%/*}/$DB"
OUT=$(mktemp -d -t lablink-sqlx.XXXXXX)
cleanup() {
    rm -rf "$OUT"
    "$PSQL" -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$PSQL" -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "CREATE DATABASE $DB" >/dev/null
for migration in lablink-postgres/migrations/*.sql; do
    "$PSQL" -q -v ON_ERROR_STOP=1 --single-transaction "$DB_URL" -f "$migration" >/dev/null
done

# The macros run only when the crate is compiled: make cargo recompile it.
touch lablink-postgres/src/*.rs
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$OUT" DATABASE_URL="$DB_URL" \
    cargo check --quiet -p lablink-postgres --lib
# The next ordinary build compiles it again, offline.
touch lablink-postgres/src/*.rs

if ! ls "$OUT"/query-*.json >/dev/null 2>&1; then
    echo "$0: the build wrote no query data to $OUT" >&2
    exit 1
fi

if [[ $MODE == check ]]; then
    if ! diff -r "$OUT" lablink-postgres/.sqlx; then
        echo "$0: lablink-postgres/.sqlx is stale: run scripts/sqlx-prepare.sh and commit it" >&2
        exit 1
    fi
    echo "lablink-postgres/.sqlx matches the SQL ($(ls "$OUT" | wc -l) statements)"
else
    mkdir -p lablink-postgres/.sqlx
    rm -f lablink-postgres/.sqlx/query-*.json
    cp "$OUT"/query-*.json lablink-postgres/.sqlx/
    echo "wrote $(ls "$OUT" | wc -l) statements to lablink-postgres/.sqlx"
fi
