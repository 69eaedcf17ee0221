#!/usr/bin/env bash
# Installs or finds every real component the tests need, so that `bash scripts/test.sh` passes
# on a fresh machine with nothing installed beforehand. Sourced by scripts/test.sh and .ci/run
# (it exports PATH); run on its own, it only installs and checks.
#
# - PostgreSQL 15 server binaries (/usr/lib/postgresql/*/bin): must be there; the tests start
#   a throwaway cluster with scripts/with-postgres.sh.
# - terraform on PATH, with the hashicorp/aws provider mirror the Terraform tests use.
# - Chromium and ChromeDriver for the browser tests: Debian's chromium and chromium-driver.
# - systemd-analyze, which checks the shipped systemd unit: Debian's systemd.
# - The browser desktop's VNC server and picture tools: Debian's tigervnc-standalone-server
#   (Xvnc), tigervnc-tools (vncpasswd, to check the agent's password files),
#   x11-xserver-utils (xsetroot) and xdotool; noVNC from npm, the exact version pinned in
#   desktop/package-lock.json, installed into desktop/node_modules by `npm ci`.
# - The AWS API emulator moto_server: moto[server] from PyPI, one pinned version.
# Anything missing that cannot be installed stops here with a message naming it.

# One moto version for every run: 5.2.1 answers CompleteMultipartUpload with a root element
# the SDK rejects, so "newest" would make the multipart tests depend on the install day.
LABLINK_MOTO_VERSION=5.2.5

lablink_components() {
    local missing=()
    command -v terraform >/dev/null || missing+=("terraform (the Terraform provisioner tests run the real binary)")
    [[ -d "${LABLINK_TF_PLUGIN_MIRROR:-/opt/tf-plugins}/registry.terraform.io/hashicorp/aws" ]] \
        || missing+=("the hashicorp/aws provider in the filesystem mirror ${LABLINK_TF_PLUGIN_MIRROR:-/opt/tf-plugins} (set LABLINK_TF_PLUGIN_MIRROR)")
    ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 \
        || missing+=("PostgreSQL server binaries in /usr/lib/postgresql/*/bin (Debian: postgresql)")
    if ((${#missing[@]})); then
        printf 'scripts/components.sh: missing: %s\n' "${missing[@]}" >&2
        return 1
    fi
    local packages=()
    command -v chromium >/dev/null || packages+=(chromium)
    command -v chromedriver >/dev/null || packages+=(chromium-driver)
    command -v systemd-analyze >/dev/null || packages+=(systemd)
    command -v Xvnc >/dev/null || packages+=(tigervnc-standalone-server)
    command -v vncpasswd >/dev/null || packages+=(tigervnc-tools)
    command -v xsetroot >/dev/null || packages+=(x11-xserver-utils)
    command -v xdotool >/dev/null || packages+=(xdotool)
    command -v npm >/dev/null || packages+=(npm)
    if ((${#packages[@]})); then
        echo "scripts/components.sh: installing ${packages[*]} from Debian's packages" >&2
        local sudo=()
        [[ $(id -u) == 0 ]] || sudo=(sudo)
        if ! { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq >/dev/null \
            && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null; }; then
            echo "scripts/components.sh: could not install ${packages[*]}" >&2
            return 1
        fi
    fi
    lablink_novnc || return 1
    if [[ "$(python3 -m pip show moto 2>/dev/null | sed -n 's/^Version: //p')" != "$LABLINK_MOTO_VERSION" ]]; then
        echo "scripts/components.sh: installing the AWS emulator moto_server $LABLINK_MOTO_VERSION" >&2
        python3 -m pip install --quiet "moto[server]==$LABLINK_MOTO_VERSION" \
            || { echo "scripts/components.sh: could not pip install moto[server]==$LABLINK_MOTO_VERSION" >&2; return 1; }
    fi
    # pip puts moto_server in the interpreter's scripts directory; a pyenv Python has no shim
    # for it until a rehash, so put that directory on PATH.
    PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
    export PATH
    command -v moto_server >/dev/null \
        || { echo "scripts/components.sh: moto_server is not on PATH after installing moto[server]" >&2; return 1; }
}

# noVNC, as desktop/package-lock.json pins it, in desktop/node_modules (git-ignored): the
# browser desktop tests serve it, the release tarball carries it. Installed again only when
# the lock file changed since.
lablink_novnc() {
    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    local installed="$repo/desktop/node_modules/.package-lock.json"
    if [[ ! -f "$repo/desktop/node_modules/@novnc/novnc/core/rfb.js" \
        || "$repo/desktop/package-lock.json" -nt "$installed" ]]; then
        echo "scripts/components.sh: installing noVNC (npm ci --prefix desktop)" >&2
        npm ci --prefix "$repo/desktop" --ignore-scripts --no-audit --no-fund >/dev/null \
            || { echo "scripts/components.sh: could not install noVNC (npm ci --prefix desktop)" >&2; return 1; }
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    lablink_components
    terraform version | sed -n 1p  # sed reads all of it: head would close the pipe early (SIGPIPE under pipefail)
    chromium --version
    moto_server --version 2>/dev/null || true
fi
