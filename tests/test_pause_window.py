"""The pause window on libvirt's test driver, in-process: what happens to each VM, the journal,
recovery, and the Reboot path (same window, shutdown/start instead of suspend/resume)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.host_agent.journal import HandledEvents, JournalEntry, PauseJournal
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor
from services.host_agent.pause_window import PauseWindow, WindowRequest
from shared.contracts import Event, HostPaused, PatchSpec, VMInfo, VMPaused, VMResumed
from shared.devstack import SimVM, sim_node_xml

VMS = [SimVM("a", "web", 0), SimVM("b", "web", 0), SimVM("c", None), SimVM("off", running=False)]


class VanishingHypervisor(LibvirtHypervisor):
    """The test driver, with one VM destroyed right after the window lists the VMs (a VM that
    goes away between listing and suspend)."""

    vanishing: str | None = None

    def list_vms(self) -> tuple[list[VMInfo], list[str]]:
        listed = super().list_vms()
        if self.vanishing:
            dom = self.connection.lookupByName(self.vanishing)
            dom.destroy()
            dom.undefine()
            self.vanishing = None
        return listed


@pytest.fixture
def hv(tmp_path: Path) -> VanishingHypervisor:
    node = tmp_path / "node.xml"
    node.write_text(sim_node_xml(VMS))
    return VanishingHypervisor(f"test://{node}")


def window(hv: LibvirtHypervisor, journal: PauseJournal, events: list[Event]) -> PauseWindow:
    return PauseWindow(
        "h1",
        hv,
        journal,
        events.append,
        TracerProvider().get_tracer("test"),
        MeterProvider().get_meter("test"),
        lanes=1,
    )


def request(patch: PatchSpec, event_type: str = "Freeze", budget_s: float = 5) -> WindowRequest:
    return WindowRequest("r1", uuid.uuid4(), event_type, patch, budget_s)  # type: ignore[arg-type]


async def test_a_vm_that_disappears_is_reported_and_the_others_resume(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    events: list[Event] = []
    hv.vanishing = "b"
    result = await window(hv, PauseJournal(tmp_path / "j.json"), events).run(
        request(PatchSpec(duration_s=0.05))
    )
    outcomes = {o.vm: o for o in result.vms}
    assert outcomes["b"].outcome == "failed" and "not stopped" in (outcomes["b"].detail or "")
    assert outcomes["a"].outcome == outcomes["c"].outcome == "resumed"
    assert outcomes["off"].outcome == "skipped"  # shut off before the window: left alone
    assert not result.ok and "b:" in (result.error or "")
    assert hv.state("a") == hv.state("c") == "running" and hv.state("off") == "shutoff"
    assert sorted(e.vm for e in events if isinstance(e, VMResumed)) == ["a", "c"]


async def test_the_hosts_events_say_what_each_vms_events_say(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    """`HostPaused` and the completion's outcomes carry each VM's times as its own `VMPaused`
    and `VMResumed` do: the planner reads those two, not an event per VM."""
    events: list[Event] = []
    result = await window(hv, PauseJournal(tmp_path / "j.json"), events).run(
        request(PatchSpec(duration_s=0.05))
    )
    paused = {e.vm: e.paused_at for e in events if isinstance(e, VMPaused)}
    host_paused = [e for e in events if isinstance(e, HostPaused)]
    assert len(host_paused) == 1 and host_paused[0].paused_at == paused
    assert sorted(paused) == ["a", "b", "c"]
    resumed = {e.vm: e for e in events if isinstance(e, VMResumed)}
    outcomes = {o.vm: o for o in result.vms}
    for vm, event in resumed.items():
        outcome = outcomes[vm]
        assert (outcome.paused_at, outcome.resumed_at) == (event.paused_at, event.resumed_at)
        assert (outcome.paused_ms, outcome.forced) == (event.paused_ms, event.forced)
    assert outcomes["off"].paused_at is None and outcomes["off"].resumed_at is None


async def test_journal_is_on_disk_before_the_first_suspend_and_gone_after(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    journal = PauseJournal(tmp_path / "j.json")
    copy = tmp_path / "seen-during-patch.json"
    events: list[Event] = []
    # The patch runs with every VM paused: it copies the journal as it is at that moment.
    result = await window(hv, journal, events).run(
        request(PatchSpec(command=f"cp {journal.path} {copy}"))
    )
    assert result.ok
    seen = PauseJournal(copy).load()
    assert seen is not None and seen.vms == ["a", "b", "c"] and seen.rollout_id == "r1"
    assert journal.load() is None  # closed: every VM runs again
    paused = [e for e in events if isinstance(e, VMPaused)]
    assert len(paused) == 3


async def test_recovery_resumes_only_what_the_journal_says_we_paused(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    journal = PauseJournal(tmp_path / "j.json")
    hv.suspend("a")  # ours, as a crashed agent left it
    hv.suspend("c")  # someone else's
    journal.record(JournalEntry("r1", str(uuid.uuid4()), "Freeze", ["a", "b"], time.time(), 5))
    events: list[Event] = []
    completed = await window(hv, journal, events).recover()
    assert completed is not None and completed.recovered and not completed.ok
    assert hv.state("a") == "running" and hv.state("c") == "paused"
    resumed = [e for e in events if isinstance(e, VMResumed)]
    assert sorted(e.vm for e in resumed) == ["a", "b"] and all(e.recovered for e in resumed)
    assert journal.load() is None


async def test_reboot_maintenance_shuts_vms_down_and_starts_them_again(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    conn = hv.connection
    events: list[Event] = []
    states_during_patch = tmp_path / "states"
    result = await window(hv, PauseJournal(tmp_path / "j.json"), events).run(
        request(PatchSpec(command=f"echo $PP_EVENT_TYPE $PP_VMS > {states_during_patch}"), "Reboot")
    )
    assert result.ok and result.event_type == "Reboot"
    assert states_during_patch.read_text().split() == ["Reboot", "a", "b", "c"]
    for name in ("a", "b", "c"):
        assert conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert {o.outcome for o in result.vms if o.vm != "off"} == {"resumed"}


Seen = list[tuple[Event, trace.SpanContext]]


def traced_window(
    hv: LibvirtHypervisor, journal: PauseJournal, provider: TracerProvider
) -> tuple[PauseWindow, Seen]:
    """A window whose events are kept with the trace context current when each was emitted."""
    seen: Seen = []

    def emit(event: Event) -> None:
        seen.append((event, trace.get_current_span().get_span_context()))

    pause = PauseWindow(
        "h1",
        hv,
        journal,
        emit,
        provider.get_tracer("test"),
        MeterProvider().get_meter("test"),
        lanes=1,
    )
    return pause, seen


async def test_each_vm_has_its_span_in_a_recorded_window_and_none_in_an_unrecorded_one(
    hv: VanishingHypervisor, tmp_path: Path
) -> None:
    # Recorded (an exporting agent): a `vm.pause` span per VM, current for its two events.
    exporter = InMemorySpanExporter()
    recorded = TracerProvider()
    recorded.add_span_processor(SimpleSpanProcessor(exporter))
    pause, seen = traced_window(hv, PauseJournal(tmp_path / "1.json"), recorded)
    await pause.run(request(PatchSpec(duration_s=0.01)))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"vm.pause a", "vm.pause b", "vm.pause c"} <= set(spans)
    per_vm = [(e, ctx) for e, ctx in seen if isinstance(e, VMPaused | VMResumed)]
    assert len(per_vm) == 6
    for event, ctx in per_vm:
        span_context = spans[f"vm.pause {event.vm}"].context  # type: ignore[attr-defined]
        assert span_context is not None and ctx.span_id == span_context.span_id
    # Not recorded (an agent that exports no traces): no span per VM; every VM's events carry
    # the window's own trace context on.
    unrecorded = TracerProvider(sampler=sampling.ParentBased(sampling.ALWAYS_OFF))
    pause, seen = traced_window(hv, PauseJournal(tmp_path / "2.json"), unrecorded)
    await pause.run(request(PatchSpec(duration_s=0.01)))
    per_vm = [(e, ctx) for e, ctx in seen if isinstance(e, VMPaused | VMResumed)]
    assert len(per_vm) == 6
    contexts = {(ctx.trace_id, ctx.span_id) for _, ctx in per_vm}
    assert len(contexts) == 1
    window_context = per_vm[0][1]
    assert window_context.is_valid and not window_context.trace_flags.sampled
    assert {ctx.trace_id for _, ctx in seen} == {window_context.trace_id}


def test_the_journal_is_rewritten_in_place_once_ready_and_replaced_over_an_open_window(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.json"
    journal = PauseJournal(path)
    entry = JournalEntry("r1", str(uuid.uuid4()), "Freeze", ["a", "b"], time.time(), 5, "w1")
    journal.clear()  # made ready (an agent's start)
    inode = path.stat().st_ino
    journal.record(entry)
    assert PauseJournal(path).load() == entry and path.stat().st_ino == inode
    journal.clear()
    assert PauseJournal(path).load() is None and path.stat().st_ino == inode
    longer = JournalEntry("r2", None, "Reboot", [f"vm-{i}" for i in range(50)], 1.5, 30)
    journal.record(longer)  # longer than the file: it grows, in place
    assert PauseJournal(path).load() == longer and path.stat().st_ino == inode
    journal.clear()  # shorter than the file: padded
    assert PauseJournal(path).load() is None and path.stat().st_ino == inode
    # A window still open (its VMs not all started again): the next record replaces the file
    # whole, so that a crash while writing it leaves the open one readable.
    journal.record(entry)
    journal.record(longer)
    assert PauseJournal(path).load() == longer and path.stat().st_ino != inode
    journal.close()


def test_handled_events_are_durable_from_the_first_and_compacted_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real calls, watched: which file each fsync flushed, and each rename, in order.
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        calls.append(("replace", str(src)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "state" / "handled-events"
    handled = HandledEvents(path, keep=10)
    handled.add("e0")  # creates the file: the file and its directory flushed
    assert calls == [("fsync", str(path)), ("fsync", str(path.parent))]
    for i in range(1, 20):
        calls.clear()
        handled.add(f"e{i}")
        assert calls == [("fsync", str(path))], i  # up to twice `keep`: appended, each flushed
    calls.clear()
    handled.add("e20")  # past twice `keep`: the last ten, flushed before and after the rename
    tmp = str(path.with_suffix(".tmp"))
    assert calls == [("fsync", tmp), ("replace", tmp), ("fsync", str(path.parent))]
    assert path.read_text().split() == [f"e{i}" for i in range(11, 21)]
    handled.add("e20")  # already there: nothing written
    assert len(calls) == 3
    # A restarted agent knows what was kept, and the compacted-away ids no longer.
    again = HandledEvents(path, keep=10)
    assert "e20" in again and "e11" in again and "e10" not in again


def test_an_append_cut_short_by_a_crash_does_not_swallow_the_next_id(tmp_path: Path) -> None:
    path = tmp_path / "handled-events"
    path.write_text("e1\ne2")  # the crash cut "e2\n" before its newline
    handled = HandledEvents(path)
    handled.add("e3")
    assert path.read_text().split() == ["e1", "e2", "e3"]
    assert "e3" in HandledEvents(path) and "e2" in HandledEvents(path)


def test_a_record_cut_short_reads_as_no_window_and_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    journal = PauseJournal(path)
    journal.clear()
    journal.record(JournalEntry("r1", None, "Freeze", ["a", "b"], time.time(), 5))
    journal.close()
    whole = path.read_bytes()
    # The first part of the file written, the rest as the closed window left it: valid JSON in
    # places, never the entry.
    cleared = PauseJournal(tmp_path / "other.json")
    cleared.clear()
    cleared.close()
    old = (tmp_path / "other.json").read_bytes().ljust(len(whole))
    for cut in (20, len(whole) // 2, len(whole) - 3):
        path.write_bytes(whole[:cut] + old[cut:])
        assert PauseJournal(path).load() is None
        assert path.with_suffix(".corrupt").read_bytes() == whole[:cut] + old[cut:]
    # An entry altered but still JSON: its checksum says so.
    path.write_bytes(whole.replace(b'"a"', b'"x"'))
    assert PauseJournal(path).load() is None


def test_a_journal_of_the_previous_format_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    entry = JournalEntry("r1", str(uuid.uuid4()), "Freeze", ["a"], 1700000000.25, 5, "w1")
    path.write_text(json.dumps(dataclasses.asdict(entry)))  # what earlier agents wrote
    assert PauseJournal(path).load() == entry
