#!/bin/bash
# LabLink client VM start-up (lablink-aws). One script serves a whole RunInstances batch: each
# VM finds its own row by its launch index. A row holds the VM's hostname and its agent token
# sealed with a one-time pad; the pad is a tag on that instance only, and the instance metadata
# service shows an instance its own tags only, so no VM of the batch can read another's token.
set -Eeuo pipefail
umask 077

IMDS=http://169.254.169.254/latest
PAD_TAG=@@PAD_TAG@@
# Every file is written under LABLINK_ROOT (empty on a VM; a scratch directory in tests).
ROOT="${LABLINK_ROOT:-}"
AGENT="$ROOT/usr/local/bin/lablink-agent"
ALLOCATOR_URL_B64='@@ALLOCATOR_URL_B64@@'
AGENT_URL_B64='@@AGENT_URL_B64@@'
AGENT_SHA256='@@AGENT_SHA256@@'
# Extra agent environment: one "NAME base64(value)" per line.
EXTRA_ENV='
@@EXTRA_ENV@@'
# One "launch-index hostname base64(token XOR pad)" per line.
ROWS='
@@ROWS@@'

# To stderr (cloud-init keeps it in /var/log/cloud-init-output.log, which the agent ships)
# and to the journal. Never given a secret.
log() {
  echo "lablink: $*" >&2
  echo "lablink: $*" | systemd-cat -t lablink-user-data 2>/dev/null || true
}

# --- helpers ---
decode() { printf '%s' "$1" | base64 -d; }
hex() { base64 -d | od -An -v -tx1 | tr -d ' \n'; }
# open_token SEALED PAD: the token, i.e. the bytes of SEALED XOR PAD (both base64).
open_token() {
  local sealed pad out='' i
  sealed=$(printf '%s' "$1" | hex)
  pad=$(printf '%s' "$2" | hex)
  [ "${#sealed}" -eq "${#pad}" ] || return 1
  for ((i = 0; i < ${#sealed}; i += 2)); do
    out+=$(printf '\\x%02x' $((16#${sealed:i:2} ^ 16#${pad:i:2})))
  done
  printf '%b' "$out"
}
# --- end helpers ---

imds() {
  local session
  session=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$IMDS/api/token") || return 1
  curl -fsS -H "X-aws-ec2-metadata-token: $session" "$IMDS/meta-data/$1"
}

# 1. Who am I: my row, and my pad (tagged right after launch; wait for it).
INDEX=$(imds ami-launch-index)
read -r _ VM_NAME SEALED <<<"$(printf '%s\n' "$ROWS" | awk -v i="$INDEX" '$1 == i')" || true
if [ -z "${VM_NAME:-}" ] || [ -z "${SEALED:-}" ]; then
  log "no row for launch index $INDEX"
  exit 1
fi
PAD=''
for _ in $(seq 1 180); do
  if PAD=$(imds "tags/instance/$PAD_TAG" 2>/dev/null) && [ -n "$PAD" ]; then
    break
  fi
  sleep 5
done
if [ -z "$PAD" ]; then
  log "$VM_NAME: the $PAD_TAG tag never appeared; is InstanceMetadataTags enabled?"
  exit 1
fi
API_TOKEN=$(open_token "$SEALED" "$PAD")
ALLOCATOR_URL=$(decode "$ALLOCATOR_URL_B64")
AGENT_URL=$(decode "$AGENT_URL_B64")

# 2. The agent binary, checked before it is installed.
if [ -n "$AGENT_URL" ]; then
  log "downloading the agent"
  install -d -m 0755 "$(dirname "$AGENT")"
  curl -fsSL --retry 5 --retry-delay 3 -o "$AGENT.download" "$AGENT_URL"
  if [ -n "$AGENT_SHA256" ]; then
    ACTUAL=$(sha256sum "$AGENT.download" | cut -d' ' -f1)
    if [ "$ACTUAL" != "$AGENT_SHA256" ]; then
      rm -f "$AGENT.download"
      log "the downloaded agent's SHA-256 is $ACTUAL, not the expected $AGENT_SHA256: not installed"
      exit 1
    fi
  fi
  install -m 0755 "$AGENT.download" "$AGENT"
  rm -f "$AGENT.download"
fi
if [ ! -x "$AGENT" ]; then
  log "no agent at $AGENT and no agent download URL"
  exit 1
fi

# 3. The agent's environment: readable by root only, each value shell-quoted.
install -d -m 0700 "$ROOT/etc/lablink"
{
  printf 'ALLOCATOR_URL=%q\n' "$ALLOCATOR_URL"
  printf 'VM_NAME=%q\n' "$VM_NAME"
  printf 'API_TOKEN=%q\n' "$API_TOKEN"
  printf '%s\n' "$EXTRA_ENV" | while read -r name value; do
    if [ -n "$name" ]; then
      printf '%s=%q\n' "$name" "$(decode "$value")"
    fi
  done
} > "$ROOT/etc/lablink/agent.env"
chmod 0600 "$ROOT/etc/lablink/agent.env"

# 4. The service: started now and on every boot, restarted if it exits.
install -d -m 0755 "$ROOT/etc/systemd/system"
cat > "$ROOT/etc/systemd/system/lablink-agent.service" <<'UNIT'
[Unit]
Description=LabLink agent
Wants=network-online.target
After=network-online.target docker.service

[Service]
ExecStart=/bin/bash -c 'set -a; . /etc/lablink/agent.env; set +a; exec /usr/local/bin/lablink-agent'
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now lablink-agent.service
log "agent started for $VM_NAME"
