#!/usr/bin/env bash
# The Terraform provisioner's own overhead: VMS client VMs of the shipped AWS module
# (lablink-terraform/terraform/aws) launched and destroyed on the AWS emulator, once through
# `lablink serve` ([provisioner] kind = "terraform": admin launch → operation succeeded,
# destroy all → succeeded) and once by bare `terraform init` + `terraform apply` of the same
# module (vms = 50, then vms = {}). Each repetition uses fresh working directories and
# deployment names; the order alternates (bare first in odd repetitions).
#
#   cargo build --bin lablink --all-features
#   scripts/with-moto.sh scripts/bench-terraform.sh [VMS=50] [REPS=2]
#
# Environment: LABLINK_BIN (default target/debug/lablink), LABLINK_TF_PLUGIN_MIRROR (the
# provider mirror holding hashicorp/aws, default /opt/tf-plugins).
set -euo pipefail

VMS=${1:-50}
REPS=${2:-2}
: "${AWS_ENDPOINT_URL:?run this through scripts/with-moto.sh}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LABLINK=${LABLINK_BIN:-$ROOT/target/debug/lablink}
MODULE=$ROOT/lablink-terraform/terraform/aws
MIRROR=${LABLINK_TF_PLUGIN_MIRROR:-/opt/tf-plugins}
PASSWORD=lablink-bench-$RANDOM$RANDOM

TMP=$(mktemp -d -t lablink-tfbench.XXXXXX)
SERVER_PID=
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf 'provider_installation {\n  filesystem_mirror {\n    path = "%s"\n  }\n}\n' \
    "$MIRROR" >"$TMP/terraform.rc"
# The provisioner sets these for its runs; the bare runs get the same.
export TF_CLI_CONFIG_FILE=$TMP/terraform.rc TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
AMI=$(python3 -c "import boto3; print(boto3.client('ec2', endpoint_url='$AWS_ENDPOINT_URL', \
region_name='us-east-1').describe_images(Owners=['amazon'])['Images'][0]['ImageId'])")

now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

# Runs a command with its output in a log, shown only if it fails.
quiet() {
    "$@" >"$TMP/last.log" 2>&1 || { tail -n 40 "$TMP/last.log" >&2; return 1; }
}

# tfvars DIR DEPLOYMENT N: the module's variables with N VMs (hostname => {token}).
tfvars() {
    python3 - "$@" "$AMI" >"$1/terraform.tfvars.json" <<'EOF'
import json, secrets, sys
_, _, deployment, n, ami = sys.argv
print(json.dumps({"allocator_url": "http://127.0.0.1:9", "region": "us-east-1",
                  "client_ami_id": ami, "deployment": deployment,
                  "vms": {f"vm-{i}": {"token": secrets.token_urlsafe(32)}
                          for i in range(1, int(n) + 1)}}, indent=2))
EOF
}

bare() {
    local dir=$TMP/bare-$1 t0 t1 t2 t3 t4
    mkdir "$dir" && cp "$MODULE"/* "$dir"
    tfvars "$dir" "tfbench-bare-$1-$$" "$VMS"
    t0=$(now)
    quiet terraform -chdir="$dir" init -no-color -input=false
    t1=$(now)
    quiet terraform -chdir="$dir" apply -no-color -input=false -auto-approve -lock-timeout=0s
    t2=$(now)
    quiet terraform -chdir="$dir" output -no-color -json # what the provisioner reads 3 times
    BARE_OUTPUT=$(secs "$t2" "$(now)")
    tfvars "$dir" "tfbench-bare-$1-$$" 0
    t3=$(now)
    quiet terraform -chdir="$dir" apply -no-color -input=false -auto-approve -lock-timeout=0s
    t4=$(now)
    echo "rep $1 bare:    init $(secs "$t0" "$t1") s, apply $VMS $(secs "$t1" "$t2") s," \
        "init+apply $(secs "$t0" "$t2") s, apply vms={} $(secs "$t3" "$t4") s;" \
        "output -json $BARE_OUTPUT s"
    BARE_LAUNCH=$(secs "$t0" "$t2") BARE_DESTROY=$(secs "$t3" "$t4")
}

# api METHOD PATH [BODY]: an admin API call; its JSON answer.
api() {
    curl -fsS -u "admin:$PASSWORD" -X "$1" -H 'content-type: application/json' \
        ${3:+--data "$3"} "$BASE$2"
}

# Waits until operation $1 has finished; fails unless it succeeded.
wait_op() {
    local status
    while status=$(api GET "/api/v1/operations/$1" | jq -r .status) && [[ $status == running ]]; do
        sleep 0.5
    done
    [[ $status == succeeded ]] || { api GET "/api/v1/operations/$1" >&2; return 1; }
}

served() {
    local dir=$TMP/lablink-$1 t0 t1 t2
    mkdir "$dir"
    cat >"$dir/lablink.toml" <<EOF
[provisioner]
kind = "terraform"
working_dir = "$dir/work"
deployment = "tfbench-lablink-$1-$$"
timeout_seconds = 1800
[provisioner.variables]
allocator_url = "http://127.0.0.1:9"
region = "us-east-1"
client_ami_id = "$AMI"
# The reconcile at start-up would run init (and an output read) before the launch.
[allocator.supervisor.reconcile]
enabled = false
EOF
    : >"$dir/out.log"
    # The runner's debug lines say when each terraform run starts (the timeline below).
    LABLINK_SERVER__LISTEN=127.0.0.1:0 LABLINK_ADMIN__PASSWORD=$PASSWORD \
        LABLINK_LOG__FORMAT=json LABLINK_LOG__FILTER=info,lablink_terraform::runner=debug \
        "$LABLINK" serve --config "$dir/lablink.toml" >"$dir/out.log" 2>"$dir/err.log" &
    SERVER_PID=$!
    until BASE=$(sed -n 's/^LabLink allocator listening on //p' "$dir/out.log") && [[ -n $BASE ]]; do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$dir/err.log" >&2; return 1; }
        sleep 0.2
    done
    api GET /api/v1/operations >/dev/null # the first sign-in verifies the argon2 hash (~1 s in debug)
    t0=$(now)
    wait_op "$(api POST /api/v1/launch "{\"count\": $VMS}" | jq -r .id)"
    t1=$(now)
    wait_op "$(api POST /api/v1/destroy '{"all": true}' | jq -r .id)"
    t2=$(now)
    kill "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=
    echo "rep $1 lablink: launch $VMS $(secs "$t0" "$t1") s, destroy all $(secs "$t1" "$t2") s"
    # When each terraform run of the server started, in seconds after the launch request.
    echo "rep $1 lablink terraform runs: $(jq -rs --argjson t0 "$t0" --argjson t1 "$t1" '
        map(select(.fields.message == "running terraform")
            | (.timestamp | capture("(?<s>[^.]*)(?<f>[.][0-9]+)Z")) as $t
            | {c: .fields.command, at: (($t.s + "Z" | fromdate) + ($t.f | tonumber) - $t0)})
        | [map(select(.at < $t1 - $t0)), map(select(.at >= $t1 - $t0))]
        | map(map("\(.c)@\(.at * 10 | round / 10)") | join(" "))
        | "launch: \(.[0]); destroy: \(.[1])"' "$dir/err.log")"
    SERVED_LAUNCH=$(secs "$t0" "$t1") SERVED_DESTROY=$(secs "$t1" "$t2")
}

echo "$VMS VMs, $REPS repetitions; emulator $AWS_ENDPOINT_URL, AMI $AMI, $("$LABLINK" --version)"
for rep in $(seq 1 "$REPS"); do
    if ((rep % 2)); then bare "$rep"; served "$rep"; else served "$rep"; bare "$rep"; fi
    echo "rep $rep load average: $(cut -d ' ' -f 1-3 /proc/loadavg)"
    echo "rep $rep lablink / bare: launch $(ratio "$SERVED_LAUNCH" "$BARE_LAUNCH")" \
        "(vs init+apply), destroy $(ratio "$SERVED_DESTROY" "$BARE_DESTROY")"
done
