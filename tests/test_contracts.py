"""The bus contract: names, subjects, envelopes, and what readers accept or refuse."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from functools import partial

import pytest
from pydantic import ValidationError

from shared import subjects
from shared.contracts import (
    EVENT_TYPES,
    ClockAction,
    Event,
    HostInventory,
    InvalidMessage,
    MaintenanceStarted,
    PatchSpec,
    RepeatedInventories,
    RolloutSubmit,
    VMInfo,
    VMPaused,
    VMResumed,
    parse_event,
    parse_event_bytes,
    utcnow,
)


@pytest.mark.parametrize("name", ["h1", "web-01", "db_2", "A" * 128])
def test_accepts_names_that_are_one_subject_token(name: str) -> None:
    assert VMPaused(host=name, vm=name, paused_at=utcnow()).subject().count(".") == 5


@pytest.mark.parametrize("name", ["", "a.b", "a*", ">", "a b", "-lead", "é", "A" * 129])
def test_rejects_names_that_cannot_be_a_subject_token(name: str) -> None:
    with pytest.raises(ValidationError):
        VMPaused(host=name, vm="vm", paused_at=utcnow())


def test_every_event_knows_its_type_and_subject() -> None:
    now = utcnow()
    paused = VMPaused(host="h1", vm="a", paused_at=now)
    assert paused.type == "VMPaused" and paused.subject() == subjects.vm_paused("h1", "a")
    assert subjects.vm_paused() == "pp.evt.vm.*.*.paused"
    assert set(EVENT_TYPES) >= {
        "HostInventory", "MaintenancePlanned", "MaintenanceApproved", "MaintenanceStarted",
        "VMPaused", "HostPaused", "HostPatched", "VMResumed", "ClockSynced", "HostClockSynced",
        "RolloutStatus",
    }  # fmt: skip


def test_envelope_has_id_and_utc_time_and_ignores_unknown_fields() -> None:
    body = VMPaused(host="h1", vm="a", paused_at=utcnow()).to_json()
    body["from_the_future"] = 1
    event = parse_event(body, (VMPaused,), subjects.vm_paused("h1", "a"))
    assert isinstance(event, VMPaused) and isinstance(event.event_id, uuid.UUID)
    offset = event.occurred_at.utcoffset()
    assert offset is not None and offset.total_seconds() == 0


def test_readers_refuse_unknown_types_and_events_on_someone_elses_subject() -> None:
    body = VMPaused(host="h1", vm="a", paused_at=utcnow()).to_json()
    with pytest.raises(InvalidMessage, match="arrived on"):
        parse_event(body, (VMPaused,), subjects.vm_paused("h2", "a"))
    with pytest.raises(InvalidMessage, match="unknown event type"):
        parse_event({**body, "type": "VMExploded"}, (VMPaused,))
    assert parse_event(body, (VMResumed,)) is None  # known type, not wanted here
    with pytest.raises(ValidationError):
        parse_event({**body, "paused_at": "yesterday"}, (VMPaused,))


def test_a_patch_is_a_command_or_a_duration_never_both() -> None:
    assert PatchSpec(command="apt-get upgrade -y qemu").describe().startswith("command")
    with pytest.raises(ValidationError):
        PatchSpec()
    with pytest.raises(ValidationError):
        PatchSpec(command="x", duration_s=1)


def test_pause_budget_is_at_most_30_seconds() -> None:
    with pytest.raises(ValidationError, match="pause_budget_s"):
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=1), pause_budget_s=31)
    with pytest.raises(ValidationError):
        MaintenanceStarted(
            host="h1",
            rollout_id="r",
            scheduled_event_id=uuid.uuid4(),
            patch=PatchSpec(duration_s=1),
            pause_budget_s=45,
        )
    defaults = RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=1))
    assert (
        defaults.pause_budget_s == 30
        and defaults.notice_s == 15 * 60
        and defaults.impact == "freeze"
    )


def test_a_clock_action_names_one_vm_or_several() -> None:
    assert ClockAction(vm="a").vm == "a"
    assert ClockAction(vms=["a", "b"]).vms == ["a", "b"]
    bad_actions: list[dict[str, object]] = [{}, {"vm": "a", "vms": ["b"]}, {"vms": []}]
    for bad in bad_actions:
        with pytest.raises(ValidationError):
            ClockAction.model_validate(bad)


def _outcome(read: Callable[[], Event | None]) -> tuple[str, str]:
    """What a reader made of a message: the event read, or the error with its message."""
    try:
        event = read()
    except (ValidationError, InvalidMessage) as exc:
        return type(exc).__name__, str(exc).splitlines()[0]
    return "event", event.model_dump_json() if event is not None else "None"


def test_reading_from_the_bytes_gives_what_reading_the_json_gives() -> None:
    paused = VMPaused(host="h1", vm="a", paused_at=utcnow())
    body = paused.to_json()
    on = subjects.vm_paused("h1", "a")
    untyped = {k: v for k, v in body.items() if k != "type"}
    resumed_type = {**body, "type": "VMResumed"}
    messages = {
        "as published": paused.model_dump_json().encode(),
        "spaced": json.dumps(body).encode(),
        "type last": json.dumps(untyped | {"type": "VMPaused"}).encode(),
        "no type": json.dumps(untyped).encode(),
        "another type said twice": b'{"type": "VMPaused", ' + json.dumps(resumed_type)[1:].encode(),
        "unknown type": json.dumps({**body, "type": "VMExploded"}).encode(),
        "malformed": json.dumps({**body, "paused_at": "yesterday"}).encode(),
        "not wanted here": VMResumed(
            host="h1", vm="a", paused_at=utcnow(), resumed_at=utcnow(), paused_ms=1, budget_ms=1
        ).model_dump_json().encode(),
        "a list": b"[1, 2]",
    }  # fmt: skip
    for name, data in messages.items():
        for subject in (on, subjects.vm_paused("h2", "a")):
            fast = _outcome(partial(parse_event_bytes, data, (VMPaused,), subject))
            slow = _outcome(partial(parse_event, json.loads(data), (VMPaused,), subject))
            assert fast == slow, (name, subject)
    assert _outcome(lambda: parse_event_bytes(b"\x00\xffnot json", (VMPaused,)))[0] == (
        "InvalidMessage"
    )


def test_a_repeated_inventory_reads_as_a_full_reading_of_it_would() -> None:
    """An inventory whose bytes after its envelope repeat the last one read on its subject is
    not validated again (`RepeatedInventories`); whatever comes, the reading is the same as
    reading the JSON in full, and what differs (VMs, host, a malformed envelope) is read in full."""
    on = subjects.host_inventory("h1")
    vms = [
        VMInfo(vm=f"v{i}", uuid=str(uuid.uuid4()), state="running", ip=f"10.0.0.{i}")
        for i in range(3)
    ]

    def inventory(host: str, vms: list[VMInfo]) -> HostInventory:
        return HostInventory(host=host, vms=vms, hypervisor="Test")

    first = inventory("h1", vms)
    paused = [vms[0].model_copy(update={"state": "paused"}), *vms[1:]]
    beat = first.model_copy(update={"event_id": uuid.uuid4(), "occurred_at": utcnow()})
    body = beat.to_json()
    messages = {
        "first": first.model_dump_json().encode(),
        "heartbeat": beat.model_dump_json().encode(),
        "heartbeat, at an offset": json.dumps(
            {**body, "occurred_at": "2026-11-26T21:30:00.5+01:00"}, separators=(",", ":")
        ).encode(),
        "heartbeat, spaced": json.dumps(body).encode(),
        "heartbeat, spaced, again": json.dumps(body).encode(),
        "heartbeat, no microseconds": json.dumps(
            {**body, "occurred_at": "2026-11-26T20:30:00Z"}, separators=(",", ":")
        ).encode(),
        "heartbeat, without an offset": json.dumps(
            {**body, "occurred_at": "2026-11-26T20:30:00"}, separators=(",", ":")
        ).encode(),
        "heartbeat, a bad id": json.dumps(
            {**body, "event_id": "not-a-uuid"}, separators=(",", ":")
        ).encode(),
        "a VM paused": inventory("h1", paused).model_dump_json().encode(),
        "the heartbeat again": beat.model_dump_json().encode(),
        "another host's": inventory("h2", vms).model_dump_json().encode(),
        "the heartbeat, once more": beat.model_dump_json().encode(),
    }  # fmt: skip
    for name, data in messages.items():
        fast = _outcome(partial(parse_event_bytes, data, (HostInventory,), on))
        slow = _outcome(partial(parse_event, json.loads(data), (HostInventory,), on))
        assert fast == slow, name
    # The heartbeat is read without validating its VMs again, into the same event.
    repeated = RepeatedInventories()
    data = beat.model_dump_json().encode()
    assert repeated.repeated(data, on) is None  # nothing kept yet
    repeated.keep(first.model_dump_json().encode(), on, first)
    read = repeated.repeated(data, on)
    assert read == beat and read.event_id != first.event_id
    assert repeated.repeated(data, subjects.host_inventory("h2")) is None
    assert (
        repeated.repeated(HostInventory(host="h1", vms=paused).model_dump_json().encode(), on)
        is None
    )
