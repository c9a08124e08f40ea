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
# The cache key: the exact package versions, plus this script (it defines /init and the tree).
# linux-image-amd64 moves with every kernel upload, so its version stands for the kernel's.
pinned=$(candidate_versions linux-image-amd64 qemu-guest-agent busybox-static)
mapfile -t PINNED <<<"$pinned"
stamp=$(printf '%s\n' "${PINNED[@]}" \
    "build-guest.sh=$(sha256sum <"$HERE/build-guest.sh" | cut -d' ' -f1)")
if [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initrd.img" ] &&
    [ "$(cat "$OUTDIR/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "guest up to date in $OUTDIR (${PINNED[*]})"
    exit 0
fi

# linux-image-amd64 is a metapackage: the kernel is in the versioned package it depends on,
# e.g. "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)". (No early exit in awk: apt-cache
# would die of SIGPIPE and pipefail would fail the script.)
KERNEL_PIN=$(apt-cache show --no-all-versions "${PINNED[0]}" | awk '
    $1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && $3 == "(=" {
        print $2 "=" substr($4, 1, length($4) - 1)
    }')
[ -n "$KERNEL_PIN" ] || die "cannot resolve ${PINNED[0]} to a versioned linux-image package"
KERNEL_PKG=${KERNEL_PIN%%=*}

WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/debs" "$WORK/pkg"
ROOT=$WORK/root

# The sandbox user _apt cannot write into a root-only temporary directory.
DOWNLOADS=("$KERNEL_PIN" "${PINNED[@]:1}")
(cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root "${DOWNLOADS[@]}") ||
    die "apt-get download ${DOWNLOADS[*]} failed"
# From the kernel only what the guest uses: the full tree is ~400 MB of modules.
dpkg-deb --fsys-tarfile "$WORK/debs/${KERNEL_PKG}_"*.deb |
    tar -x -C "$WORK/pkg" --wildcards './boot/vmlinuz-*' './lib/modules/*/virtio*.ko*'
dpkg-deb -x "$WORK"/debs/qemu-guest-agent_*.deb "$WORK/pkg"
dpkg-deb -x "$WORK"/debs/busybox-static_*.deb "$WORK/pkg"

mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,var,lib/modules}
# qemu-ga keeps its state in /var/run.
ln -s ../run "$ROOT/var/run"

# busybox at its default paths: qemu-ga runs /sbin/hwclock after guest-set-time.
cp "$WORK/pkg/bin/busybox" "$ROOT/bin/busybox"
"$ROOT/bin/busybox" --list-full | while read -r applet; do
    if [ "$applet" != bin/busybox ]; then
        ln -s /bin/busybox "$ROOT/$applet"
    fi
done

# qemu-ga with its shared libraries, resolved by ldd against the host: installing the agent's
# Depends (small libraries, already there next to QEMU) makes the host's copies match them.
QEMU_GA=$WORK/pkg/usr/sbin/qemu-ga
# "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3), ..." -> one package name a line.
ga_deps=$(dpkg-deb -f "$WORK"/debs/qemu-guest-agent_*.deb Depends |
    tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/[[:space:]]//g')
mapfile -t ga_deps <<<"$ga_deps"
ensure_packages "${ga_deps[@]}"
cp "$QEMU_GA" "$ROOT/usr/sbin/qemu-ga"
ldd_out=$(ldd "$QEMU_GA")
if grep -q 'not found' <<<"$ldd_out"; then
    die "qemu-ga needs libraries this host lacks: $(grep 'not found' <<<"$ldd_out" | xargs)"
fi
awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out" |
    while read -r lib; do
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done

# The virtio drivers, flat in /lib/modules. Debian 12 ships plain .ko; later releases compress
# them with xz, which busybox insmod does not read (busybox's own xz unpacks them here).
for module in "${MODULES[@]}"; do
    src=$(find "$WORK/pkg/lib/modules" -name "$module.ko*" -print -quit)
    case "$src" in
    *.ko) cp "$src" "$ROOT/lib/modules/$module.ko" ;;
    *.ko.xz) "$ROOT/bin/busybox" xz -dc "$src" >"$ROOT/lib/modules/$module.ko" ;;
    *) die "kernel module $module not found (or compressed in an unknown way) in $KERNEL_PKG" ;;
    esac
done

# guest-shutdown/guest-reboot make qemu-ga run /sbin/shutdown, which busybox lacks; with it
# libvirt's default shutdown (agent first) powers the guest off.
cat >"$ROOT/sbin/shutdown" <<'EOF'
#!/bin/sh
case "$1" in
-r) exec reboot -f ;;
-H) exec halt -f ;;
*) exec poweroff -f ;;
esac
EOF

{
    echo '#!/bin/sh'
    echo "MODULES='${MODULES[*]}'"
    cat <<'EOF'
# PID 1 of the pausepatch test guest: mount the basics, load the virtio drivers, set the clock
# from the RTC, then become qemu-ga on the guest agent channel.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $MODULES; do
    insmod "/lib/modules/$module.ko" || echo "init: insmod $module failed" >&2
done
# The domain's RTC runs in UTC (<clock offset='utc'/>); do not depend on the kernel's HCTOSYS.
hwclock -s -u
# No udev makes /dev/virtio-ports/<name>: find the agent's port by its name in sysfs; it shows up
# once virtio_console has probed the device.
port=
tries=0
while [ -z "$port" ]; do
    for dir in /sys/class/virtio-ports/*; do
        name=$(cat "$dir/name" 2>/dev/null)
        if [ "$name" = org.qemu.guest_agent.0 ] && [ -c "/dev/${dir##*/}" ]; then
            port=/dev/${dir##*/}
        fi
    done
    tries=$((tries + 1))
    if [ -z "$port" ] && [ "$tries" -gt 300 ]; then
        echo "init: no virtio port named org.qemu.guest_agent.0 after 30 s; starting a shell" >&2
        exec sh
    fi
    [ -n "$port" ] || sleep 0.1
done
exec qemu-ga -m virtio-serial -p "$port"
EOF
} >"$ROOT/init"
chmod 0755 "$ROOT/init" "$ROOT/sbin/shutdown"

# newc is the only cpio format the kernel unpacks; -R 0:0 so every file is root's in the guest.
# cpio's stderr is only its block count; a failure still fails the pipeline.
(cd "$ROOT" && find . | sort | "$ROOT/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -9 >"$WORK/initrd.img"
cp "$WORK"/pkg/boot/vmlinuz-* "$WORK/vmlinuz"
chmod 0644 "$WORK/vmlinuz" "$WORK/initrd.img"
# Outputs replaced atomically, the stamp last: an interrupted build is rebuilt next time.
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$OUTDIR/"
echo "$stamp" >"$OUTDIR/.stamp"

awk -v s="$started" -v e="$EPOCHREALTIME" -v o="$OUTDIR" -v p="${DOWNLOADS[*]}" \
    'BEGIN { printf "guest built in %.1f s: %s/vmlinuz, %s/initrd.img (%s)\n", e - s, o, o, p }'
