#!/usr/bin/env bash
# Build the tiny test guest from Debian packages only (no image download): a Debian kernel and a
# busybox initramfs whose only job is to run qemu-ga on the virtio-serial channel, so the host can
# get and set the guest clock through libvirt.
# Usage: build-guest.sh [OUTDIR]   (root; default <repo>/build/guest; writes vmlinuz, initrd.img)
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=deploy/libvirt/lib.sh
source "$HERE/lib.sh"

OUTDIR=$(readlink -m "${1:-$HERE/../../build/guest}")
# Loaded in this order with busybox insmod (no modprobe, no modules.dep): each needs the ones
# before it. Debian's kernel has them as modules, not built in.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console)

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, and files owned by root in the initramfs)"
mkdir -p "$OUTDIR"
# Two test sessions building at once would interleave their temporary trees and outputs.
exec 9>"$OUTDIR/.lock"
flock -w 600 9 || die "another build-guest.sh has held $OUTDIR/.lock for 600 s"

started=$EPOCHREALTIME
ensure_apt_lists linux-image-amd64 qemu-guest-agent busybox-static
# linux-image-amd64 is a metapackage: the kernel itself is in the versioned package it depends on.
KERNEL_PKG=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[ -n "$KERNEL_PKG" ] || die "cannot resolve linux-image-amd64 to a versioned linux-image package"
PACKAGES=("$KERNEL_PKG" qemu-guest-agent busybox-static)

candidate_version() {
    apt-cache policy "$1" | awk '$1 == "Candidate:" { print $2 }'
}

# The cache key: the package versions, plus this script (it defines /init and the tree layout).
stamp=$(
    for pkg in "${PACKAGES[@]}"; do echo "$pkg=$(candidate_version "$pkg")"; done
    echo "build-guest.sh=$(sha256sum "$HERE/build-guest.sh" | cut -d' ' -f1)"
)
if [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initrd.img" ] && [ "$(cat "$OUTDIR/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "guest up to date: $OUTDIR ($(echo "$stamp" | head -n 3 | paste -sd ' '))"
    exit 0
fi

WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/debs" "$WORK/pkg" "$WORK/root"

# Pinned to the versions in the stamp. Sandbox user root: _apt cannot write into a root-owned
# temporary directory (apt would warn and fall back anyway).
(cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root \
    "${PACKAGES[@]/%/=}"$'\n' >/dev/null 2>&1) || true
