"""The pause window, the critical path: stop every VM of the host together, apply the patch, start
them all again together, within a hard budget, crash-safe.

Freeze maintenance suspends and resumes (memory kept in RAM); Reboot maintenance shuts down and
starts (memory lost). Both run through the same `PauseWindow`.

The window itself runs on a thread of its own: libvirt calls fan out to a pool of threads (one per
VM, libvirt-python releases the GIL) and the patch is waited on directly, so the path from the
last suspend to the patch and from the patch to the resumes never waits for the event loop. Events
and spans are produced on the loop, from timestamps taken on the path, and go to `emit`, which only
queues them: nothing here waits on the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from services.host_agent.hypervisor import Hypervisor, HypervisorError
from services.host_agent.journal import JournalEntry, PauseJournal
from services.host_agent.patch import PatchResult, kill_group, run_patch
from services.host_agent.realtime import RealtimeWindows, quick_gil_handoff
from shared.contracts import (
    Event,
    EventType,
    HostPatched,
    HostPaused,
    MaintenanceCompleted,
    PatchSpec,
    VMPaused,
    VMResumed,
    VMWindowOutcome,
    utcnow,
)

log = logging.getLogger(__name__)

STOPPABLE_STATES = {"running", "blocked"}


@dataclass(frozen=True)
class WindowRequest:
    """What the planner asked this host to do."""

    rollout_id: str | None
    scheduled_event_id: uuid.UUID | None
    event_type: EventType
    patch: PatchSpec
    budget_s: float


@dataclass(frozen=True)
class _Ops:
    """How VMs are stopped and started: suspend/resume (Freeze) or shutdown/start (Reboot)."""

    stopped_state: str
    stop: Callable[[str], None]
    start: Callable[[str], None]


@dataclass
class Call:
    """One libvirt call of the window, timed on the calling thread."""

    vm: str
    issued_ns: int
    issued: float
    done: float | None = None
    error: str | None = None
    future: Future[Call] | None = field(default=None, repr=False)

    @property
    def stalled(self) -> bool:
        """Still running past its timeout (it may complete later)."""
        return self.done is None and self.error is None


def fan_out(
    pool: ThreadPoolExecutor,
    fn: Callable[[str], None],
    vms: list[str],
    timeout: float,
    lanes: int | None = None,
) -> dict[str, Call]:
    """Call `fn(vm)` for every VM at once, on up to `lanes` threads (default: one per VM); wait at
    most `timeout`. Calls still running are returned as stalled, with their future."""

    def call_one(vm: str) -> Call:
        call = Call(vm, time.time_ns(), time.monotonic())
        try:
            fn(vm)
        except HypervisorError as exc:
            call.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure is this VM's, not the window's
            call.error = f"{type(exc).__name__}: {exc}"
        call.done = time.monotonic()
        return call

    def lane(names: list[str], into: dict[str, Call]) -> None:
        for vm in names:
            into[vm] = call_one(vm)

    if lanes == 1:
        # One lane: no thread to hand over to (used where the hypervisor serializes every call
        # in-process anyway, the test driver): the calls run right here.
        return {vm: call_one(vm) for vm in vms}
    start_ns, start = time.time_ns(), time.monotonic()
    count = max(1, min(lanes or len(vms), len(vms)))
    groups = [vms[i::count] for i in range(count)]
    results: list[dict[str, Call]] = [{} for _ in groups]
    futures = [pool.submit(lane, g, r) for g, r in zip(groups, results, strict=True) if g]
    concurrent.futures.wait(futures, timeout)
    calls: dict[str, Call] = {}
    for group, done, fut in zip(groups, results, futures, strict=False):
        for vm in group:
            calls[vm] = done.get(vm) or Call(
                vm, start_ns, start, future=_call_future(fut, done, vm)
            )
    return calls


def _call_future(lane: Future[None], done: dict[str, Call], vm: str) -> Future[Call]:
    """A future of one VM's call inside a lane still running."""
    result: Future[Call] = Future()

    def finished(_: Future[None]) -> None:
        call = done.get(vm)
        if call is None:
            result.set_exception(RuntimeError(f"{vm}: call lane failed"))
        else:
            result.set_result(call)

    lane.add_done_callback(finished)
    return result


@dataclass
class _Path:
    """What happened on the critical path."""

    targets: list[str]
    skipped: list[VMWindowOutcome]
    opened: float = 0.0
    closed: float = 0.0
    stops: dict[str, Call] = field(default_factory=dict)
    starts: dict[str, Call] = field(default_factory=dict)
    patch: PatchResult | None = None
    forced: bool = False


def _wall(t_ns: int) -> datetime:
    return datetime.fromtimestamp(t_ns / 1e9, UTC)


class PauseWindow:
    """Runs maintenance windows on one host; one window at a time."""

    def __init__(
        self,
        host: str,
        hypervisor: Hypervisor,
        journal: PauseJournal,
        emit: Callable[[Event], None],
        tracer: Tracer,
        meter: Meter,
        call_timeout_s: float = 5.0,
        resume_margin_s: float = 0.02,
        shutdown_timeout_s: float = 60.0,
        resume_give_up_s: float = 60.0,
        max_parallel_calls: int = 64,
        lanes: int | None = None,
        realtime: RealtimeWindows | None = None,
    ) -> None:
        self.host = host
        self.realtime = realtime
        """Real-time priority while the window is open (None: the normal policy)."""
        self.hv = hypervisor
        self.journal = journal
        self.emit = emit
        self.tracer = tracer
        self.call_timeout_s = call_timeout_s
        self.resume_margin_s = resume_margin_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.resume_give_up_s = resume_give_up_s
        # One lane needs no pool threads at all (its calls run on the window's thread).
        self.parallel_calls = 1 if lanes == 1 else max_parallel_calls
        self.calls = ThreadPoolExecutor(self.parallel_calls, thread_name_prefix=f"libvirt-{host}")
        self.lanes = lanes
        """Threads per fan-out; None: one per VM."""
        self.path_thread = ThreadPoolExecutor(1, thread_name_prefix=f"window-{host}")
        self._lock = asyncio.Lock()
        self._spans: dict[str, Span] = {}
        self._pause_hist = meter.create_histogram(
            "pp.vm.pause.duration", unit="ms", description="VM blackout per pause window"
        )
        self._overhead_hist = meter.create_histogram(
            "pp.window.overhead", unit="ms", description="Window time minus patch time"
        )

    def warm_up(self) -> None:
        """Start the pool's threads now, not on the first window's critical path."""
        if self.lanes != 1:
            names = [str(i) for i in range(self.parallel_calls)]
            fan_out(self.calls, lambda _: time.sleep(0.01), names, 5.0)

    def close(self) -> None:
        """Release the threads."""
        self.calls.shutdown(wait=False, cancel_futures=True)
        self.path_thread.shutdown(wait=False, cancel_futures=True)
        self.journal.close()

    @property
    def busy(self) -> bool:
        """A window is open."""
        return self._lock.locked()

    def _ops(self, event_type: EventType) -> _Ops:
        hv = self.hv
        if event_type == "Reboot":
            return _Ops("shutoff", lambda vm: hv.shutdown(vm, self.shutdown_timeout_s), hv.start)
        return _Ops("paused", hv.suspend, hv.resume)

    async def run(self, req: WindowRequest) -> MaintenanceCompleted:
        """Stop every running VM, patch, start them all again; report everything through `emit`."""
        async with self._lock:
            with self.tracer.start_as_current_span(
                f"host.maintenance {self.host}",
                attributes={
                    "pp.host": self.host,
                    "pp.rollout_id": req.rollout_id or "",
                    "pp.event_type": req.event_type,
                    "pp.pause_budget_s": req.budget_s,
                },
            ) as window_span:
                loop = asyncio.get_running_loop()
                context = trace.set_span_in_context(window_span)

                def on_stopped(stops: dict[str, Call]) -> None:
                    self._stopped(req, stops, context)

                path = await loop.run_in_executor(
                    self.path_thread, self._critical_path, req, loop, on_stopped
                )
                result = self._report(req, path)
                window_span.set_attribute("pp.window_ms", result.window_ms)
                window_span.set_attribute("pp.overhead_ms", result.overhead_ms)
                if not result.ok:
                    window_span.set_status(Status(StatusCode.ERROR, result.error or "failed"))
                return result

    # ------------------------------------------------------------ the critical path (own thread)

    def _critical_path(
        self,
        req: WindowRequest,
        loop: asyncio.AbstractEventLoop,
        on_stopped: Callable[[dict[str, Call]], None],
    ) -> _Path:
        with (
            quick_gil_handoff(),
            self.realtime.window() if self.realtime is not None else nullcontext(),
        ):
            return self._path(req, loop, on_stopped)

    def _path(
        self,
        req: WindowRequest,
        loop: asyncio.AbstractEventLoop,
        on_stopped: Callable[[dict[str, Call]], None],
    ) -> _Path:
        ops = self._ops(req.event_type)
        vms, _ = self.hv.list_vms()
        path = _Path(
            targets=[v.vm for v in vms if v.state in STOPPABLE_STATES],
            skipped=[
                VMWindowOutcome(vm=v.vm, outcome="skipped", detail=f"was {v.state} before")
                for v in vms
                if v.state not in STOPPABLE_STATES
            ],
        )
        # On disk before the first suspend: a crash from here on is recovered at restart. The
        # window's id is also in the patch's environment: a restarted agent finds and kills
        # whatever the patch left running.
        window_id = uuid.uuid4().hex
        self.journal.record(
            JournalEntry(
                window_id=window_id,
                rollout_id=req.rollout_id,
                scheduled_event_id=str(req.scheduled_event_id) if req.scheduled_event_id else None,
                event_type=req.event_type,
                vms=path.targets,
                started_at=time.time(),
                budget_s=req.budget_s,
            )
        )
        path.opened = time.monotonic()
        path.stops = fan_out(
            self.calls, ops.stop, path.targets, self._stop_timeout(req), self.lanes
        )
        stopped_at = time.monotonic()

        # Freeze: the budget bounds the blackout from the first suspend. Reboot: memory is lost
        # anyway; the budget bounds the patch, the guests' shutdown has its own timeout.
        budget_from = path.opened if req.event_type == "Freeze" else stopped_at
        deadline = budget_from + req.budget_s - self.resume_margin_s

        def spawned(_: int | None) -> None:
            # Events and spans are made on the loop while the patch runs, not before it starts.
            loop.call_soon_threadsafe(on_stopped, path.stops)

        # The patch knows what it is patching (a fleet-wide script can branch on the host).
        env = {
            "PP_HOST": self.host,
            "PP_ROLLOUT_ID": req.rollout_id or "",
            "PP_EVENT_TYPE": req.event_type,
            "PP_VMS": " ".join(path.targets),
            "PP_PAUSE_BUDGET_S": str(req.budget_s),
            WINDOW_ENV: window_id,
        }
        path.patch = run_patch(req.patch, deadline, on_spawn=spawned, env=env)
        path.forced = path.patch.timed_out or time.monotonic() >= deadline

        to_start = [vm for vm, call in path.stops.items() if call.error is None]
        path.starts = self._start_all(ops, to_start, path.stops)
        path.closed = time.monotonic()
        self.journal.clear()
        return path

    def _start_all(self, ops: _Ops, vms: list[str], stops: dict[str, Call]) -> dict[str, Call]:
        """Start every VM again; retry failures until `resume_give_up_s`. A VM whose stop call
        stalled is started once that call returns: it must not end up stopped after us."""

        def start_if_stopped(vm: str) -> None:
            try:
                ops.start(vm)
            except HypervisorError:
                # Not stopped any more (someone started it) is fine; anything else is not.
                if self.hv.state(vm) == ops.stopped_state:
                    raise

        starts = fan_out(self.calls, start_if_stopped, vms, self.call_timeout_s, self.lanes)
        give_up = time.monotonic() + self.resume_give_up_s
        attempt = 0
        while time.monotonic() < give_up:
            pending = [
                vm
                for vm, call in starts.items()
                if call.error is not None or call.stalled or stops[vm].stalled
            ]
            if not pending:
                break
            attempt += 1
            for vm in pending:
                stalled_stop = stops[vm].future
                if stalled_stop is not None and stalled_stop.done():
                    stops[vm] = replace(stalled_stop.result(), issued=stops[vm].issued)
            log.warning("starting %s again (attempt %d)", ", ".join(pending), attempt + 1)
            time.sleep(min(0.5, 0.05 * attempt))
            retried = fan_out(
                self.calls, start_if_stopped, pending, self.call_timeout_s, self.lanes
            )
            for vm, call in retried.items():
                call.issued_ns, call.issued = starts[vm].issued_ns, starts[vm].issued
                starts[vm] = call
        return starts

    def _stop_timeout(self, req: WindowRequest) -> float:
        if req.event_type == "Reboot":
            return self.shutdown_timeout_s + self.call_timeout_s
        return min(self.call_timeout_s, req.budget_s / 2)

    # ------------------------------------------------------------ events and spans (the loop)

    def _stopped(self, req: WindowRequest, stops: dict[str, Call], context: object) -> None:
        """VMPaused per stopped VM, inside its `vm.pause` span (opened at the stop call), then
        one HostPaused for them all.

        In a window that is not recorded (no trace of it goes anywhere), no VM's span would be:
        the window's own span stands for them (what travels on is the same trace), which spares
        each VM a span made, given attributes and ended for nothing."""
        window = trace.get_current_span(context)  # type: ignore[arg-type]
        recorded = window.is_recording()
        paused: dict[str, datetime] = {}
        for vm, call in stops.items():
            span = (
                self.tracer.start_span(
                    f"vm.pause {vm}",
                    context=context,  # type: ignore[arg-type]
                    start_time=call.issued_ns,
                    attributes={
                        "pp.host": self.host,
                        "pp.vm": vm,
                        "pp.rollout_id": req.rollout_id or "",
                    },
                )
                if recorded
                else window
            )
            if call.error is not None:
                span.set_status(Status(StatusCode.ERROR, f"could not be stopped: {call.error}"))
                span.end()
                log.warning("stop of %s failed: %s", vm, call.error)
                continue
            self._spans[vm] = span
            paused[vm] = _wall(call.issued_ns)
            with trace.use_span(span, end_on_exit=False):
                self.emit(
                    VMPaused(host=self.host, vm=vm, rollout_id=req.rollout_id, paused_at=paused[vm])
                )
        if paused:
            # The same, for the host at once (the planner follows hosts, not each VM's event).
            with trace.use_span(window, end_on_exit=False):
                self.emit(HostPaused(host=self.host, rollout_id=req.rollout_id, paused_at=paused))

    def _report(self, req: WindowRequest, path: _Path) -> MaintenanceCompleted:
        patch = path.patch
        assert patch is not None
        self.emit(
            HostPatched(
                host=self.host,
                rollout_id=req.rollout_id,
                ok=patch.ok,
                patch_started_at=patch.started_at,
                patch_finished_at=patch.finished_at,
                patch_ms=patch.duration_ms,
                exit_code=patch.exit_code,
                error=patch.error,
            )
        )
        outcomes = list(path.skipped)
        for vm, stop in path.stops.items():
            if stop.error is not None:
                outcomes.append(
                    VMWindowOutcome(vm=vm, outcome="failed", detail=f"not stopped: {stop.error}")
                )
                continue
            outcomes.append(self._resumed(req, path, stop, path.starts[vm]))
        outcomes.sort(key=lambda o: o.vm)
        window_ms = (path.closed - path.opened) * 1000
        failed = [o for o in outcomes if o.outcome == "failed"]
        errors = [e for e in (patch.error, *(f"{o.vm}: {o.detail}" for o in failed)) if e]
        if path.forced and not patch.timed_out:
            errors.append("deadline reached: VMs started again by force")
        overhead_ms = window_ms - patch.duration_ms
        self._overhead_hist.record(overhead_ms, {"host": self.host})
        completed = MaintenanceCompleted(
            host=self.host,
            rollout_id=req.rollout_id,
            scheduled_event_id=req.scheduled_event_id,
            event_type=req.event_type,
            ok=patch.ok and not failed and not path.forced,
            window_ms=window_ms,
            patch_ms=patch.duration_ms,
            overhead_ms=overhead_ms,
            vms=outcomes,
            error="; ".join(errors) or None,
        )
        self.emit(completed)
        log.info(
            "window closed: %d VMs, window %.1f ms, patch %.1f ms, overhead %.2f ms, ok=%s",
            len(path.targets),
            window_ms,
            patch.duration_ms,
            overhead_ms,
            completed.ok,
        )
        return completed

    def _resumed(self, req: WindowRequest, path: _Path, stop: Call, start: Call) -> VMWindowOutcome:
        done = start.done if start.done is not None else time.monotonic()
        paused_ms = (done - stop.issued) * 1000
        end_ns = stop.issued_ns + int(paused_ms * 1e6)
        error = start.error if start.error is not None else ("stalled" if start.stalled else None)
        self._pause_hist.record(paused_ms, {"host": self.host, "forced": path.forced})
        span = self._spans.pop(stop.vm)
        recording = span.is_recording()
        if recording:
            span.set_attribute("pp.paused_ms", paused_ms)
            span.set_attribute("pp.forced", path.forced)
        if error is not None and recording:
            span.set_status(Status(StatusCode.ERROR, error))
        with trace.use_span(span, end_on_exit=False):
            self.emit(
                VMResumed(
                    host=self.host,
                    vm=stop.vm,
                    rollout_id=req.rollout_id,
                    paused_at=_wall(stop.issued_ns),
                    resumed_at=_wall(end_ns),
                    paused_ms=paused_ms,
                    budget_ms=req.budget_s * 1000,
                    forced=path.forced,
                    ok=error is None,
                    error=error,
                )
            )
        if recording:
            span.end(end_time=end_ns)
        # The times again, for readers of the host's completion rather than of every VM's event.
        return VMWindowOutcome(
            vm=stop.vm,
            outcome="resumed" if error is None else "failed",
            paused_ms=paused_ms,
            detail=None if error is None else f"not started: {error}",
            paused_at=_wall(stop.issued_ns),
            resumed_at=_wall(end_ns),
            forced=path.forced,
        )

    # ------------------------------------------------------------ recovery

    async def recover(self) -> MaintenanceCompleted | None:
        """After a restart: start again every VM the journal says this agent stopped.

        A VM someone else paused was never journaled, so it is left alone.
        """
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(self.path_thread, self.journal.load)
        if entry is None:
            # Made ready now: the first window records in place (`PauseJournal`).
            await loop.run_in_executor(self.path_thread, self.journal.clear)
            return None
        event_type: EventType = "Reboot" if entry.event_type == "Reboot" else "Freeze"
        ops = self._ops(event_type)
        log.warning("found an open window from a previous run (%d VMs): recovering", len(entry.vms))
        killed = _kill_window_processes(entry.window_id)

        def start_if_stopped(vm: str) -> None:
            if self.hv.state(vm) == ops.stopped_state:
                ops.start(vm)

        starts = await loop.run_in_executor(
            self.path_thread,
            fan_out,
            self.calls,
            start_if_stopped,
            entry.vms,
            self.call_timeout_s,
            self.lanes,
        )
        started = datetime.fromtimestamp(entry.started_at, UTC)
        now = utcnow()
        with self.tracer.start_as_current_span(f"host.recover {self.host}"):
            self.emit(
                HostPatched(
                    host=self.host,
                    rollout_id=entry.rollout_id,
                    ok=False,
                    patch_started_at=started,
                    patch_finished_at=now,
                    patch_ms=max(0.0, (now - started).total_seconds() * 1000),
                    error="agent restarted during the window"
                    + ("; the patch's process group was killed" if killed else ""),
                )
            )
            outcomes = []
            for vm in entry.vms:
                call = starts[vm]
                error = call.error or ("stalled" if call.stalled else None)
                paused_ms = max(0.0, (now - started).total_seconds() * 1000)
                self.emit(
                    VMResumed(
                        host=self.host,
                        vm=vm,
                        rollout_id=entry.rollout_id,
                        paused_at=started,
                        resumed_at=now,
                        paused_ms=paused_ms,
                        budget_ms=entry.budget_s * 1000,
                        forced=True,
                        recovered=True,
                        ok=error is None,
                        error=error,
                    )
                )
                outcomes.append(
                    VMWindowOutcome(
                        vm=vm,
                        outcome="resumed" if error is None else "failed",
                        paused_ms=paused_ms,
                        detail=error or "started again from the journal after an agent restart",
                        paused_at=started,
                        resumed_at=now,
                        forced=True,
                    )
                )
            window_ms = max(0.0, (now - started).total_seconds() * 1000)
            completed = MaintenanceCompleted(
                host=self.host,
                rollout_id=entry.rollout_id,
                scheduled_event_id=uuid.UUID(entry.scheduled_event_id)
                if entry.scheduled_event_id
                else None,
                event_type=event_type,
                ok=False,
                window_ms=window_ms,
                patch_ms=0.0,
                overhead_ms=window_ms,
                vms=outcomes,
                error="agent restarted during the window; VMs recovered from the journal",
                recovered=True,
            )
            self.emit(completed)
        await loop.run_in_executor(self.path_thread, self.journal.clear)
        return completed


WINDOW_ENV = "PP_WINDOW_ID"
"""Environment variable carrying the window's id into the patch and everything it starts."""


def _kill_window_processes(window_id: str | None) -> bool:
    """Kill what the patch of a crashed agent's window left running (in a session of its own,
    it survived the agent): every process whose environment carries the window's id, with its
    process group."""
    if not window_id:
        return False
    marker = f"{WINDOW_ENV}={window_id}".encode()
    killed = False
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            pid = int(proc.name)
            killed = kill_group(os.getpgid(pid)) or killed
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue
    return killed
