#!/usr/bin/env bash
# Runs every test of the workspace against real components: a throwaway PostgreSQL (unless
# DATABASE_URL is set), the terraform binary, Chromium for the admin UI.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/with-postgres.sh cargo test --workspace --all-features --no-fail-fast "$@"
