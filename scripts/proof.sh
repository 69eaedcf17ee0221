#!/usr/bin/env bash
# Proof at scale: the load and fault suite (examples/proof.rs) against the real server
# binary, two replicas on one PostgreSQL, real lablink-agent processes. Loopback only.
#
#   scripts/proof.sh            # the short profile (CI's; about 3 minutes)
#   scripts/proof.sh full       # the full profile (about 15 minutes: a 10-minute soak)
#   scripts/proof.sh full soak  # only some parts: workloads, soak, fuzz (full only)
#
# Builds what it needs (release: the server with PostgreSQL, the proof example, the agent),
# then starts a throwaway PostgreSQL cluster of its own (the suite restarts it as one of
# its faults, so an outside DATABASE_URL is not used) and runs the suite. Results are
# printed; the exit status is non-zero if any check fails. Figures: BENCHMARKS.md
# ("Proof at scale") and RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${1:-ci}
case "$PROFILE" in
    ci | full) ;;
    *)
        echo "usage: $0 [ci|full] [workloads] [soak]" >&2
        exit 2
        ;;
esac
shift || true

cargo build --release --features postgres --example server --example proof
cargo build --release -p lablink-agent
TARGET=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# W2 holds thousands of connections; the soak runs hundreds of agent processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
unset DATABASE_URL
status=0
bash scripts/with-postgres.sh "$TARGET/release/examples/proof" "$PROFILE" "$@" || status=$?

# The full profile also fuzzes the HTTP edge with more inputs per route than the test
# suite's 100 (tests/http_fuzz.rs prints how many were tried).
if [ "$PROFILE" = full ] && { [ $# -eq 0 ] || [[ " $* " == *" fuzz "* ]]; }; then
    LABLINK_FUZZ_PER_ROUTE=${LABLINK_FUZZ_PER_ROUTE:-1000} cargo test --release --features server \
        --test http_fuzz every_route_gets_its_share_of_random_inputs -- --nocapture || status=$?
fi
exit "$status"
