#!/usr/bin/env bash
# Proof at scale: the load and fault suite (lablink-proof) against the real server
# binary, two replicas on one PostgreSQL, real lablink-agent processes. Loopback only.
#
#   scripts/proof.sh            # the short profile (CI's; about 3 minutes)
#   scripts/proof.sh full       # the full profile (about 15 minutes: a 10-minute soak)
#   scripts/proof.sh full soak  # only some parts: workloads, soak, fuzz (full only);
#                               # an unknown part is refused (exit status 2)
#
# Builds what it needs (release: the server with PostgreSQL, the proof harness, the agent),
# then starts a throwaway PostgreSQL cluster of its own (the suite restarts it as one of
# its faults, so an outside DATABASE_URL is not used) and runs the suite. Results are
# printed; the exit status is non-zero if any check fails. Figures: BENCHMARKS.md
# ("Proof at scale") and RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 [ci|full] [workloads] [soak] [fuzz]  (fuzz: full profile only)" >&2
    exit 2
}
PROFILE=${1:-ci}
case "$PROFILE" in
    ci | full) ;;
    *) usage ;;
esac
shift || true
# Parts: none means all. Unknown parts are refused, not skipped.
PARTS=()
FUZZ=0
if [ $# -eq 0 ] && [ "$PROFILE" = full ]; then
    FUZZ=1
fi
for part in "$@"; do
    case "$part" in
        workloads | soak) PARTS+=("$part") ;;
        fuzz)
            if [ "$PROFILE" != full ]; then
                echo "$0: the fuzz part belongs to the full profile (the test suite fuzzes the short one)" >&2
                usage
            fi
            FUZZ=1
            ;;
        *)
            echo "$0: unknown part '$part'" >&2
            usage
            ;;
    esac
done

cargo build --release --features postgres --bin lablink
cargo build --release -p lablink-proof -p lablink-agent
TARGET=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# W2 holds thousands of connections; the soak runs hundreds of agent processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
unset DATABASE_URL
status=0
# The proof binary runs every part when given none: only fuzz asked for means no proof run.
if [ $# -eq 0 ] || [ ${#PARTS[@]} -gt 0 ]; then
    bash scripts/with-postgres.sh "$TARGET/release/proof" "$PROFILE" ${PARTS[@]+"${PARTS[@]}"} || status=$?
fi

# The full profile also fuzzes the HTTP edge with more inputs per route than the test
# suite's 100 (lablink-testkit/tests/http_fuzz.rs prints how many were tried).
if [ "$FUZZ" = 1 ]; then
    LABLINK_FUZZ_PER_ROUTE=${LABLINK_FUZZ_PER_ROUTE:-1000} cargo test --release -p lablink-testkit \
        --test http_fuzz every_route_gets_its_share_of_random_inputs -- --nocapture || status=$?
fi
exit "$status"
