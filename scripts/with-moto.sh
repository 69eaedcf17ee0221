#!/usr/bin/env bash
# Runs a command with AWS_ENDPOINT_URL pointing at an AWS API emulator (moto_server).
#
#   scripts/with-moto.sh cargo test -p lablink-aws
#
# If LABLINK_AWS_TEST_ENDPOINT is set, it is used as is (an emulator you started). Otherwise a
# throwaway `moto_server` is started on a free 127.0.0.1 port and stopped when the command
# exits. A real AWS endpoint is never used: AWS_ENDPOINT_URL is always the emulator.
#
# Exports for the command: AWS_ENDPOINT_URL, LABLINK_AWS_TEST_ENDPOINT (the same URL),
# AWS_REGION/AWS_DEFAULT_REGION (us-east-1 unless set) and dummy credentials
# (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); shared AWS config files are ignored.
#
# Environment:
#   MOTO_SERVER  the moto_server binary (default: moto_server on PATH; install it with
#                pip install "moto[server]")
#   MOTO_PORT    port for the throwaway server (default: the first free port from 55600)
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <command> [args...]" >&2
    exit 2
fi

export AWS_ACCESS_KEY_ID=lablink-test AWS_SECRET_ACCESS_KEY=lablink-test
unset AWS_SESSION_TOKEN AWS_PROFILE
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
export AWS_REGION=${AWS_REGION:-us-east-1}
export AWS_DEFAULT_REGION=$AWS_REGION
# moto refuses unknown AMIs only when asked to (the bad-AMI error test needs it).
export MOTO_ENABLE_AMI_VALIDATION=true

if [[ -n "${LABLINK_AWS_TEST_ENDPOINT:-}" ]]; then
    export AWS_ENDPOINT_URL=$LABLINK_AWS_TEST_ENDPOINT
    exec "$@"
fi

MOTO=${MOTO_SERVER:-moto_server}
if ! command -v "$MOTO" >/dev/null 2>&1; then
    echo "$0: LABLINK_AWS_TEST_ENDPOINT is not set and $MOTO was not found;" \
        "install the AWS emulator with: pip install \"moto[server]\"" >&2
    exit 1
fi

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

LOG=$(mktemp -t lablink-moto.XXXXXX.log)
MOTO_PID=
cleanup() {
    if [[ -n "$MOTO_PID" ]]; then
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
    fi
    rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts moto_server on $1 and waits until it has bound the port (it says so in its log,
# so an emulator someone else started on the same port is never mistaken for ours) and
# answers; fails if it exits first.
start_moto() {
    "$MOTO" -H 127.0.0.1 -p "$1" >"$LOG" 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 1 150); do
        if grep -q "Running on http://127.0.0.1:$1" "$LOG" 2>/dev/null &&
            curl -fsS -o /dev/null "http://127.0.0.1:$1/moto-api/" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$MOTO_PID" 2>/dev/null; then
            wait "$MOTO_PID" 2>/dev/null || true
            MOTO_PID=
            return 1
        fi
        sleep 0.2
    done
    echo "$0: moto_server did not answer on port $1 within 30 s" >&2
    cat "$LOG" >&2
    exit 1
}

# Another script may take the same free port at the same moment: then try the next one.
PORT=${MOTO_PORT:-55600}
for _ in $(seq 1 50); do
    if port_free "$PORT" && start_moto "$PORT"; then
        break
    fi
    if [[ -n "${MOTO_PORT:-}" ]]; then
        echo "$0: moto_server could not start on port $PORT:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    PORT=$((PORT + 1))
done
if [[ -z "$MOTO_PID" ]]; then
    echo "$0: moto_server could not start on any port from ${MOTO_PORT:-55600}:" >&2
    cat "$LOG" >&2
    exit 1
fi

URL="http://127.0.0.1:$PORT"
export AWS_ENDPOINT_URL=$URL
export LABLINK_AWS_TEST_ENDPOINT=$URL
echo "$0: moto_server running at $URL" >&2
"$@"
