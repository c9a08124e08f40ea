#!/usr/bin/env bash
# Start the system libvirtd (QEMU driver, TCG) on a machine without systemd, idempotently.
# Usage: libvirtd-up.sh        (root; prints one line; exit 0 once qemu:///system answers)
set -euo pipefail
# shellcheck source=deploy/libvirt/lib.sh
source "$(dirname "$(readlink -f "$0")")/lib.sh"

STARTUP_TIMEOUT_S=60
LIBVIRT_LOG_DIR=/var/log/libvirt

[ "$(id -u)" -eq 0 ] || die "must run as root: the system libvirtd and its QEMU guests run as root"

started=$EPOCHREALTIME
# No recommends: libvirt-daemon-system (systemd units, polkit, dnsmasq, ...) is not wanted here.
ensure_packages libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 libvirt-clients

# Several test sessions may call this at once: only one of them may start the daemons.
mkdir -p /run/lock
exec 9>/run/lock/pausepatch-libvirtd.lock
flock -w 120 9 || die "another libvirtd-up.sh has held /run/lock/pausepatch-libvirtd.lock for 120 s"

if libvirt_answers; then
    echo "libvirtd already running: $LIBVIRT_URI answers (pid $(daemon_pid libvirtd || echo '?'))"
    exit 0
fi

# libvirt-daemon-system would create these; without it the QEMU driver refuses to start guests
# (it runs QEMU as the compiled-in user libvirt-qemu) and the daemons have nowhere to log.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu
mkdir -p "$LIBVIRT_LOG_DIR/qemu" /var/lib/libvirt/qemu /var/cache/libvirt/qemu /run/libvirt

# libvirt probes QEMU's capabilities and caches them, but it checks the cache against whether
# libvirt-qemu can open /dev/kvm. Without udev nothing gives /dev/kvm Debian's usual root:kvm 0660,
# so the check fails on every call and every define, start or capabilities call re-probes both
# QEMU binaries (~4 s each). Guests still use TCG (type='qemu'): this only makes the cache stick.
if [ -c /dev/kvm ]; then
    getent group kvm >/dev/null || groupadd --system kvm
    id -nG libvirt-qemu | grep -qw kvm || usermod -a -G kvm libvirt-qemu
    chgrp kvm /dev/kvm
    chmod g+rw /dev/kvm
fi

# The daemon's own log tail first, the one-line reason last.
die_with_log() {
    local log="$LIBVIRT_LOG_DIR/$1.log"
    shift
    if [ -s "$log" ]; then
        echo "--- last lines of $log:" >&2
        tail -n 20 "$log" >&2
    fi
    die "$* (log: $log)"
}

# Without systemd's journal the daemons would log nowhere: send warnings and errors to files,
# one per start (the previous one kept as .1) so that a failure shows only its own lines.
start_daemon() {
    local log="$LIBVIRT_LOG_DIR/$1.log"
    if daemon_pid "$1" >/dev/null; then
        return
    fi
    if [ -f "$log" ]; then
        mv -f "$log" "$log.1"
    fi
    # 9>&-: a daemon that inherited the lock's descriptor would hold the lock for its lifetime.
    LIBVIRT_LOG_OUTPUTS="3:file:$log" "$1" -d -p "$(pid_file "$1")" 9>&- ||
        die_with_log "$1" "$1 -d failed"
}

# virtlogd first: libvirtd hands every guest's stdout/stderr and serial log to it.
start_daemon virtlogd
start_daemon libvirtd

deadline=$((SECONDS + STARTUP_TIMEOUT_S))
until libvirt_answers; do
    daemon_pid libvirtd >/dev/null || die_with_log libvirtd "libvirtd exited during startup"
    if [ "$SECONDS" -ge "$deadline" ]; then
        die_with_log libvirtd "libvirtd runs but $LIBVIRT_URI did not answer" \
            "within $STARTUP_TIMEOUT_S s"
    fi
    sleep 0.2
done

awk -v s="$started" -v e="$EPOCHREALTIME" -v u="$LIBVIRT_URI" -v p="$(daemon_pid libvirtd)" \
    'BEGIN { printf "libvirtd ready: %s answers (pid %s, %.1f s)\n", u, p, e - s }'
