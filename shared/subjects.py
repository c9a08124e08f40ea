"""Every NATS subject of the project, built in one place.

Events live under ``pp.evt.>`` (the ``PAUSEPATCH`` JetStream stream), commands are core NATS
request/reply under ``pp.cmd.>``, and rejected input goes to ``pp.dlq.<service>``. Pass ``"*"`` as
a token to get the wildcard a consumer filters on.
"""

from __future__ import annotations

STREAM_NAME = "PAUSEPATCH"
EVENTS_ROOT = "pp.evt.>"
HOST_AND_ROLLOUT_EVENTS = "pp.evt.*.*.*"
"""Every event of a host (`pp.evt.host.<host>.<kind>`) or of a rollout
(`pp.evt.rollout.<id>.status`), and none of a VM's (`pp.evt.vm.<host>.<vm>.<kind>`, a token
longer): one filter, as a consumer on nats-server 2.9 has."""
ANY = "*"


def _join(*tokens: str) -> str:
    return ".".join(tokens)


def host_inventory(host: str = ANY) -> str:
    """`HostInventory` of one host."""
    return _join("pp.evt.host", host, "inventory")


def host_planned(host: str = ANY) -> str:
    """`MaintenancePlanned` for one host."""
    return _join("pp.evt.host", host, "planned")


def host_approved(host: str = ANY) -> str:
    """`MaintenanceApproved` for one host's scheduled event."""
    return _join("pp.evt.host", host, "approved")


def host_deferred(host: str = ANY) -> str:
    """`MaintenanceDeferred` for one host's scheduled event."""
    return _join("pp.evt.host", host, "deferred")


def host_started(host: str = ANY) -> str:
    """`MaintenanceStarted` for one host."""
    return _join("pp.evt.host", host, "started")


def host_cancelled(host: str = ANY) -> str:
    """`MaintenanceCancelled` for one host."""
    return _join("pp.evt.host", host, "cancelled")


def host_paused(host: str = ANY) -> str:
    """`HostPaused` of one host."""
    return _join("pp.evt.host", host, "paused")


def host_patched(host: str = ANY) -> str:
    """`HostPatched` of one host."""
    return _join("pp.evt.host", host, "patched")


def host_completed(host: str = ANY) -> str:
    """`MaintenanceCompleted` of one host (the window is over, every VM handled)."""
    return _join("pp.evt.host", host, "completed")


def vm_paused(host: str = ANY, vm: str = ANY) -> str:
    """`VMPaused` of one VM."""
    return _join("pp.evt.vm", host, vm, "paused")


def vm_resumed(host: str = ANY, vm: str = ANY) -> str:
    """`VMResumed` of one VM."""
    return _join("pp.evt.vm", host, vm, "resumed")


def vm_clock(host: str = ANY, vm: str = ANY) -> str:
    """`ClockSynced` of one VM."""
    return _join("pp.evt.vm", host, vm, "clock")


def host_clock(host: str = ANY) -> str:
    """`HostClockSynced` of one host (clock-sync's results for several of its VMs at once)."""
    return _join("pp.evt.host", host, "clock")


def rollout_status(rollout_id: str = ANY) -> str:
    """`RolloutStatus` of one rollout."""
    return _join("pp.evt.rollout", rollout_id, "status")


def rollout_command(verb: str) -> str:
    """Request/reply command to the planner: submit, plan, get, list, halt, resume, abort, hosts."""
    return _join("pp.cmd.rollout", verb)


def host_clock_command(host: str = ANY) -> str:
    """Request/reply command to one host's agent: set or read a guest clock."""
    return _join("pp.cmd.host", host, "clock")


def inbox_prefix(user: str | None) -> str:
    """Where the replies to a NATS user's requests (and its JetStream deliveries) arrive:
    `_INBOX.<user>`, so that its NATS permissions can let it read its own replies and no one
    else's; `_INBOX` without a user (no authorization)."""
    if not user:
        return "_INBOX"
    return "_INBOX." + "".join(c if c.isalnum() or c in "-_" else "_" for c in user)


def dead_letter(service: str) -> str:
    """Where a service puts what it could not read."""
    return _join("pp.dlq", service)
