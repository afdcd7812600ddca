#!/usr/bin/env bash
# Install what vmfork needs from the system, idempotently: QEMU >= 10 (from
# bookworm-backports), qemu-utils, busybox-static and a Debian kernel for the
# demo guest, fuse3 (fusermount3 and libfuse3 for the memory of lazily pulled
# templates). The backports mirror is derived from the machine's own apt
# sources; no host name is written here.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
  [ -n "$v" ] && [ "$v" -ge 10 ]
}
kernel_ok() { compgen -G '/boot/vmlinuz-*' >/dev/null; }
all_ok() {
  qemu_ok && command -v qemu-img >/dev/null 2>&1 && [ -x /bin/busybox ] \
    && /bin/busybox --list >/dev/null 2>&1 && kernel_ok \
    && command -v debootstrap >/dev/null 2>&1 && command -v mkfs.ext4 >/dev/null 2>&1 \
    && command -v mkinitramfs >/dev/null 2>&1 && command -v lsinitramfs >/dev/null 2>&1 \
    && [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
    && command -v extlinux >/dev/null 2>&1 && [ -f /usr/lib/syslinux/mbr/mbr.bin ] \
    && command -v debugfs >/dev/null 2>&1 && command -v cpio >/dev/null 2>&1 \
    && command -v curl >/dev/null 2>&1 && command -v fusermount3 >/dev/null 2>&1 \
    && compgen -G '/usr/lib/*/libfuse3.so.3*' >/dev/null
}

if all_ok; then
  log "system packages present ($(qemu-system-x86_64 --version | head -1))"
  exit 0
fi

manual="install by hand: QEMU >= 10.0 (qemu-system-x86, qemu-utils), busybox-static, a Linux kernel image in /boot (e.g. linux-image-cloud-amd64), debootstrap, e2fsprogs, initramfs-tools, debian-archive-keyring, extlinux, syslinux-common, cpio, curl, fuse3"
[ "$(id -u)" -eq 0 ] || die "not root; $manual"
command -v apt-get >/dev/null 2>&1 || die "no apt-get (not Debian); $manual"
. /etc/os-release
[ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ] \
  || die "unsupported system ${PRETTY_NAME:-unknown} (need Debian bookworm); $manual"
[ "$(dpkg --print-architecture)" = amd64 ] || die "unsupported architecture; $manual"

# Find the URI of the machine's Debian mirror: the entry that carries suite 'bookworm'.
mirror_uri() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      BEGIN { RS=""; FS="\n" }
      {
        uri=""; ok=0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); uri=u[1] }
          if ($i ~ /^Suites:/) { if ($i ~ /(^|[ \t])bookworm([ \t]|$)/) ok=1 }
          if ($i ~ /^Enabled:[ \t]*no/) { ok=0; break }
        }
        if (ok && uri != "") { print uri; exit }
      }' "$f"
  done
  local lists=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do [ -f "$f" ] && lists+=("$f"); done
  [ ${#lists[@]} -gt 0 ] || return 0
  awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                     if ($(i+1) == "bookworm") { print $i } }' "${lists[@]}"
}
uri=$(mirror_uri 2>/dev/null | head -1 || true)
[ -n "$uri" ] || die "no Debian bookworm entry in the apt sources; $manual"

bp=/etc/apt/sources.list.d/vmfork-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding bookworm-backports from the machine's mirror"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" > "$bp"
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -qq
log "installing QEMU, busybox-static, kernel, debootstrap, initramfs-tools"
apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  -t bookworm-backports qemu-system-x86 qemu-utils linux-image-cloud-amd64 >/dev/null
# The Debian guest image (vmfork image debian): debootstrap from the same mirror,
# mkfs.ext4 -d, and lsinitramfs/mkinitramfs to check or make a virtio-blk initramfs.
# The tests' own images of foreign guests (tests/foreign_images.py): a disk that
# boots through extlinux, checked with debugfs and cpio. curl: the demo's
# calls of the daemon's REST API over its UNIX socket. fuse3: fusermount3 and
# libfuse3, which the FUSE server of a lazily pulled template uses (mfusepy).
apt-get install -y -qq busybox-static debootstrap e2fsprogs initramfs-tools \
  debian-archive-keyring extlinux syslinux-common cpio curl fuse3 >/dev/null
all_ok || die "packages installed but checks still fail; $manual"
log "done ($(qemu-system-x86_64 --version | head -1))"
