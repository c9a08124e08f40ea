#!/usr/bin/env bash
# Put the metadata address 169.254.169.254 on this host's loopback (up), take it off (down), or
# show it (status), so that a notifier started with `--listen 169.254.169.254:80` receives the
# guests' requests with their own source addresses. Idempotent. Run as root on the hypervisor.
set -euo pipefail
ADDRESS=169.254.169.254/32

case "${1:-status}" in
up)
    if ! ip -4 addr show dev lo | grep -q "inet ${ADDRESS%/32}/"; then
        ip addr add "$ADDRESS" dev lo
    fi
    echo "169.254.169.254 is on lo: start the notifier with --listen 169.254.169.254:80"
    ;;
down)
    if ip -4 addr show dev lo | grep -q "inet ${ADDRESS%/32}/"; then
        ip addr del "$ADDRESS" dev lo
    fi
    ;;
status)
    ip -4 addr show dev lo | grep "inet ${ADDRESS%/32}/" || echo "169.254.169.254 is not on lo"
    ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
