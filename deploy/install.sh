#!/usr/bin/env bash
# Installs the LabLink allocator from an unpacked release tarball (scripts/release.sh):
#
#   install.sh [--prefix /usr/local] [--root DIR] [--no-systemd]
#
#   bin/lablink              -> ROOT PREFIX/bin/lablink
#   systemd/lablink.service  -> ROOT/etc/systemd/system/lablink.service (not with --no-systemd)
#   etc/lablink.toml         -> ROOT/etc/lablink/lablink.toml, mode 0640, only if there is none
#                               (an existing configuration is never touched)
#
# Check the tarball BEFORE unpacking it: `sha256sum --check --ignore-missing SHA256SUMS` in
# the directory holding both (and SHA256SUMS from a source you trust). This script runs from
# the unpacked tarball, so a tampered tarball would bring its own install.sh: the check it
# makes of a tarball still lying next to it only catches a damaged download. Run as root without --root on a systemd machine, it also
# creates the system user `lablink` and runs `systemctl daemon-reload`; with --root (a staging
# tree, a package build, a test) it never calls useradd or systemctl.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=/usr/local
root=
systemd=1

usage() {
  echo "usage: install.sh [--prefix /usr/local] [--root DIR] [--no-systemd]"
  echo "Check the release tarball against SHA256SUMS before unpacking it (sha256sum --check"
  echo "--ignore-missing SHA256SUMS): this script comes from the tarball and cannot vouch for it."
}
die() {
  echo "install.sh: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
    --root=*) root=${1#*=}; shift ;;
    --no-systemd) systemd=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case $prefix in
  /*) prefix=${prefix%/} ;;
  *) die "--prefix must be an absolute path, not $prefix" ;;
esac
# It goes into the unit's ExecStart= through sed: nothing but plain path characters.
case $prefix in
  *[!A-Za-z0-9/._-]*) die "--prefix may hold only letters, digits and '/', '.', '_', '-', not $prefix" ;;
esac
if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  [ "$root" != / ] || root=
  real=0
else
  [ "$(id -u)" -eq 0 ] || die "run as root to install into the system (or give --root DIR)"
  real=1
fi

for file in bin/lablink systemd/lablink.service etc/lablink.toml; do
  [ -f "$here/$file" ] || die "$here/$file is missing: run install.sh from an unpacked release"
done

# 1. The tarball against SHA256SUMS, when both are at hand. This only catches a damaged
#    download: it runs after unpacking, from the tarball itself (see the top).
release=$(cat "$here/RELEASE" 2>/dev/null || true)
checked=0
if [ -n "$release" ]; then
  for dir in "$here" "$here/.."; do
    if [ -f "$dir/SHA256SUMS" ] && [ -f "$dir/$release.tar.gz" ]; then
      line=$(grep -F "  $release.tar.gz" "$dir/SHA256SUMS" || true)
      [ -n "$line" ] || die "$dir/SHA256SUMS does not list $release.tar.gz"
      (cd "$dir" && printf '%s\n' "$line" | sha256sum --check --quiet -) ||
        die "$dir/$release.tar.gz does not match SHA256SUMS: download it again"
      echo "checksum OK: $dir/$release.tar.gz matches $dir/SHA256SUMS (a damaged download would" \
        "not; a tampered tarball brings its own install.sh: check it before unpacking it)"
      checked=1
      break
    fi
  done
fi
[ "$checked" -eq 1 ] || echo "no SHA256SUMS with the tarball next to $here: not checked here" \
  "(check the tarball with sha256sum --check --ignore-missing SHA256SUMS before unpacking it)"

# 2. The user the service runs as (a real install on a systemd machine only).
on_systemd=0
if [ "$real" -eq 1 ] && [ "$systemd" -eq 1 ] && [ -d /run/systemd/system ]; then
  on_systemd=1
  if ! getent passwd lablink >/dev/null; then
    nologin=$(command -v nologin || echo /bin/false)
    useradd --system --user-group --home-dir /var/lib/lablink --no-create-home \
      --shell "$nologin" --comment "LabLink allocator" lablink
    echo "created the system user lablink"
  fi
fi

# 3. The program.
bin="$root$prefix/bin"
install -d -m 0755 "$bin"
install -m 0755 "$here/bin/lablink" "$bin/lablink"
echo "installed $bin/lablink"

# 4. The configuration, never overwriting one.
etc="$root/etc/lablink"
install -d -m 0750 "$etc"
if [ -e "$etc/lablink.toml" ]; then
  echo "kept the existing $etc/lablink.toml (the sample is $here/etc/lablink.toml)"
else
  install -m 0640 "$here/etc/lablink.toml" "$etc/lablink.toml"
  # The service's group reads it (it holds the admin password hash and the database URL).
  if [ "$on_systemd" -eq 1 ]; then chgrp lablink "$etc" "$etc/lablink.toml"; fi
  echo "installed $etc/lablink.toml (the embedded defaults, commented)"
fi

# 5. The service.
if [ "$systemd" -eq 1 ]; then
  units="$root/etc/systemd/system"
  install -d -m 0755 "$units"
  sed "s#^ExecStart=/usr/local/bin/lablink #ExecStart=$prefix/bin/lablink #" \
    "$here/systemd/lablink.service" >"$units/lablink.service.tmp"
  chmod 0644 "$units/lablink.service.tmp"
  mv "$units/lablink.service.tmp" "$units/lablink.service"
  echo "installed $units/lablink.service"
  if [ "$on_systemd" -eq 1 ]; then
    systemctl daemon-reload
  fi
fi

config=/etc/lablink/lablink.toml
cat <<EOF

Next steps:
  1. Make the admin password hash (type the password, then Ctrl-D):
       $prefix/bin/lablink hash-password
     and put it in $config as [admin] password_hash.
  2. Edit $config (listen address, database, provisioner), then check it:
       $prefix/bin/lablink validate --config $config
EOF
if [ "$systemd" -eq 1 ]; then
  cat <<EOF
  3. Start it now and at every boot, and follow its log:
       systemctl enable --now lablink
       journalctl -u lablink -f
EOF
fi
if [ "$real" -eq 0 ]; then
  echo "(installed under $root/: useradd and systemctl were not run)"
elif [ "$systemd" -eq 1 ] && [ "$on_systemd" -eq 0 ]; then
  echo "(systemd is not running here: the user was not created and systemctl was not run)"
fi
