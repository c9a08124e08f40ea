"""The Scheduled Events documents: what each VM sees, built from the bus events.

Plain Python, no bus and no HTTP. A VM sees the events of its availability set (every member sees
them and checks `Resources`); a standalone VM sees only events that list it. Every scope (a set,
or a standalone VM) has its own `DocumentIncarnation`, increased by exactly one on every change of
its events array and never otherwise.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Literal

from shared.contracts import (
    HostInventory,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenancePlanned,
    MaintenanceStarted,
    VMInfo,
)

API_VERSIONS = (
    "2017-08-01",
    "2017-11-01",
    "2019-01-01",
    "2019-04-01",
    "2019-08-01",
    "2020-07-01",
)
"""Every documented Scheduled Events version; each returns the fields of its version."""

_FIELDS_SINCE = {
    "Description": "2019-04-01",
    "EventSource": "2019-08-01",
    "DurationInSeconds": "2020-07-01",
}

Status = Literal["Scheduled", "Started", "Completed", "Canceled"]
Scope = tuple[str, str]
"""("set", name) for an availability set, ("vm", name) for a standalone VM."""


def rfc1123(value: datetime) -> str:
    """`Mon, 11 Apr 2026 22:26:58 GMT`."""
    return format_datetime(value, usegmt=True)


@dataclass
class ScheduledEvent:
    """One scheduled event: one host's maintenance, listing the VMs it impacts."""

    event_id: uuid.UUID
    rollout_id: str
    host: str
    event_type: str
    resources: list[str]
    not_before: datetime | None
    description: str
    duration_s: int
    status: Status = "Scheduled"
    scopes: set[Scope] = field(default_factory=set)

    def view(self, api_version: str) -> dict[str, Any]:
        """The event as Azure's API shows it in `api_version`."""
        body: dict[str, Any] = {
            "EventId": str(self.event_id),
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(self.resources),
            "NotBefore": rfc1123(self.not_before)
            if self.status == "Scheduled" and self.not_before
            else "",
            "Description": self.description,
            "EventSource": "Platform",
            "DurationInSeconds": self.duration_s,
        }
        for name, since in _FIELDS_SINCE.items():
            if api_version < since:
                del body[name]
        return body


@dataclass
class Caller:
    """A VM identified by its address."""

    vm: str
    host: str
    scope: Scope


class ScheduledEventsDocument:
    """Every scope's events and incarnation."""

    def __init__(self) -> None:
        self.events: dict[uuid.UUID, ScheduledEvent] = {}
        self.incarnations: dict[Scope, int] = {}
        self.callers: dict[str, Caller] = {}
        self.placement: dict[str, VMInfo] = {}
        self._host_ips: dict[str, set[str]] = {}

    # ------------------------------------------------------------ inventory

    def on_inventory(self, event: HostInventory) -> None:
        """Learn which address is which VM, and each VM's set."""
        for ip in self._host_ips.pop(event.host, set()):
            self.callers.pop(ip, None)
        ips: set[str] = set()
        for vm in event.vms:
            self.placement[vm.vm] = vm
            if vm.ip:
                self.callers[vm.ip] = Caller(vm.vm, event.host, self.scope_of(vm.vm))
                ips.add(vm.ip)
        self._host_ips[event.host] = ips

    def scope_of(self, vm: str) -> Scope:
        """The scope whose document `vm` reads."""
        info = self.placement.get(vm)
        if info is not None and info.availability_set:
            return ("set", info.availability_set)
        return ("vm", vm)

    # ------------------------------------------------------------ maintenance

    def _changed(self, event: ScheduledEvent) -> None:
        for scope in event.scopes:
            self.incarnations[scope] = self.incarnations.get(scope, 0) + 1

    def on_planned(self, event: MaintenancePlanned) -> bool:
        """A new (or re-announced) scheduled event. True if any document changed."""
        known = self.events.get(event.scheduled_event_id)
        if known is not None:
            if known.status != "Scheduled" or known.not_before == event.not_before:
                return False
            known.not_before = event.not_before
            self._changed(known)
            return True
        scheduled = ScheduledEvent(
            event_id=event.scheduled_event_id,
            rollout_id=event.rollout_id,
            host=event.host,
            event_type=event.event_type,
            resources=sorted(event.vms),
            not_before=event.not_before,
            description=event.description,
            duration_s=round(event.expected_pause_s) if event.expected_pause_s else -1,
            scopes={self.scope_of(vm) for vm in event.vms},
        )
        if not scheduled.scopes:
            return False
        self.events[scheduled.event_id] = scheduled
        self._changed(scheduled)
        return True

    def on_started(self, event: MaintenanceStarted) -> bool:
        """Scheduled → Started (NotBefore becomes "")."""
        known = self.events.get(event.scheduled_event_id)
        if known is None or known.status != "Scheduled":
            return False
        known.status = "Started"
        self._changed(known)
        return True

    def _remove(self, event_id: uuid.UUID) -> bool:
        known = self.events.pop(event_id, None)
        if known is None:
            return False
        self._changed(known)
        return True

    def on_completed(self, event: MaintenanceCompleted) -> bool:
        """The host's VMs run again: the event disappears."""
        return event.scheduled_event_id is not None and self._remove(event.scheduled_event_id)

    def on_cancelled(self, event: MaintenanceCancelled) -> bool:
        """Cancelled before it started: the event disappears."""
        return self._remove(event.scheduled_event_id)

    # ------------------------------------------------------------ views

    def caller(self, address: str) -> Caller | None:
        """The VM calling from `address`, if known."""
        return self.callers.get(address)

    def visible(self, caller: Caller | None) -> list[ScheduledEvent]:
        """Events the caller may see (none for an unknown caller), in a stable order."""
        if caller is None:
            return []
        events = [e for e in self.events.values() if caller.scope in e.scopes]
        return sorted(events, key=lambda e: (e.host, str(e.event_id)))

    def render(self, caller: Caller | None, api_version: str) -> dict[str, Any]:
        """The document for `caller` in `api_version`."""
        incarnation = self.incarnations.get(caller.scope, 0) if caller else 0
        return {
            "DocumentIncarnation": incarnation,
            "Events": [e.view(api_version) for e in self.visible(caller)],
        }

    @staticmethod
    def etag(document: dict[str, Any]) -> str:
        """A strong ETag of a rendered document."""
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        return f'"{digest[:32]}"'

    def approvable(self, caller: Caller | None, event_id: str) -> ScheduledEvent | None:
        """The event `caller` may approve under this id, if any (visible and still Scheduled)."""
        try:
            wanted = uuid.UUID(event_id)
        except ValueError:
            return None
        for event in self.visible(caller):
            if event.event_id == wanted:
                return event
        return None
