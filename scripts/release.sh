#!/usr/bin/env bash
# Builds the release tarballs for people without a Rust toolchain:
#
#   dist/lablink-<version>-<target>.tar.gz        the allocator (default features + aws):
#       install.sh, bin/lablink, systemd/lablink.service, etc/lablink.toml (the embedded
#       default, commented), README.md, RELEASE (the tarball's name), novnc/ (the browser
#       desktop's noVNC, as desktop/package-lock.json pins it, with its licence files:
#       `[desktop] novnc_dir` names it)
#   dist/lablink-agent-<version>-<target>.tar.gz  the VM agent: bin/lablink-agent, README.md
#       (its systemd unit is written by the VMs' user-data, which downloads the bare binary:
#       host bin/lablink-agent and set agent_url and agent_sha256 under [provisioner])
#   dist/SHA256SUMS                               `sha256sum -c SHA256SUMS` checks both
#
# The binaries are built natively (no cross toolchain) with `cargo build --locked`. Built on
# Debian 12 (glibc 2.36) they need glibc >= 2.34 (the newest symbol version they reference,
# GLIBC_2.34: __libc_start_main and the pthread functions that moved into libc in 2.34), i.e.
# Debian 12, Ubuntu 22.04, RHEL/Rocky/Alma 9 or newer. The script prints what it measures
# (objdump -T). Built on another machine, the requirement is that machine's.
#
# Environment:
#   LABLINK_RELEASE_OUT       output directory (default: dist/ in the repository)
#   LABLINK_RELEASE_PROFILE   cargo profile (default: release; the test uses dev, the build
#                             the test run already made)
#   LABLINK_RELEASE_FEATURES  features for `cargo build --features` (default: lablink/aws);
#                             `all` builds with --all-features (what scripts/test.sh uses)
#   LABLINK_RELEASE_CARGO_ARGS more `cargo build` arguments, split on spaces (the test adds
#                             `--example server`: building an example unifies the
#                             dev-dependencies' features as `cargo test` does, so the build is
#                             the one the test run made, as in lablink-proof/tests/proof.rs)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${LABLINK_RELEASE_OUT:-$repo/dist}
profile=${LABLINK_RELEASE_PROFILE:-release}
features=${LABLINK_RELEASE_FEATURES:-lablink/aws}
cargo=${CARGO:-cargo}
read -r -a extra_args <<<"${LABLINK_RELEASE_CARGO_ARGS:-}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"

version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "release.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
target=$("${RUSTC:-rustc}" -vV | sed -n 's/^host: //p')
[ -n "$target" ] || { echo "release.sh: rustc -vV names no host target" >&2; exit 1; }

case $features in
  all) feature_args=(--all-features) ;;
  '') feature_args=() ;;
  *) feature_args=(--features "$features") ;;
esac

stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

echo "release.sh: building lablink and lablink-agent $version for $target (profile $profile, features: $features)" >&2
"$cargo" build --locked --profile "$profile" --workspace \
  --bin lablink --bin lablink-agent "${feature_args[@]}" "${extra_args[@]}" \
  --message-format=json-render-diagnostics >"$stage/build.json"

# The executables cargo reports (wherever the target directory is).
executable() {
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' "$stage/build.json" |
    awk -v name="$1" '{ n = split($0, p, "/"); if (p[n] == name) path = $0 } END { print path }'
}
lablink_bin=$(executable lablink)
agent_bin=$(executable lablink-agent)
for bin in "$lablink_bin" "$agent_bin"; do
  [ -x "$bin" ] || { echo "release.sh: cargo reported no executable ($bin)" >&2; exit 1; }
done

# The newest glibc symbol version the binaries reference: what they need at run time.
glibc=unknown
if command -v objdump >/dev/null; then
  glibc=$(objdump -T "$lablink_bin" "$agent_bin" | grep -o 'GLIBC_[0-9.]*' |
    sed 's/^GLIBC_//' | sort -uV | tail -n 1)
fi

# Reproducible archives: sorted names, root-owned, the last commit's time.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
pack() { # pack DIR NAME: DIR's contents, at the archive's top level, into $out/NAME.tar.gz
  (cd "$1" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -cf - -- *) |
    gzip -9n >"$out/$2.tar.gz"
}
docs() { # docs DIR: README and LICENSE, when the repository has them
  for doc in README.md LICENSE LICENSE.md LICENSE-MIT LICENSE-APACHE; do
    if [ -f "$doc" ]; then install -m 0644 "$doc" "$1/$doc"; fi
  done
}

server_name="lablink-$version-$target"
server="$stage/server"
install -d "$server/bin" "$server/etc" "$server/systemd" "$server/monitoring"
install -m 0755 "$lablink_bin" "$server/bin/lablink"
install -m 0755 deploy/install.sh "$server/install.sh"
install -m 0644 deploy/systemd/lablink.service "$server/systemd/lablink.service"
install -m 0644 deploy/lablink.toml "$server/etc/lablink.toml"
# For Prometheus and Grafana (docs/metrics.md in the repository describes the series).
install -m 0644 deploy/grafana/lablink-dashboard.json "$server/monitoring/lablink-dashboard.json"
install -m 0644 deploy/prometheus/lablink-alerts.yml "$server/monitoring/lablink-alerts.yml"
# The browser desktop's client: noVNC's ES modules as npm ships them (no build step), with
# its AUTHORS and licence files (MPL-2.0; its vendored pako is MIT).
novnc="$repo/desktop/node_modules/@novnc/novnc"
if [ ! -f "$novnc/core/rfb.js" ] || [ "$repo/desktop/package-lock.json" -nt "$repo/desktop/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$repo/desktop" --ignore-scripts --no-audit --no-fund >&2
fi
[ -f "$novnc/core/rfb.js" ] || { echo "release.sh: noVNC is not installed (npm ci --prefix desktop)" >&2; exit 1; }
install -d "$server/novnc"
cp -R "$novnc/core" "$novnc/vendor" "$server/novnc/"
for doc in LICENSE.txt AUTHORS README.md package.json; do
  install -m 0644 "$novnc/$doc" "$server/novnc/$doc"
done
if [ -d "$novnc/docs" ]; then
  install -d "$server/novnc/docs"
  find "$novnc/docs" -maxdepth 1 -name 'LICENSE*' -exec install -m 0644 {} "$server/novnc/docs/" \;
fi
echo "$server_name" >"$server/RELEASE"
docs "$server"
pack "$server" "$server_name"

agent_name="lablink-agent-$version-$target"
agent="$stage/agent"
install -d "$agent/bin"
install -m 0755 "$agent_bin" "$agent/bin/lablink-agent"
echo "$agent_name" >"$agent/RELEASE"
docs "$agent"
pack "$agent" "$agent_name"

(cd "$out" && sha256sum "$server_name.tar.gz" "$agent_name.tar.gz" >SHA256SUMS)

echo "release $version for $target (needs glibc >= $glibc):"
echo "  $out/$server_name.tar.gz"
echo "  $out/$agent_name.tar.gz"
echo "  $out/SHA256SUMS"
