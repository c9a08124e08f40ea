#!/usr/bin/env bash
# Remove the project's test guests, then stop libvirtd and virtlogd (started by libvirtd-up.sh).
# Usage: libvirtd-down.sh [PREFIX]   (guests whose names start with PREFIX, default "pp-")
set -euo pipefail
# shellcheck source=deploy/libvirt/lib.sh
source "$(dirname "$(readlink -f "$0")")/lib.sh"

PREFIX=${1:-pp-}
STOP_TIMEOUT_S=30

[ "$(id -u)" -eq 0 ] || die "must run as root: the daemons run as root"

virsh_q() {
    virsh -q -c "$LIBVIRT_URI" "$@"
}

if libvirt_answers; then
    # index() rather than a regex: the prefix is a literal name part, not a pattern.
    virsh_q list --all --name | awk -v p="$PREFIX" 'NF && index($0, p) == 1' |
        while read -r name; do
            # destroy is an immediate power-off: test guests hold no state worth a clean shutdown.
            if [ "$(virsh_q domstate "$name")" != "shut off" ]; then
                virsh_q destroy "$name" >/dev/null
            fi
            # A transient guest is gone after destroy; a persistent one must be undefined too.
            if virsh_q dominfo "$name" >/dev/null 2>&1; then
                virsh_q undefine "$name" >/dev/null
            fi
            echo "removed guest $name"
        done
    # libvirtd leaves running QEMU processes alive when it stops: say so instead of killing
    # guests that are not ours.
    others=$(virsh_q list --name | awk 'NF' | paste -sd ' ')
    if [ -n "$others" ]; then
        echo "warning: guests still running (their QEMU outlives libvirtd): $others" >&2
    fi
fi

# Exited means gone or a zombie: where PID 1 is not a prompt reaper (as in this project's
# sandboxes) an exited daemon stays a zombie for a while, its socket and pid file already released.
running() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [ "$state" != Z ]
}

# SIGTERM is the daemons' clean shutdown; wait for the process to go so that a following
# libvirtd-up.sh does not race with a daemon that still holds its socket and pid file.
stop_daemon() {
    local pid deadline
    pid=$(daemon_pid "$1") || { echo "$1 not running"; return; }
    kill -TERM "$pid"
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    while running "$pid"; do
        [ "$SECONDS" -lt "$deadline" ] ||
            die "$1 (pid $pid) still running $STOP_TIMEOUT_S s after SIGTERM"
        sleep 0.1
    done
    echo "stopped $1 (pid $pid)"
}

# libvirtd first: it writes guest logs through virtlogd until it exits.
stop_daemon libvirtd
stop_daemon virtlogd
