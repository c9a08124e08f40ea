"""The pause window, the critical path: stop every VM of the host together, apply the patch, start
them all again together, within a hard budget, crash-safe.

Freeze maintenance suspends and resumes (memory kept in RAM); Reboot maintenance shuts down and
starts (memory lost). Both run through the same `PauseWindow`. Nothing here waits on the network:
events go to `emit`, which only queues them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from services.host_agent.hypervisor import Hypervisor, HypervisorError
from services.host_agent.journal import JournalEntry, PauseJournal
from services.host_agent.patch import PatchResult, run_patch
from shared.contracts import (
    Event,
    EventType,
    HostPatched,
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
    stop: Callable[[Hypervisor, str], None]
    start: Callable[[Hypervisor, str], None]


def _ops(event_type: EventType, shutdown_timeout_s: float) -> _Ops:
    if event_type == "Reboot":
        return _Ops(
            "shutoff",
            lambda hv, vm: hv.shutdown(vm, shutdown_timeout_s),
            lambda hv, vm: hv.start(vm),
        )
    return _Ops("paused", lambda hv, vm: hv.suspend(vm), lambda hv, vm: hv.resume(vm))


@dataclass
class _VMRun:
    vm: str
    span: Span | None = None
    paused_at: datetime = field(default_factory=lambda: utcnow())
    t_pause: float = 0.0
    stopped: bool = False
    stalled: bool = False
    outcome: str = "failed"
    detail: str | None = None
    paused_ms: float | None = None


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
        executor: Executor,
        call_timeout_s: float = 5.0,
        resume_margin_s: float = 0.02,
        shutdown_timeout_s: float = 60.0,
        resume_give_up_s: float = 60.0,
    ) -> None:
        self.host = host
        self.hv = hypervisor
        self.journal = journal
        self.emit = emit
        self.tracer = tracer
        self.executor = executor
        self.call_timeout_s = call_timeout_s
        self.resume_margin_s = resume_margin_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.resume_give_up_s = resume_give_up_s
        self._lock = asyncio.Lock()
        self._pending_journal: asyncio.Future[None] | None = None
        self._pause_hist = meter.create_histogram(
            "pp.vm.pause.duration", unit="ms", description="VM blackout per pause window"
        )
        self._overhead_hist = meter.create_histogram(
            "pp.window.overhead", unit="ms", description="Window time minus patch time"
        )

    async def _blocking(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self.executor, fn, *args), timeout)

    @property
    def busy(self) -> bool:
        """A window is open."""
        return self._lock.locked()

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
                result = await self._run(req)
                window_span.set_attribute("pp.window_ms", result.window_ms)
                window_span.set_attribute("pp.overhead_ms", result.overhead_ms)
                if not result.ok:
                    window_span.set_status(Status(StatusCode.ERROR, result.error or "failed"))
                return result

    async def _run(self, req: WindowRequest) -> MaintenanceCompleted:
        ops = _ops(req.event_type, self.shutdown_timeout_s)
        vms, _ = await self._blocking(self.hv.list_vms, timeout=self.call_timeout_s)
        targets = [v.vm for v in vms if v.state in STOPPABLE_STATES]
        outcomes = [
            VMWindowOutcome(vm=v.vm, outcome="skipped", detail=f"was {v.state} before the window")
            for v in vms
            if v.state not in STOPPABLE_STATES
        ]
        await self._blocking(
            self.journal.record,
            JournalEntry(
                rollout_id=req.rollout_id,
                scheduled_event_id=str(req.scheduled_event_id) if req.scheduled_event_id else None,
                event_type=req.event_type,
                vms=targets,
                started_at=time.time(),
                budget_s=req.budget_s,
            ),
            timeout=self.call_timeout_s,
        )

        t_open = time.monotonic()
        runs = [_VMRun(vm) for vm in targets]
        await asyncio.gather(*(self._stop(run, ops, req) for run in runs))
        stop_done = time.monotonic()

        # Freeze: the budget bounds the blackout from the first suspend. Reboot: memory is lost
        # anyway; the budget bounds the patch, the guests' shutdown has its own timeout.
        budget_from = t_open if req.event_type == "Freeze" else stop_done
        deadline = budget_from + req.budget_s - self.resume_margin_s
        patch = await self._patch(req, deadline)
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
        forced = patch.timed_out or time.monotonic() >= deadline
        await asyncio.gather(*(self._start(run, ops, req, forced) for run in runs if run.stopped))
        window_ms = (time.monotonic() - t_open) * 1000
        if self._pending_journal is not None:
            await self._pending_journal
            self._pending_journal = None
        await self._blocking(self.journal.clear, timeout=self.call_timeout_s)

        outcomes += [
            VMWindowOutcome(vm=r.vm, outcome=r.outcome, paused_ms=r.paused_ms, detail=r.detail)  # type: ignore[arg-type]
            for r in runs
        ]
        outcomes.sort(key=lambda o: o.vm)
        failed = [o for o in outcomes if o.outcome == "failed"]
        errors = [e for e in (patch.error, *(f"{o.vm}: {o.detail}" for o in failed)) if e]
        if forced and not patch.timed_out:
            errors.append("deadline reached: VMs resumed by force")
        self._overhead_hist.record(window_ms - patch.duration_ms, {"host": self.host})
        completed = MaintenanceCompleted(
            host=self.host,
            rollout_id=req.rollout_id,
            scheduled_event_id=req.scheduled_event_id,
            event_type=req.event_type,
            ok=patch.ok and not failed and not forced,
            window_ms=window_ms,
            patch_ms=patch.duration_ms,
            overhead_ms=window_ms - patch.duration_ms,
            vms=outcomes,
            error="; ".join(errors) or None,
        )
        self.emit(completed)
        log.info(
            "window closed: %d VMs, window %.1f ms, patch %.1f ms, overhead %.2f ms, ok=%s",
            len(runs),
            window_ms,
            patch.duration_ms,
            completed.overhead_ms,
            completed.ok,
        )
        return completed

    async def _stop(self, run: _VMRun, ops: _Ops, req: WindowRequest) -> None:
        t_ns = time.time_ns()
        run.paused_at, run.t_pause = _wall(t_ns), time.monotonic()
        # The span opens when the stop call is issued and closes when the start call returns:
        # its duration is the VM's blackout.
        run.span = span = self.tracer.start_span(
            f"vm.pause {run.vm}",
            start_time=t_ns,
            attributes={
                "pp.host": self.host,
                "pp.vm": run.vm,
                "pp.rollout_id": req.rollout_id or "",
            },
        )
        try:
            await self._blocking(ops.stop, self.hv, run.vm, timeout=self._stop_timeout(req))
        except TimeoutError:
            # The call may still complete: the VM is resumed with the others in any case.
            run.stalled, run.stopped = True, True
            run.detail = "stop call stalled past its timeout"
            log.warning("stop of %s stalled", run.vm)
            return
        except HypervisorError as exc:
            run.detail = f"could not be stopped: {exc}"
            span.set_status(Status(StatusCode.ERROR, run.detail))
            span.end()
            log.warning("stop of %s failed: %s", run.vm, exc)
            return
        run.stopped = True
        with trace.use_span(span, end_on_exit=False):
            self.emit(
                VMPaused(
                    host=self.host, vm=run.vm, rollout_id=req.rollout_id, paused_at=run.paused_at
                )
            )

    def _stop_timeout(self, req: WindowRequest) -> float:
        if req.event_type == "Reboot":
            return self.shutdown_timeout_s + self.call_timeout_s
        return min(self.call_timeout_s, req.budget_s / 2)

    async def _patch(self, req: WindowRequest, deadline: float) -> PatchResult:
        with self.tracer.start_as_current_span(
            f"host.patch {self.host}", attributes={"pp.patch": req.patch.describe()}
        ) as span:
            result = await run_patch(req.patch, deadline, on_spawn=self._remember_patch_group)
            span.set_attribute("pp.patch_ms", result.duration_ms)
            if not result.ok:
                span.set_status(Status(StatusCode.ERROR, result.error or "patch failed"))
            return result

    def _remember_patch_group(self, pgid: int) -> None:
        # Journaled off the event loop, concurrently with the patch: it never delays the window.
        def record() -> None:
            entry = self.journal.load()
            if entry is not None:
                self.journal.record(replace(entry, patch_pgid=pgid))

        self._pending_journal = asyncio.get_running_loop().run_in_executor(self.executor, record)

    async def _start(self, run: _VMRun, ops: _Ops, req: WindowRequest, forced: bool) -> None:
        give_up = time.monotonic() + self.resume_give_up_s
        error: str | None = None
        attempts = 0
        while True:
            attempts += 1
            try:
                state = await self._blocking(self.hv.state, run.vm, timeout=self.call_timeout_s)
                if state == ops.stopped_state:
                    await self._blocking(ops.start, self.hv, run.vm, timeout=self.call_timeout_s)
                error = None
                break
            except (TimeoutError, HypervisorError) as exc:
                error = str(exc) or type(exc).__name__
                if time.monotonic() >= give_up:
                    break
                log.warning(
                    "start of %s failed (attempt %d): %s; retrying", run.vm, attempts, error
                )
                await asyncio.sleep(min(0.5, 0.05 * attempts))
        end_ns = time.time_ns()
        paused_ms = (time.monotonic() - run.t_pause) * 1000
        run.paused_ms = paused_ms
        if error is None:
            run.outcome = "resumed"
        else:
            run.outcome, run.detail = "failed", f"could not be started again: {error}"
        self._pause_hist.record(paused_ms, {"host": self.host, "forced": forced})
        resumed = VMResumed(
            host=self.host,
            vm=run.vm,
            rollout_id=req.rollout_id,
            paused_at=run.paused_at,
            resumed_at=_wall(end_ns),
            paused_ms=paused_ms,
            budget_ms=req.budget_s * 1000,
            forced=forced,
            ok=error is None,
            error=error,
        )
        span = run.span
        assert span is not None
        span.set_attribute("pp.paused_ms", paused_ms)
        span.set_attribute("pp.forced", forced)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        with trace.use_span(span, end_on_exit=False):
            self.emit(resumed)
        span.end(end_time=end_ns)

    async def recover(self) -> MaintenanceCompleted | None:
        """After a restart: start again every VM the journal says this agent stopped.

        A VM someone else paused was never journaled, so it is left alone.
        """
        entry = await self._blocking(self.journal.load, timeout=self.call_timeout_s)
        if entry is None:
            return None
        event_type: EventType = "Reboot" if entry.event_type == "Reboot" else "Freeze"
        ops = _ops(event_type, self.shutdown_timeout_s)
        rollout_id = entry.rollout_id
        log.warning("found an open window from a previous run (%d VMs): recovering", len(entry.vms))
        killed = _kill_orphaned_patch(entry.patch_pgid)
        now = utcnow()
        started = datetime.fromtimestamp(entry.started_at, UTC)
        self.emit(
            HostPatched(
                host=self.host,
                rollout_id=rollout_id,
                ok=False,
                patch_started_at=started,
                patch_finished_at=now,
                patch_ms=max(0.0, (now - started).total_seconds() * 1000),
                error="agent restarted during the window"
                + ("; the patch's process group was killed" if killed else ""),
            )
        )
        outcomes = []
        with self.tracer.start_as_current_span(f"host.recover {self.host}"):
            for vm in entry.vms:
                error = None
                try:
                    state = await self._blocking(self.hv.state, vm, timeout=self.call_timeout_s)
                    if state == ops.stopped_state:
                        await self._blocking(ops.start, self.hv, vm, timeout=self.call_timeout_s)
                except (TimeoutError, HypervisorError) as exc:
                    error = str(exc) or type(exc).__name__
                resumed_at = utcnow()
                paused_ms = max(0.0, (resumed_at - started).total_seconds() * 1000)
                self.emit(
                    VMResumed(
                        host=self.host,
                        vm=vm,
                        rollout_id=rollout_id,
                        paused_at=started,
                        resumed_at=resumed_at,
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
                        detail=error or "resumed from the journal after an agent restart",
                    )
                )
        window_ms = max(0.0, (utcnow() - started).total_seconds() * 1000)
        completed = MaintenanceCompleted(
            host=self.host,
            rollout_id=rollout_id,
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
        await self._blocking(self.journal.clear, timeout=self.call_timeout_s)
        return completed


def _kill_orphaned_patch(pgid: int | None) -> bool:
    """Kill the process group of a patch the crashed agent left running (a session of its own,
    so it survived the agent). The group id is checked against the session id to avoid hitting
    an unrelated process that reused the number."""
    if not pgid:
        return False
    try:
        if os.getsid(pgid) != pgid:
            return False
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
