# Shell functions shared by the scripts in deploy/libvirt/ (sourced, not executed).
# shellcheck shell=bash

# One clear line on stderr, then a non-zero exit: callers (CI, tests/support/qemu.py) show it as is.
die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# True when dpkg says the package is fully installed.
package_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

# "name=version" of each package apt has an install candidate for. One apt-cache call: each costs
# ~0.7 s where apt's binary cache is disabled, as in Debian's Docker images.
apt_candidates() {
    apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ]/ { pkg = substr($1, 1, length($1) - 1) }
        $1 == "Candidate:" && $2 != "(none)" { print pkg "=" $2 }'
}

# Print "name=version" (the install candidate) for each package. The package lists are refreshed
# only when a package is unknown: a clean CI machine or container ships without them, and a
# refresh on every run would cost seconds.
candidate_versions() {
    local out
    out=$(apt_candidates "$@")
    if [ "$(grep -c . <<<"$out")" -lt "$#" ]; then
        apt-get update -qq || die "apt-get update failed"
        out=$(apt_candidates "$@")
        [ "$(grep -c . <<<"$out")" -ge "$#" ] || die "apt has no candidate for some of: $*"
    fi
    echo "$out"
}

# Install what is missing, without recommends (they would pull in ~1 GB for libvirt/QEMU).
ensure_packages() {
    local missing=() pkg start
    for pkg in "$@"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    candidate_versions "${missing[@]}" >/dev/null
    start=$EPOCHREALTIME
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || die "apt-get install ${missing[*]} failed"
    awk -v s="$start" -v e="$EPOCHREALTIME" -v p="${missing[*]}" \
        'BEGIN { printf "installed %s in %.1f s\n", p, e - s }'
}

# The system instance the project's tests and host-agents use; both daemons run as root.
LIBVIRT_URI=qemu:///system

# Pid files passed explicitly (-p) so that up and down agree whatever the build's defaults are.
pid_file() {
    echo "/run/$1.pid"
}

# Print the pid of a running daemon; fail if it is not running. The name check guards against a
# stale pid file whose pid now belongs to another process.
daemon_pid() {
    local pid
    pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
    echo "$pid"
}

# True when libvirtd serves the system URI. "version" makes a fresh daemon probe QEMU's
# capabilities (~10 s under TCG), so "answers" also means "ready to start guests"; the timeout
# covers a daemon that accepted the connection but hangs.
libvirt_answers() {
    timeout 30 virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1
}
