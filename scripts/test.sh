#!/usr/bin/env bash
# Runs every test of the workspace against real components, installing or starting each one
# first (scripts/components.sh): a throwaway PostgreSQL (unless DATABASE_URL is set), a
# throwaway AWS emulator moto_server (unless LABLINK_AWS_TEST_ENDPOINT is set), the terraform
# binary, Chromium and ChromeDriver for the browser tests, Python 3 for the hostile-command
# test (the Python client's own argparse).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/components.sh
lablink_components
exec bash scripts/with-postgres.sh bash scripts/with-moto.sh \
    cargo test --workspace --all-features --no-fail-fast "$@"
