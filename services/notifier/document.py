"""The Scheduled Events documents: what each VM sees, built from the bus events.

Plain Python, no bus and no HTTP. A VM sees the events of its availability set (every member sees
them and checks `Resources`); a standalone VM sees only events that list it; an unknown address
sees nothing. Every scope (a set, or a standalone VM) has its own `DocumentIncarnation`, increased
by exactly one on every change of its events array and never otherwise.

Everything here is a function of the bus events applied in stream order and of nothing else (no
wall clock, no arrival time), so that every replica, and a replica restarted from a snapshot, serves
the same document with the same incarnation. The one use of the clock is the age-out of ended
events from the extended view, and even that is computed from the events' own timestamps.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from shared.contracts import (
    Event,
    HostClockSynced,
    HostInventory,
    MaintenanceApproved,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenanceDeferred,
    MaintenancePlanned,
    MaintenanceStarted,
    RolloutStatus,
    VMClock,
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

LATEST_VERSION = API_VERSIONS[-1]

_FIELDS_SINCE = {
    "Description": "2019-04-01",
    "EventSource": "2019-08-01",
    "DurationInSeconds": "2020-07-01",
}

ACCEPTED: tuple[type[Event], ...] = (
    HostInventory,
    MaintenancePlanned,
    MaintenanceApproved,
    MaintenanceDeferred,
    MaintenanceStarted,
    MaintenanceCompleted,
    MaintenanceCancelled,
    HostClockSynced,
    RolloutStatus,
)
"""The bus events the documents are made of: all of them events of a host or of a rollout
(`shared.subjects.HOST_AND_ROLLOUT_EVENTS`). What the documents say of each VM comes from its
host's events: its blackout from the host's `MaintenanceCompleted`, its clock from the host's
`HostClockSynced`; the fleet's per-VM events (`VMPaused`, `VMResumed`, `ClockSynced`: 60 of a
20-VM host's 70) are not needed."""

ReplayedEvent = Annotated[
    HostInventory
    | MaintenancePlanned
    | MaintenanceApproved
    | MaintenanceDeferred
    | MaintenanceStarted
    | MaintenanceCompleted
    | MaintenanceCancelled
    | HostClockSynced
    | RolloutStatus,
    Field(discriminator="type"),
]
"""The same, as one type (for the AsyncAPI document)."""

DEFAULT_DESCRIPTION = {
    "Freeze": "Virtual machine is being paused because of a memory-preserving host update.",
    "Reboot": "Virtual machine is going to be restarted because of a host update.",
}

Status = Literal["Scheduled", "Started", "Completed", "Canceled"]
ACTIVE: tuple[Status, ...] = ("Scheduled", "Started")
"""The statuses Azure shows; an ended event (Completed, Canceled) is in the extended view only."""

Scope = tuple[str, str]
"""("set", name) for an availability set, ("vm", name) for a standalone VM."""

ChangeKind = Literal[
    "scheduled",
    "rescheduled",
    "started",
    "completed",
    "canceled",
    "approved",
    "deferred",
    "measured",
]
STRICT_CHANGES: frozenset[str] = frozenset(
    {"scheduled", "rescheduled", "started", "completed", "canceled"}
)
"""The changes that alter Azure's events array (the others show in the extended view only)."""


def rfc1123(value: datetime) -> str:
    """`Mon, 11 Apr 2026 22:26:58 GMT`."""
    return format_datetime(value, usegmt=True)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def duration_in_seconds(event_type: str, expected_pause_s: float) -> int:
    """Azure's `DurationInSeconds`: the expected pause of a Freeze in whole seconds (rounded up,
    so a short pause never reads as "no interruption"); -1 when unknown or for a Reboot."""
    if event_type != "Freeze" or expected_pause_s <= 0:
        return -1
    return math.ceil(expected_pause_s)


@dataclass(frozen=True)
class DeferPolicy:
    """How far a VM may postpone an event (the planner applies the same limits)."""

    max_defers: int = 1
    """Defers honoured per scheduled event."""
    max_defer_s: float = 600.0
    """Longest postponement one defer may ask for."""


@dataclass
class Measurement:
    """What happened to one VM in the window: its blackout and its clock afterwards."""

    actual_pause_ms: float | None = None
    forced: bool | None = None
    clock_synced: bool | None = None
    clock_method: str | None = None
    skew_before_ms: float | None = None
    skew_after_ms: float | None = None

    def view(self, vm: str) -> dict[str, Any]:
        """The extended view's entry for `vm`."""
        return {
            "Resource": vm,
            "ActualPauseMs": self.actual_pause_ms,
            "ForcedResume": self.forced,
            "ClockSynced": self.clock_synced,
            "ClockSyncMethod": self.clock_method,
            "ClockSkewBeforeMs": self.skew_before_ms,
            "ClockSkewMs": self.skew_after_ms,
        }


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
    scopes: list[Scope]
    status: Status = "Scheduled"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    outcome: str | None = None
    approved_by: list[str] = field(default_factory=list)
    deferrals: list[dict[str, Any]] = field(default_factory=list)
    measurements: dict[str, Measurement] = field(default_factory=dict)
    resource_scopes: dict[str, Scope] = field(default_factory=dict)
    """Each impacted VM's scope: a caller is shown only the VMs of its own scope (one tenant's
    availability set never learns another's VM names)."""

    @property
    def active(self) -> bool:
        """Shown by Azure's API (Scheduled or Started)."""
        return self.status in ACTIVE

    def shown_to(self, scope: Scope | None, vms: list[str]) -> list[str]:
        """The VMs of `vms` a caller of `scope` may see (all of them when `scope` is None)."""
        return [vm for vm in vms if scope is None or self.resource_scopes.get(vm, scope) == scope]

    def view(self, api_version: str, scope: Scope | None = None) -> dict[str, Any]:
        """The event as Azure's API shows it in `api_version` to a caller of `scope`."""
        body: dict[str, Any] = {
            "EventId": str(self.event_id),
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": self.shown_to(scope, self.resources),
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

    def extended_view(
        self, api_version: str, policy: DeferPolicy, scope: Scope | None = None
    ) -> dict[str, Any]:
        """Azure's fields plus what pausepatch measures and allows (the opt-in view)."""
        shown = set(self.shown_to(scope, self.resources))
        return {
            **self.view(api_version, scope),
            "StartedAt": rfc1123(self.started_at) if self.started_at else "",
            "EndedAt": rfc1123(self.ended_at) if self.ended_at else "",
            "Outcome": self.outcome or "",
            "ApprovedBy": [vm for vm in self.approved_by if vm in shown],
            "Deferrals": [
                {"Resource": d["vm"], "DeferSeconds": d["defer_s"]}
                for d in self.deferrals
                if d["vm"] in shown
            ],
            "DefersRemaining": max(0, policy.max_defers - len(self.deferrals))
            if self.status == "Scheduled"
            else 0,
            "MaxDeferSeconds": policy.max_defer_s,
            "Measurements": [
                self.measurements[vm].view(vm) for vm in sorted(self.measurements) if vm in shown
            ],
        }

    def to_json(self) -> dict[str, Any]:
        """The event as kept in a snapshot."""
        return {
            "event_id": str(self.event_id),
            "rollout_id": self.rollout_id,
            "host": self.host,
            "event_type": self.event_type,
            "resources": self.resources,
            "not_before": _iso(self.not_before),
            "description": self.description,
            "duration_s": self.duration_s,
            "scopes": [list(s) for s in self.scopes],
            "status": self.status,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "outcome": self.outcome,
            "approved_by": self.approved_by,
            "deferrals": self.deferrals,
            "measurements": {vm: vars(m) for vm, m in self.measurements.items()},
            "resource_scopes": {vm: list(s) for vm, s in self.resource_scopes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScheduledEvent:
        """The event from a snapshot."""
        return cls(
            event_id=uuid.UUID(data["event_id"]),
            rollout_id=data["rollout_id"],
            host=data["host"],
            event_type=data["event_type"],
            resources=list(data["resources"]),
            not_before=_dt(data["not_before"]),
            description=data["description"],
            duration_s=data["duration_s"],
            scopes=[(s[0], s[1]) for s in data["scopes"]],
            status=data["status"],
            started_at=_dt(data["started_at"]),
            ended_at=_dt(data["ended_at"]),
            outcome=data["outcome"],
            approved_by=list(data["approved_by"]),
            deferrals=list(data["deferrals"]),
            measurements={vm: Measurement(**m) for vm, m in data["measurements"].items()},
            resource_scopes={vm: (s[0], s[1]) for vm, s in data.get("resource_scopes", {}).items()},
        )


@dataclass(frozen=True)
class Change:
    """One change of one scheduled event, caused by one bus event."""

    kind: ChangeKind
    event: ScheduledEvent
    cause_id: uuid.UUID
    occurred_at: datetime
    vm: str | None = None

    @property
    def strict(self) -> bool:
        """It changes Azure's events array."""
        return self.kind in STRICT_CHANGES


@dataclass(frozen=True)
class Caller:
    """A VM identified by its address."""

    vm: str
    host: str
    scope: Scope


class ScheduledEventsDocument:
    """Every scope's events and incarnations, built by `apply` from the bus events in order."""

    def __init__(
        self, policy: DeferPolicy | None = None, extended_retention_s: float = 3600.0
    ) -> None:
        self.policy = policy or DeferPolicy()
        self.retention = timedelta(seconds=extended_retention_s)
        self.reset()

    def reset(self) -> None:
        """Forget everything (before a replay of the whole stream)."""
        self.events: dict[uuid.UUID, ScheduledEvent] = {}
        self.by_scope: dict[Scope, dict[uuid.UUID, ScheduledEvent]] = {}
        """The same events by scope (an event's scopes never change): a VM's document is read
        from its scope's events only, however many the fleet has."""
        self.incarnations: dict[Scope, int] = {}
        self.extended_changes: dict[Scope, int] = {}
        self.extended_aged_out: dict[Scope, int] = {}
        self.placement: dict[str, VMInfo] = {}
        self.host_vms: dict[str, list[str]] = {}
        self.callers: dict[str, Caller] = {}
        self.by_run: dict[tuple[str, str], uuid.UUID] = {}
        self.seq = 0
        """Stream sequence of the last bus event applied."""
        self._moved: set[Scope | None] = set()

    # ------------------------------------------------------------ applying bus events

    def apply(self, event: Event) -> list[Change]:
        """Apply one bus event; the changes it made (none for most events)."""
        changes: list[Change]
        if isinstance(event, HostInventory):
            self._on_inventory(event)
            changes = []
        elif isinstance(event, MaintenancePlanned):
            changes = self._on_planned(event)
        elif isinstance(event, MaintenanceApproved):
            changes = self._on_approved(event)
        elif isinstance(event, MaintenanceDeferred):
            changes = self._on_deferred(event)
        elif isinstance(event, MaintenanceStarted):
            changes = self._on_started(event)
        elif isinstance(event, MaintenanceCompleted):
            changes = self._on_completed(event)
        elif isinstance(event, MaintenanceCancelled):
            changes = self._end(
                event.scheduled_event_id, "Canceled", event.reason or "canceled", event
            )
        elif isinstance(event, HostClockSynced):
            changes = self._on_host_clock(event)
        elif isinstance(event, RolloutStatus):
            changes = self._on_rollout_status(event)
        else:
            changes = []
        for change in changes:
            for scope in change.event.scopes:
                if change.strict:
                    self.incarnations[scope] = self.incarnations.get(scope, 0) + 1
                self.extended_changes[scope] = self.extended_changes.get(scope, 0) + 1
        return changes

    def _on_inventory(self, event: HostInventory) -> None:
        if self._repeats(event):
            return  # a heartbeat: nothing below would change
        before: dict[str, Caller] = {}
        for name in self.host_vms.pop(event.host, []):
            ip = self.placement[name].ip if name in self.placement else None
            caller = self.callers.get(ip) if ip else None
            # The address may belong to the VM on another host by now (it moved).
            if ip and caller is not None and caller.host == event.host:
                before[ip] = self.callers.pop(ip)
        names = []
        for vm in event.vms:
            self.placement[vm.vm] = vm
            names.append(vm.vm)
            if vm.ip:
                caller = Caller(vm.vm, event.host, self.scope_of(vm.vm))
                self.callers[vm.ip] = caller
                if before.pop(vm.ip, None) != caller:
                    self._moved.add(None)
                    self._moved.add(caller.scope)
        self.host_vms[event.host] = names
        for gone in before.values():
            self._moved.add(gone.scope)

    def _repeats(self, event: HostInventory) -> bool:
        """The host's inventory lists what its last one did, in the same order, and each address
        it gives still names its VM on this host: reading it again would change nothing."""
        names = self.host_vms.get(event.host)
        if names is None or len(names) != len(event.vms):
            return False
        for name, vm in zip(names, event.vms, strict=True):
            known = self.placement.get(name)
            if name != vm.vm or (known is not vm and known != vm):
                return False
            if vm.ip:
                caller = self.callers.get(vm.ip)
                if caller is None or caller.host != event.host or caller.vm != name:
                    return False
        return True

    def take_moved_scopes(self) -> set[Scope | None]:
        """Scopes whose callers changed since the last call (None: the unknown callers)."""
        moved, self._moved = self._moved, set()
        return moved

    def scope_of(self, vm: str) -> Scope:
        """The scope whose document `vm` reads."""
        info = self.placement.get(vm)
        if info is not None and info.availability_set:
            return ("set", info.availability_set)
        return ("vm", vm)

    def _on_planned(self, event: MaintenancePlanned) -> list[Change]:
        known = self.events.get(event.scheduled_event_id)
        if known is not None:
            if known.status != "Scheduled" or known.not_before == event.not_before:
                return []
            known.not_before = event.not_before
            # A new notice voids earlier approvals, as the planner does on a defer.
            known.approved_by.clear()
            return [Change("rescheduled", known, event.event_id, event.occurred_at)]
        scopes = sorted({self.scope_of(vm) for vm in event.vms})
        if not scopes:
            return []
        scheduled = ScheduledEvent(
            event_id=event.scheduled_event_id,
            rollout_id=event.rollout_id,
            host=event.host,
            event_type=event.event_type,
            resources=sorted(event.vms),
            not_before=event.not_before,
            description=event.description or DEFAULT_DESCRIPTION[event.event_type],
            duration_s=duration_in_seconds(event.event_type, event.expected_pause_s),
            scopes=scopes,
            resource_scopes={vm: self.scope_of(vm) for vm in event.vms},
        )
        self._add(scheduled)
        self.by_run[(event.rollout_id, event.host)] = scheduled.event_id
        return [Change("scheduled", scheduled, event.event_id, event.occurred_at)]

    def _on_approved(self, event: MaintenanceApproved) -> list[Change]:
        known = self.events.get(event.scheduled_event_id)
        if known is None or known.status != "Scheduled" or event.vm in known.approved_by:
            return []
        known.approved_by.append(event.vm)
        return [Change("approved", known, event.event_id, event.occurred_at, event.vm)]

    def _on_deferred(self, event: MaintenanceDeferred) -> list[Change]:
        known = self.events.get(event.scheduled_event_id)
        if known is None or known.status != "Scheduled":
            return []
        known.deferrals.append({"vm": event.vm, "defer_s": event.defer_s})
        return [Change("deferred", known, event.event_id, event.occurred_at, event.vm)]

    def _on_started(self, event: MaintenanceStarted) -> list[Change]:
        known = self.events.get(event.scheduled_event_id)
        if known is None or known.status != "Scheduled":
            return []
        known.status = "Started"
        known.started_at = event.occurred_at
        return [Change("started", known, event.event_id, event.occurred_at)]

    def _on_completed(self, event: MaintenanceCompleted) -> list[Change]:
        if event.scheduled_event_id is None:
            return []
        known = self.events.get(event.scheduled_event_id)
        changes = []
        if known is not None:
            for outcome in event.vms:
                if outcome.paused_ms is not None:
                    changes += self._measured(
                        known,
                        event,
                        outcome.vm,
                        actual_pause_ms=outcome.paused_ms,
                        forced=outcome.forced,
                    )
        return changes + self._end(
            event.scheduled_event_id,
            "Completed",
            "Succeeded" if event.ok else f"Failed: {event.error or 'see the rollout'}",
            event,
        )

    def _end(self, event_id: uuid.UUID, status: Status, outcome: str, cause: Event) -> list[Change]:
        known = self.events.get(event_id)
        if known is None or not known.active:
            return []
        known.status = status
        known.ended_at = cause.occurred_at
        known.outcome = outcome
        kind: ChangeKind = "completed" if status == "Completed" else "canceled"
        return [Change(kind, known, cause.event_id, cause.occurred_at)]

    def _on_rollout_status(self, event: RolloutStatus) -> list[Change]:
        """A finished rollout leaves no event behind, even for a host that never reported."""
        if event.state not in ("completed", "failed"):
            return []
        changes = []
        for known in list(self.events.values()):
            if known.rollout_id != event.rollout_id or not known.active:
                continue
            if known.status == "Started":
                changes += self._end(
                    known.event_id, "Completed", "Unknown: the host never reported", event
                )
            else:
                changes += self._end(known.event_id, "Canceled", f"rollout {event.state}", event)
        return changes

    def _on_host_clock(self, event: HostClockSynced) -> list[Change]:
        if event.rollout_id is None:
            return []
        known = self.events.get(self.by_run.get((event.rollout_id, event.host), uuid.UUID(int=0)))
        if known is None:
            return []
        changes = []
        for vm, clock in event.clocks.items():
            changes += self._measured(known, event, vm, **_clock_fields(clock))
        return changes

    def _measured(
        self, known: ScheduledEvent, cause: Event, vm: str, **values: Any
    ) -> list[Change]:
        """Set what was measured of `vm` in `known`: one "measured" change when that changes
        anything. Late measurements are taken while the ended event is still shown, judged by
        the events' own timestamps so that every replica decides alike. The same result again
        (a host's clock results grouped otherwise when a resume was delivered twice) changes
        nothing. The change's cause is the host's event and the VM: its webhook id is the same
        in every replica."""
        if vm not in known.resources or (
            known.ended_at is not None and cause.occurred_at > known.ended_at + self.retention
        ):
            return []
        measured = known.measurements.setdefault(vm, Measurement())
        if all(getattr(measured, name) == value for name, value in values.items()):
            return []
        for name, value in values.items():
            setattr(measured, name, value)
        return [Change("measured", known, uuid.uuid5(cause.event_id, vm), cause.occurred_at, vm)]

    # ------------------------------------------------------------ ageing out

    def prune(self, now: datetime, grace_s: float = 300.0) -> None:
        """Forget events ended longer than the retention (plus a grace for late measurements)
        ago. Their age-out is already counted in the extended incarnation."""
        horizon = now - self.retention - timedelta(seconds=grace_s)
        for known in list(self.events.values()):
            if known.ended_at is not None and known.ended_at < horizon:
                del self.events[known.event_id]
                self.by_run.pop((known.rollout_id, known.host), None)
                for scope in known.scopes:
                    self.extended_aged_out[scope] = self.extended_aged_out.get(scope, 0) + 1
                    of_scope = self.by_scope.get(scope, {})
                    of_scope.pop(known.event_id, None)
                    if not of_scope:
                        self.by_scope.pop(scope, None)

    def _add(self, known: ScheduledEvent) -> None:
        self.events[known.event_id] = known
        for scope in known.scopes:
            self.by_scope.setdefault(scope, {})[known.event_id] = known

    def _aged_out(self, known: ScheduledEvent, now: datetime) -> bool:
        return known.ended_at is not None and known.ended_at + self.retention <= now

    def next_age_out(self, scope: Scope, now: datetime) -> datetime | None:
        """When the next ended event of `scope` leaves the extended view, if any."""
        due = [
            e.ended_at + self.retention
            for e in self.by_scope.get(scope, {}).values()
            if e.ended_at is not None and not self._aged_out(e, now)
        ]
        return min(due, default=None)

    # ------------------------------------------------------------ views

    def caller(self, address: str) -> Caller | None:
        """The VM calling from `address`, if known."""
        return self.callers.get(address)

    def visible(self, caller: Caller | None) -> list[ScheduledEvent]:
        """Active events the caller may see (none for an unknown caller), in a stable order."""
        if caller is None:
            return []
        return [e for e in self._of_scope(caller.scope) if e.active]

    def _of_scope(self, scope: Scope) -> list[ScheduledEvent]:
        events = self.by_scope.get(scope, {}).values()
        return sorted(events, key=lambda e: (e.host, str(e.event_id)))

    def incarnation(self, caller: Caller | None) -> int:
        """Azure's `DocumentIncarnation` of the caller's document."""
        return self.incarnations.get(caller.scope, 0) if caller else 0

    def render(self, caller: Caller | None, api_version: str) -> dict[str, Any]:
        """The document for `caller` in `api_version`, as Azure shows it."""
        return {
            "DocumentIncarnation": self.incarnation(caller),
            "Events": [e.view(api_version, caller.scope) for e in self.visible(caller)]
            if caller
            else [],
        }

    def extended_incarnation(self, caller: Caller | None, now: datetime) -> int:
        """The extended view's incarnation: one more on every change of its array, an ended
        event ageing out included (computed from timestamps, so replicas agree)."""
        if caller is None:
            return 0
        scope = caller.scope
        held = sum(1 for e in self.by_scope.get(scope, {}).values() if self._aged_out(e, now))
        return self.extended_changes.get(scope, 0) + self.extended_aged_out.get(scope, 0) + held

    def render_extended(
        self, caller: Caller | None, api_version: str, now: datetime
    ) -> dict[str, Any]:
        """The extended view: ended events kept for the retention, with measurements."""
        events = []
        if caller is not None:
            events = [
                e.extended_view(api_version, self.policy, caller.scope)
                for e in self._of_scope(caller.scope)
                if not self._aged_out(e, now)
            ]
        return {
            "DocumentIncarnation": self.extended_incarnation(caller, now),
            "Events": events,
            "Extended": True,
        }

    @staticmethod
    def etag(document: dict[str, Any]) -> str:
        """A strong ETag of a rendered document."""
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        return f'"{digest[:32]}"'

    def find(self, caller: Caller | None, event_id: str) -> ScheduledEvent | None:
        """The active event `caller` can see under `event_id`, if any."""
        try:
            wanted = uuid.UUID(event_id)
        except ValueError:
            return None
        known = self.events.get(wanted)
        if known is None or caller is None or not known.active or caller.scope not in known.scopes:
            return None
        return known

    # ------------------------------------------------------------ snapshots

    @property
    def size(self) -> int:
        """Records a snapshot holds (scheduled events and VMs): what writing one costs."""
        return len(self.events) + len(self.placement)

    def to_json(self) -> dict[str, Any]:
        """Everything needed to go on from `seq` (a snapshot)."""
        return {
            "format": 1,
            "seq": self.seq,
            "events": [e.to_json() for e in self.events.values()],
            "incarnations": _scoped(self.incarnations),
            "extended_changes": _scoped(self.extended_changes),
            "extended_aged_out": _scoped(self.extended_aged_out),
            "hosts": {
                host: [self.placement[vm].to_json() for vm in vms if vm in self.placement]
                for host, vms in self.host_vms.items()
            },
        }

    def load(self, data: dict[str, Any]) -> None:
        """Replace the state with a snapshot's (`ValueError` for one of another format)."""
        if data.get("format") != 1:
            raise ValueError(f"unknown snapshot format {data.get('format')!r}")
        self.reset()
        self.seq = int(data["seq"])
        for raw in data["events"]:
            known = ScheduledEvent.from_json(raw)
            self._add(known)
            self.by_run[(known.rollout_id, known.host)] = known.event_id
        self.incarnations = _unscoped(data["incarnations"])
        self.extended_changes = _unscoped(data["extended_changes"])
        self.extended_aged_out = _unscoped(data["extended_aged_out"])
        for host, vms in data["hosts"].items():
            self._on_inventory(HostInventory(host=host, vms=[VMInfo(**vm) for vm in vms]))


def _scoped(counts: dict[Scope, int]) -> list[list[Any]]:
    return [[kind, name, n] for (kind, name), n in sorted(counts.items())]


def _unscoped(rows: Iterable[list[Any]]) -> dict[Scope, int]:
    return {(kind, name): int(n) for kind, name, n in rows}


def _clock_fields(clock: VMClock) -> dict[str, Any]:
    """A VM's clock result as its `Measurement` holds it."""
    return {
        "clock_synced": clock.ok,
        "clock_method": clock.method,
        "skew_before_ms": clock.skew_before_ms,
        "skew_after_ms": clock.skew_after_ms,
    }
