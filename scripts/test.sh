#!/usr/bin/env bash
# Runs every test of the workspace against real components: a throwaway PostgreSQL (unless
# DATABASE_URL is set), a throwaway AWS emulator moto_server (unless LABLINK_AWS_TEST_ENDPOINT
# is set), the terraform binary, Chromium for the admin UI.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/with-postgres.sh bash scripts/with-moto.sh \
    cargo test --workspace --all-features --no-fail-fast "$@"
