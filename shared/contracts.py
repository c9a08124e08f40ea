"""The bus contract: every event and command exchanged by the services.

Each message body is the JSON of one of these pydantic models. Readers ignore unknown fields and
reject missing or malformed ones. Every event carries the envelope (`type`, `event_id`,
`occurred_at`) and knows its own subject, so publishers never type a subject.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from shared import subjects

MAX_PAUSE_BUDGET_S = 30.0
"""The seed's bound: a paused VM is resumed within 30 s."""

DEFAULT_NOTICE_S = 15 * 60.0
"""Azure's minimum notice for Freeze and Reboot events."""

_TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"

Name = Annotated[
    str,
    StringConstraints(pattern=_TOKEN_PATTERN),
    Field(description="A host or VM name; one NATS subject token (letters, digits, '-', '_')."),
]


def is_valid_name(value: str) -> bool:
    """True when `value` can be a host or VM name (a single NATS subject token)."""
    return re.fullmatch(_TOKEN_PATTERN, value) is not None


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class Message(BaseModel):
    """Base of every message: unknown fields ignored, values immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready body of this message."""
        return self.model_dump(mode="json")


class Event(Message):
    """The envelope every event carries."""

    type: str = Field(description="The model's name; checked against the subject's event type.")
    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique id; also the `Nats-Msg-Id` header for JetStream de-duplication.",
    )
    occurred_at: UtcDatetime = Field(default_factory=utcnow, description="When it happened (UTC).")

    subject_template: ClassVar[str] = ""

    def subject(self) -> str:
        """The subject this event is published on."""
        raise NotImplementedError


class HostEvent(Event):
    """An event about one host."""

    host: Name = Field(description="The hypervisor host.")


class VMEvent(HostEvent):
    """An event about one VM of one host."""

    vm: Name = Field(description="The VM (libvirt domain name).")
    rollout_id: str | None = Field(default=None, description="The rollout, if any.")


# ---------------------------------------------------------------- inventory


class VMInfo(Message):
    """One VM as its host-agent sees it, with its placement."""

    vm: Name = Field(description="libvirt domain name.")
    uuid: str = Field(description="libvirt domain UUID.")
    availability_set: str | None = Field(default=None, description="None: a standalone VM.")
    update_domain: int | None = Field(default=None, ge=0, description="Update domain in its set.")
    fault_domain: int | None = Field(default=None, ge=0, description="Fault domain in its set.")
    ip: str | None = Field(default=None, description="Address the VM calls the notifier from.")
    state: str = Field(description="running, paused, shutoff, ... (libvirt's state, lower case).")


class HostInventory(HostEvent):
    """What runs on a host, published at agent start, on a heartbeat and on VM lifecycle changes."""

    type: Literal["HostInventory"] = "HostInventory"
    vms: list[VMInfo] = Field(default_factory=list, description="Every VM of the host.")
    skipped: list[str] = Field(
        default_factory=list,
        description="Domains the agent cannot manage (their names are not valid subject tokens).",
    )
    hypervisor: str = Field(default="", description="libvirt driver type, e.g. QEMU or Test.")
    heartbeat_s: float = Field(default=10.0, description="Seconds until the next inventory.")

    def subject(self) -> str:
        return subjects.host_inventory(self.host)


# ---------------------------------------------------------------- maintenance


class PatchSpec(Message):
    """What to apply to a host: a shell command, or a fixed duration (simulated hosts)."""

    command: str | None = Field(default=None, description="Shell command run on the host.")
    duration_s: float | None = Field(
        default=None, ge=0, le=3600, description="Simulated patch: sleep this long."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PatchSpec:
        if (self.command is None) == (self.duration_s is None):
            raise ValueError("patch needs exactly one of 'command' or 'duration_s'")
        return self

    def describe(self) -> str:
        """One short line for logs and reports."""
        return f"command {self.command!r}" if self.command is not None else f"{self.duration_s}s"


EventType = Literal["Freeze", "Reboot"]


class MaintenancePlanned(HostEvent):
    """A host's maintenance is scheduled: VMs get notice until `not_before`."""

    type: Literal["MaintenancePlanned"] = "MaintenancePlanned"
    rollout_id: str = Field(description="The rollout.")
    update_id: str = Field(description="The update being applied.")
    description: str = Field(default="", description="Shown to VM owners.")
    scheduled_event_id: uuid.UUID = Field(description="EventId in the Scheduled Events API.")
    wave: int = Field(ge=0, description="Wave index in the rollout's plan.")
    event_type: EventType = Field(description="Freeze (memory kept) or Reboot (memory lost).")
    not_before: UtcDatetime = Field(description="Start no earlier than this unless approved.")
    expected_pause_s: float = Field(ge=0, description="Expected interruption.")
    pause_budget_s: float = Field(gt=0, le=MAX_PAUSE_BUDGET_S, description="Hard limit.")
    vms: list[Name] = Field(description="VMs impacted.")

    def subject(self) -> str:
        return subjects.host_planned(self.host)


class MaintenanceApproved(HostEvent):
    """A VM approved (StartRequests) a scheduled event: it may start before `not_before`."""

    type: Literal["MaintenanceApproved"] = "MaintenanceApproved"
    rollout_id: str = Field(description="The rollout.")
    scheduled_event_id: uuid.UUID = Field(description="The approved EventId.")
    vm: Name = Field(description="The VM that approved.")

    def subject(self) -> str:
        return subjects.host_approved(self.host)


class MaintenanceDeferred(HostEvent):
    """A VM asked to postpone a scheduled event (extended API, bounded by policy)."""

    type: Literal["MaintenanceDeferred"] = "MaintenanceDeferred"
    rollout_id: str = Field(description="The rollout.")
    scheduled_event_id: uuid.UUID = Field(description="The deferred EventId.")
    vm: Name = Field(description="The VM that deferred.")
    defer_s: float = Field(gt=0, description="Requested postponement.")

    def subject(self) -> str:
        return subjects.host_deferred(self.host)


class MaintenanceStarted(HostEvent):
    """Go: the host's agent runs its pause (or reboot) window now."""

    type: Literal["MaintenanceStarted"] = "MaintenanceStarted"
    rollout_id: str = Field(description="The rollout.")
    scheduled_event_id: uuid.UUID = Field(description="EventId in the Scheduled Events API.")
    event_type: EventType = Field(default="Freeze", description="Freeze or Reboot path.")
    patch: PatchSpec = Field(description="What to apply.")
    pause_budget_s: float = Field(gt=0, le=MAX_PAUSE_BUDGET_S, description="Hard limit.")
    vms: list[Name] = Field(default_factory=list, description="VMs the planner expects.")
    start_by: UtcDatetime | None = Field(
        default=None,
        description="The agent refuses to begin after this: the planner has counted it failed.",
    )

    def subject(self) -> str:
        return subjects.host_started(self.host)


class MaintenanceCancelled(HostEvent):
    """A scheduled maintenance will not happen (rollout aborted, host gone)."""

    type: Literal["MaintenanceCancelled"] = "MaintenanceCancelled"
    rollout_id: str = Field(description="The rollout.")
    scheduled_event_id: uuid.UUID = Field(description="EventId withdrawn.")
    reason: str = Field(default="", description="Why.")

    def subject(self) -> str:
        return subjects.host_cancelled(self.host)


class VMPaused(VMEvent):
    """A VM is paused (Freeze) or shut down (Reboot) by its host's agent."""

    type: Literal["VMPaused"] = "VMPaused"
    paused_at: UtcDatetime = Field(description="Host clock when the suspend call was issued.")

    def subject(self) -> str:
        return subjects.vm_paused(self.host, self.vm)


class HostPaused(HostEvent):
    """Every VM the window stopped, at once, once they are stopped (besides each one's `VMPaused`):
    what a reader that follows hosts, not VMs, needs to know that they are paused now (the
    planner's `vms_paused_now`), in one event instead of one per VM."""

    type: Literal["HostPaused"] = "HostPaused"
    rollout_id: str | None = Field(default=None, description="The rollout.")
    paused_at: dict[Name, UtcDatetime] = Field(
        description="Each VM stopped, with the host clock when its suspend call was issued."
    )

    def subject(self) -> str:
        return subjects.host_paused(self.host)


class HostPatched(HostEvent):
    """The patch ran (or was killed at the budget)."""

    type: Literal["HostPatched"] = "HostPatched"
    rollout_id: str | None = Field(default=None, description="The rollout.")
    ok: bool = Field(description="True when the patch finished successfully in time.")
    patch_started_at: UtcDatetime = Field(description="Host clock at patch start.")
    patch_finished_at: UtcDatetime = Field(description="Host clock at patch end or kill.")
    patch_ms: float = Field(ge=0, description="Patch duration, monotonic clock.")
    exit_code: int | None = Field(default=None, description="The command's exit status.")
    error: str | None = Field(default=None, description="Why it failed.")

    def subject(self) -> str:
        return subjects.host_patched(self.host)


class VMResumed(VMEvent):
    """A VM runs again."""

    type: Literal["VMResumed"] = "VMResumed"
    paused_at: UtcDatetime = Field(description="Host clock when the suspend call was issued.")
    resumed_at: UtcDatetime = Field(description="Host clock when the resume call returned.")
    paused_ms: float = Field(ge=0, description="Blackout, monotonic clock, host side.")
    budget_ms: float = Field(ge=0, description="The pause budget it ran under.")
    forced: bool = Field(default=False, description="Resumed by the budget deadline.")
    recovered: bool = Field(
        default=False, description="Resumed from the journal after an agent restart."
    )
    ok: bool = Field(default=True, description="False when the VM could not be resumed.")
    error: str | None = Field(default=None, description="What went wrong.")

    def subject(self) -> str:
        return subjects.vm_resumed(self.host, self.vm)


class VMWindowOutcome(Message):
    """One VM's part in a finished window."""

    vm: Name = Field(description="The VM.")
    outcome: Literal["resumed", "skipped", "failed"] = Field(description="What happened.")
    paused_ms: float | None = Field(default=None, description="Blackout, if paused.")
    detail: str | None = Field(default=None, description="Why skipped or failed.")
    paused_at: UtcDatetime | None = Field(
        default=None, description="Host clock when its suspend call was issued (as `VMResumed`)."
    )
    resumed_at: UtcDatetime | None = Field(
        default=None, description="Host clock when it ran again (as `VMResumed`)."
    )
    forced: bool = Field(default=False, description="Started again at the deadline.")


class MaintenanceCompleted(HostEvent):
    """The host's window is over: every VM resumed (or reported), the agent is done."""

    type: Literal["MaintenanceCompleted"] = "MaintenanceCompleted"
    rollout_id: str | None = Field(default=None, description="The rollout.")
    scheduled_event_id: uuid.UUID | None = Field(default=None, description="EventId.")
    event_type: EventType = Field(default="Freeze", description="Freeze or Reboot path.")
    ok: bool = Field(description="Patch ok and every paused VM resumed without force.")
    window_ms: float = Field(ge=0, description="First suspend issued to last resume returned.")
    patch_ms: float = Field(ge=0, description="Patch duration.")
    overhead_ms: float = Field(description="window_ms - patch_ms: what pausepatch added.")
    vms: list[VMWindowOutcome] = Field(default_factory=list, description="Per VM.")
    error: str | None = Field(default=None, description="Summary of what failed.")
    recovered: bool = Field(default=False, description="Closed from the journal after a crash.")

    def subject(self) -> str:
        return subjects.host_completed(self.host)


ClockMethod = Literal["host-time", "rtc", "none"]


class ClockSynced(VMEvent):
    """The guest clock was set after a resume; skew measured before and after."""

    type: Literal["ClockSynced"] = "ClockSynced"
    ok: bool = Field(description="The guest clock is set and verified.")
    skew_before_ms: float | None = Field(default=None, description="guest - host before the set.")
    skew_after_ms: float | None = Field(default=None, description="guest - host after the set.")
    method: ClockMethod = Field(description="host-time (ns precision), rtc, or none.")
    attempts: int = Field(ge=0, description="Tries made.")
    error: str | None = Field(default=None, description="Why not ok.")

    def subject(self) -> str:
        return subjects.vm_clock(self.host, self.vm)


class VMClock(Message):
    """One VM's clock sync as its `ClockSynced` says it, without the envelope."""

    ok: bool = Field(description="The guest clock is set and verified.")
    skew_before_ms: float | None = Field(default=None, description="guest - host before the set.")
    skew_after_ms: float | None = Field(default=None, description="guest - host after the set.")
    method: ClockMethod = Field(description="host-time (ns precision), rtc, or none.")
    attempts: int = Field(ge=0, description="Tries made.")
    error: str | None = Field(default=None, description="Why not ok.")

    @classmethod
    def of(cls, event: ClockSynced) -> VMClock:
        """What `event` says of its VM's clock (read from a valid event: not validated again,
        one per VM)."""
        return cls.model_construct(
            ok=event.ok,
            skew_before_ms=event.skew_before_ms,
            skew_after_ms=event.skew_after_ms,
            method=event.method,
            attempts=event.attempts,
            error=event.error,
        )


class HostClockSynced(HostEvent):
    """Clock syncs of a host's VMs done together, at once (besides each one's `ClockSynced`,
    stored along with it): what a reader that follows hosts, not VMs, needs (the planner's end of
    a wave), in one event instead of one per VM. A host's VMs may come in more than one."""

    type: Literal["HostClockSynced"] = "HostClockSynced"
    rollout_id: str | None = Field(default=None, description="The rollout.")
    clocks: dict[Name, VMClock] = Field(description="Each VM's result, as its `ClockSynced`.")

    def subject(self) -> str:
        return subjects.host_clock(self.host)


RolloutState = Literal["planned", "running", "halted", "aborted", "completed", "failed"]


class RolloutStatus(Event):
    """Progress of a rollout: published at once when its state, waves or reason change, and its
    host counts at most every half second (the latest ones)."""

    type: Literal["RolloutStatus"] = "RolloutStatus"
    rollout_id: str = Field(description="The rollout.")
    state: RolloutState = Field(description="Where it is.")
    waves_total: int = Field(ge=0, description="Waves in the plan.")
    waves_done: int = Field(ge=0, description="Waves finished.")
    hosts_ok: int = Field(ge=0, description="Hosts patched and resumed.")
    hosts_failed: int = Field(ge=0, description="Hosts that failed.")
    reason: str | None = Field(default=None, description="Why halted, aborted or failed.")

    def subject(self) -> str:
        return subjects.rollout_status(self.rollout_id)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        HostInventory,
        MaintenancePlanned,
        MaintenanceApproved,
        MaintenanceDeferred,
        MaintenanceStarted,
        MaintenanceCancelled,
        VMPaused,
        HostPaused,
        HostPatched,
        VMResumed,
        MaintenanceCompleted,
        ClockSynced,
        HostClockSynced,
        RolloutStatus,
    )
}


class InvalidMessage(ValueError):
    """A message that is well-formed JSON but cannot be accepted (unknown type, wrong subject)."""


def parse_event(
    body: Any, accepted: tuple[type[Event], ...], subject: str | None = None
) -> Event | None:
    """Read an event of one of the `accepted` types from a decoded JSON body.

    Returns None for a known event type the caller does not want; raises `InvalidMessage` for an
    unknown type or an event on a subject that is not its own, and pydantic's `ValidationError`
    for a malformed body.
    """
    if not isinstance(body, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(body).__name__}")
    kind = body.get("type")
    if kind not in EVENT_TYPES:
        raise InvalidMessage(f"unknown event type {kind!r}")
    cls = EVENT_TYPES[kind]
    if cls not in accepted:
        return None
    event = cls.model_validate(body)
    ensure_on_subject(event, subject)
    return event


_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([A-Za-z]{1,64})"')
"""An event's type where our publishers put it: first (the models declare it first)."""


def parse_event_bytes(
    data: bytes, accepted: tuple[type[Event], ...], subject: str | None = None
) -> Event | None:
    """`parse_event` on a message's bytes: the same results, the same errors.

    An event that names its type first (every event our services publish) is read straight from
    its bytes into its model, without building a dict of it first: at fleet scale, heartbeats
    alone are a thousand 4 KB inventories a second. Anything else, or anything that does not
    read so, takes `parse_event`'s way, for its exact reason.
    """
    found = _LEADING_TYPE.match(data)
    cls = EVENT_TYPES.get(found.group(1).decode()) if found else None
    if cls is not None:
        if cls not in accepted:
            return None
        if cls is HostInventory and subject is not None:
            repeated = _inventories.repeated(data, subject)
            if repeated is not None:
                return repeated
        try:
            event = cls.model_validate_json(data)
        except ValidationError:
            pass  # read again below, for parse_event's own reason
        else:
            ensure_on_subject(event, subject)
            if isinstance(event, HostInventory) and subject is not None:
                _inventories.keep(data, subject, event)
            return event
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from exc
    return parse_event(body, accepted, subject)


_INVENTORY_ENVELOPE = re.compile(
    rb'\s*\{\s*"type"\s*:\s*"HostInventory"\s*,'
    rb'\s*"event_id"\s*:\s*"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"\s*,'
    rb'\s*"occurred_at"\s*:\s*'
    rb'"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?'
    rb'(?:Z|[+-][0-9]{2}:[0-9]{2}))"\s*,'
)
"""The envelope of an inventory as our agents write it (its type, id and time first, in the
models' order), with or without spaces."""


class RepeatedInventories:
    """A host's heartbeat mostly repeats its last inventory: the same VMs, the same bytes after a
    new `event_id` and `occurred_at`. An inventory whose bytes after that envelope are those of
    the last one read on its subject is that one with the new envelope, without validating its
    VMs again (at fleet scale, heartbeats are a thousand 4 KB inventories a second, read by the
    planner and by every notifier). Anything else is read in full, and kept when valid.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[bytes, HostInventory]] = {}

    def repeated(self, data: bytes, subject: str) -> HostInventory | None:
        """The inventory `data` carries if it repeats the last one kept for `subject`, else None."""
        known = self._last.get(subject)
        if known is None:
            return None
        envelope = _INVENTORY_ENVELOPE.match(data)
        if envelope is None or data[envelope.end() :] != known[0]:
            return None
        occurred_at = datetime.fromisoformat(envelope.group(2).decode())
        if occurred_at.tzinfo is None:  # pragma: no cover - the pattern requires an offset
            return None
        return known[1].model_copy(
            update={
                "event_id": uuid.UUID(envelope.group(1).decode()),
                "occurred_at": occurred_at.astimezone(UTC),
            }
        )

    def keep(self, data: bytes, subject: str, event: HostInventory) -> None:
        """Remember a valid inventory read in full on `subject` (its own)."""
        envelope = _INVENTORY_ENVELOPE.match(data)
        if envelope is not None:
            self._last[subject] = (data[envelope.end() :], event)
        else:
            self._last.pop(subject, None)


_inventories = RepeatedInventories()


def ensure_on_subject(event: Event, subject: str | None) -> None:
    """Raise `InvalidMessage` if `event` arrived on another subject than its own (an event about
    host B published on host A's subject, a VMPaused on a `.resumed` subject)."""
    if subject is not None and event.subject() != subject:
        raise InvalidMessage(f"{event.type} for {event.subject()} arrived on {subject}")


# ---------------------------------------------------------------- commands


class ErrorReply(Message):
    """The structured error every command may answer."""

    error: str = Field(description="A short machine-readable code, e.g. invalid-request.")
    detail: Any = Field(default=None, description="What exactly was wrong.")


class RolloutSubmit(Message):
    """`pp.cmd.rollout.submit` (and `.plan`, the dry run): an update to roll out."""

    update_id: str = Field(min_length=1, max_length=200, description="The update's id.")
    description: str = Field(default="Host server is undergoing maintenance.", max_length=2000)
    hosts: list[Name] | None = Field(default=None, description="Hosts to patch; None: all known.")
    impact: Literal["freeze", "reboot"] = Field(default="freeze", description="Update impact.")
    patch: PatchSpec = Field(description="What to apply on each host.")
    expected_pause_s: float = Field(default=1.0, ge=0, description="Expected pause per host.")
    pause_budget_s: float = Field(default=MAX_PAUSE_BUDGET_S, gt=0, le=MAX_PAUSE_BUDGET_S)
    notice_s: float = Field(default=DEFAULT_NOTICE_S, ge=0, description="Minimum notice.")
    max_hosts_in_flight: int = Field(default=10, ge=1, description="Hosts patched at once.")
    notice_ahead_waves: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Waves after the current one whose hosts get their notice at the same time, so that"
            " a wave's notice runs while the waves before it are patched (0: each wave's notice"
            " starts only once the previous wave finished). A wave never starts before the one"
            " ahead of it finished, whatever its notice."
        ),
    )
    failure_budget: int = Field(default=0, ge=0, description="Host failures before halting.")
    allow_placement_violations: bool = Field(
        default=False,
        description="Patch hosts that carry two update domains of one set (alone, in a wave).",
    )


class RolloutRef(Message):
    """`pp.cmd.rollout.get|halt|resume|abort`: which rollout."""

    rollout_id: str = Field(min_length=1, description="The rollout.")
    reason: str | None = Field(default=None, description="Why (halt/abort), for the record.")
    summary: bool = Field(default=False, description="get: without per-host details.")
    offset: int = Field(default=0, ge=0, description="get: first host of the page.")
    limit: int = Field(
        default=100,
        ge=1,
        le=500,
        description="get: hosts per page, at most (fewer when more would not fit in one message).",
    )


class Page(Message):
    """`pp.cmd.rollout.hosts` (and lists): which page of a long answer."""

    offset: int = Field(default=0, ge=0, description="First item of the page.")
    limit: int = Field(
        default=100,
        ge=1,
        le=500,
        description="Items per page, at most (fewer when more would not fit in one message).",
    )


class ClockAction(Message):
    """`pp.cmd.host.<host>.clock`: set a guest clock from the host clock, or read it.

    With `vm`, the answer is one `ClockReading`; with `vms` (many VMs of the host at once, in
    parallel), a `ClockReadings`.
    """

    vm: Name | None = Field(default=None, description="The VM.")
    vms: list[Name] = Field(default_factory=list, max_length=1024, description="Several VMs.")
    action: Literal["sync", "read"] = Field(default="sync", description="sync: set then verify.")

    @model_validator(mode="after")
    def _some_vm(self) -> ClockAction:
        if (self.vm is None) == (not self.vms):
            raise ValueError("a clock action needs exactly one of 'vm' or 'vms'")
        return self


class ClockReading(Message):
    """Answer to a clock action."""

    vm: Name = Field(description="The VM.")
    ok: bool = Field(description="The action worked.")
    method: ClockMethod = Field(description="How the clock was set.")
    skew_before_ms: float | None = Field(default=None, description="guest - host before.")
    skew_after_ms: float | None = Field(default=None, description="guest - host after.")
    retryable: bool = Field(default=False, description="The guest agent may answer later.")
    error: str | None = Field(default=None, description="Why not ok.")


class ClockReadings(Message):
    """Answer to a clock action on several VMs, in the order asked."""

    readings: list[ClockReading] = Field(description="One per VM.")
