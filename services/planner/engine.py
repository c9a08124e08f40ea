"""The rollout engine: turns requests into waves, gives notice, starts hosts, tracks results,
halts on failures. Plain Python: events go out through `publish`, state through `RolloutStore`;
time comes from `now()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Tracer

from services.planner.state import (
    HostRun,
    Rollout,
    RolloutStore,
    VMRecord,
    new_rollout_id,
    placement_of,
)
from services.planner.waves import PlanningError, WavePlan, plan_waves
from shared.contracts import (
    ErrorReply,
    Event,
    HostClockSynced,
    HostInventory,
    HostPatched,
    HostPaused,
    MaintenanceApproved,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenanceDeferred,
    MaintenancePlanned,
    MaintenanceStarted,
    RolloutStatus,
    RolloutSubmit,
    VMClock,
    VMInfo,
    utcnow,
)
from shared.logs import log_context
from shared.telemetry import context_from_carrier, current_carrier

log = logging.getLogger(__name__)

REBOOT_MIN_NOTICE_S = 15 * 60.0
STATUS_EVERY_S = 0.5
"""A rollout's host counts are published at most this often (its state changes at once)."""
PRUNE_EVERY_S = 60.0
"""How often finished rollouts are checked against the retention."""
PRUNE_RETRY_S = 3600.0
"""After a failure to forget them, when it is tried again."""

ClockLookup = Callable[[str, str, list[str]], Awaitable[dict[str, VMClock]]]
"""`(rollout id, host, VMs)`: the clock results of those VMs in that rollout that the stream
holds (`RolloutEngine.clock_lookup`)."""


class RequestError(Exception):
    """A command that cannot be carried out; answered as `{error, detail}`."""

    def __init__(self, error: str, detail: Any = None) -> None:
        super().__init__(f"{error}: {detail}")
        self.reply = ErrorReply(error=error, detail=detail)


def _event_id(scheduled_event_id: uuid.UUID, what: str) -> uuid.UUID:
    """A deterministic event id: re-publishing after a restart is de-duplicated by JetStream."""
    return uuid.uuid5(scheduled_event_id, what)


REPLY_MAX_BYTES = 512 * 1024
"""What a page of a command's answer holds at most (NATS refuses messages over 1 MiB)."""

BULKY_KEYS = ("waves", "violations", "skipped_hosts", "unknown_hosts")
"""What grows with the fleet in an answer: left out when the answer would not fit in one
message (each host's wave is in the report's pages)."""


def fit_reply(result: dict[str, Any], limit: int) -> dict[str, Any]:
    """`result` if its JSON fits in `limit` bytes; else the same without what grows with the
    fleet (`BULKY_KEYS`, counted in `waves_total`, named in `left_out`); else a `too-large`
    error. A rollout of ~60,000 hosts has a plan larger than one NATS message: without this its
    answer was dropped and the caller waited for nothing."""
    size = len(json.dumps(result))
    if size <= limit:
        return result
    slim = {k: v for k, v in result.items() if k not in BULKY_KEYS}
    if "waves" in result:
        slim["waves_total"] = len(result["waves"])
    slim["left_out"] = [k for k in BULKY_KEYS if k in result]
    slim["left_out_why"] = (
        f"the whole answer is {size:,} bytes, more than one NATS message carries "
        f"({limit:,}): each host's wave is in the rollout's report, a page at a time"
    )
    if len(json.dumps(slim)) <= limit:
        return slim
    return RequestError(
        "too-large",
        f"the answer is {size:,} bytes, more than one NATS message carries ({limit:,})",
    ).reply.to_json()


def fill_page(items: Iterable[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The first of `items` whose JSON fits in `budget` bytes together (at least one, so that
    paging always moves on): a page of 500 hosts of 20 VMs each is several MiB."""
    page: list[dict[str, Any]] = []
    for item in items:
        size = len(json.dumps(item)) + 1
        if page and size > budget:
            break
        budget -= size
        page.append(item)
    return page


class RolloutEngine:
    """All rollouts of the fleet (run by the active planner only)."""

    def __init__(
        self,
        store: RolloutStore,
        publish: Callable[[Event], Awaitable[None]],
        tracer: Tracer,
        now: Callable[[], datetime] = utcnow,
        start_timeout_s: float = 10.0,
        host_grace_s: float = 30.0,
        clock_timeout_s: float = 20.0,
        inventory_stale_s: float = 60.0,
        reboot_min_notice_s: float = REBOOT_MIN_NOTICE_S,
        max_defer_s: float = 600.0,
        max_defers: int = 1,
        retention_s: float = 7 * 24 * 3600.0,
        clock_lookup: ClockLookup | None = None,
        clock_lookup_after_s: float = 2.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.tracer = tracer
        self.now = now
        self.start_timeout_s = start_timeout_s
        self.host_grace_s = host_grace_s
        self.clock_timeout_s = clock_timeout_s
        self.inventory_stale_s = inventory_stale_s
        self.reboot_min_notice_s = reboot_min_notice_s
        self.max_defer_s = max_defer_s
        self.max_defers = max_defers
        self.retention_s = retention_s
        self.clock_lookup = clock_lookup
        """Reads clock results from the stream for a host whose results have not all come
        `clock_lookup_after_s` after its completion (`_look_up_clocks`); None: only wait."""
        self.clock_lookup_after_s = clock_lookup_after_s
        self._clock_lookup_due: dict[tuple[str, str], datetime] = {}
        self._next_prune: datetime | None = None
        self.inventory: dict[str, HostInventory] = {}
        self._placements: dict[str, list[tuple[str, int]]] = {}
        """Each inventory's (set, UD) pairs, worked out once when it arrives: every wave
        compares the hosts still to do against them."""
        self.rollouts: dict[str, Rollout] = {}
        self.hosts: dict[tuple[str, str], HostRun] = {}
        self._runs: dict[str, dict[str, HostRun]] = {}
        """The same host records, per rollout: a rollout's view never scans the others."""
        self._last_status: dict[str, dict[str, Any]] = {}
        self._status_at: dict[str, datetime] = {}
        self._status_due: set[str] = set()

    # ------------------------------------------------------------ state

    async def load(self) -> None:
        """Read every rollout from the store (at start, or when taking over)."""
        rollouts, hosts = await self.store.load_all()
        self.rollouts = {r.rollout_id: r for r in rollouts}
        self.hosts, self._runs = {}, {}
        for run in hosts:
            self._add_run(run)
        active = [r.rollout_id for r in rollouts if r.active]
        if active:
            log.info("resuming %d active rollout(s): %s", len(active), ", ".join(active))

    def _add_run(self, run: HostRun) -> None:
        self.hosts[(run.rollout_id, run.host)] = run
        self._runs.setdefault(run.rollout_id, {})[run.host] = run

    def host_runs(self, rollout_id: str) -> list[HostRun]:
        """The host records of a rollout, by wave then name."""
        runs = self._runs.get(rollout_id, {}).values()
        return sorted(runs, key=lambda h: (h.wave, h.host))

    def _horizon(self) -> datetime:
        """An inventory older than this is stale: its host is taken for gone."""
        return self.now() - timedelta(seconds=self.inventory_stale_s)

    def _fleet(self) -> dict[str, list[VMInfo]]:
        horizon = self._horizon()
        return {h: inv.vms for h, inv in self.inventory.items() if inv.occurred_at >= horizon}

    def _fresh_vms(self, host: str, horizon: datetime) -> list[VMInfo] | None:
        """The VMs `host` reported since `horizon`, or None (no recent inventory): one host's
        view of `_fleet()`, without building the whole fleet's."""
        inv = self.inventory.get(host)
        return inv.vms if inv is not None and inv.occurred_at >= horizon else None

    # ------------------------------------------------------------ commands

    def validate(self, request: RolloutSubmit) -> tuple[str, RolloutSubmit]:
        """The event type of `request` and the request with its notice raised to the minimum.

        Not every update can be memory-preserving: `impact: reboot`, or an expected pause above
        the budget, is a Reboot maintenance, with at least the Reboot notice.
        """
        if request.impact == "reboot" or request.expected_pause_s > request.pause_budget_s:
            return "Reboot", request
        return "Freeze", request

    def plan(self, request: RolloutSubmit) -> WavePlan:
        """The waves `request` would run in, from the current inventory (the dry run)."""
        fleet = self._fleet()
        if not fleet:
            raise RequestError("no-inventory", "no host-agent has reported an inventory yet")
        busy = self._busy_hosts()
        wanted = request.hosts if request.hosts is not None else sorted(fleet)
        clash = sorted(set(wanted) & busy)
        if clash:
            raise RequestError("hosts-busy", {"hosts": clash, "reason": "in an active rollout"})
        try:
            return plan_waves(
                fleet,
                hosts=wanted,
                max_hosts_in_flight=request.max_hosts_in_flight,
                allow_placement_violations=request.allow_placement_violations,
            )
        except PlanningError as exc:
            raise RequestError("plan-invalid", str(exc)) from exc

    def _busy_hosts(self) -> set[str]:
        busy: set[str] = set()
        for (rid, host), run in self.hosts.items():
            rollout = self.rollouts.get(rid)
            if rollout is not None and rollout.active and not run.terminal:
                busy.add(host)
        return busy

    async def submit(self, request: RolloutSubmit) -> Rollout:
        """Plan and start a rollout."""
        event_type, request = self.validate(request)
        plan = self.plan(request)
        if not plan.waves:
            raise RequestError("nothing-to-do", plan.to_json())
        rollout = Rollout(
            rollout_id=new_rollout_id(),
            request=request,
            event_type=event_type,  # type: ignore[arg-type]
            state="running",
            waves=plan.waves,
            lower_bound=plan.lower_bound,
            violations=plan.to_json()["violations"],
            skipped_hosts={h: "unknown host" for h in plan.unknown_hosts},
        )
        notice = self._notice_s(rollout)
        rollout.note(
            f"submitted: update {request.update_id}, {event_type}, {len(plan.waves)} wave(s), "
            f"lower bound {plan.lower_bound}, notice {notice:.0f} s"
        )
        fleet = self._fleet()
        self.rollouts[rollout.rollout_id] = rollout
        for wave, hosts in enumerate(plan.waves):
            for host in hosts:
                run = HostRun(
                    rollout_id=rollout.rollout_id,
                    host=host,
                    wave=wave,
                    event_type=rollout.event_type,
                    vms=[v.vm for v in fleet.get(host, [])],
                    placement=self._placements.get(host, []),
                )
                self._add_run(run)
                self.store.mark_host(run)
        await self.store.flush()  # every host record, written at once, before the rollout's
        await self.store.save_rollout(rollout)
        await self._status(rollout)
        return rollout

    def _notice_s(self, rollout: Rollout) -> float:
        notice = rollout.request.notice_s
        if rollout.event_type == "Reboot":
            notice = max(notice, self.reboot_min_notice_s)
        return notice

    def get(self, rollout_id: str) -> Rollout:
        """One rollout, or a `not-found` error."""
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise RequestError("not-found", f"no rollout {rollout_id!r}")
        return rollout

    async def halt(self, rollout_id: str, reason: str | None) -> Rollout:
        """No new host starts; hosts in flight finish."""
        rollout = self.get(rollout_id)
        if rollout.state not in ("running", "planned"):
            raise RequestError("invalid-state", f"rollout is {rollout.state}")
        await self._halt(rollout, f"halted by operator: {reason or 'no reason given'}")
        return rollout

    async def resume(self, rollout_id: str) -> Rollout:
        """Continue a halted rollout (the failure budget counts again from zero)."""
        rollout = self.get(rollout_id)
        if rollout.state != "halted":
            raise RequestError("invalid-state", f"rollout is {rollout.state}")
        rollout.state, rollout.reason, rollout.failures_since_resume = "running", None, 0
        rollout.note("resumed by operator")
        await self.store.save_rollout(rollout)
        await self._status(rollout)
        return rollout

    async def abort(self, rollout_id: str, reason: str | None) -> Rollout:
        """Cancel every host not started yet (their scheduled events disappear); in-flight hosts
        finish."""
        rollout = self.get(rollout_id)
        if not rollout.active:
            raise RequestError("invalid-state", f"rollout is {rollout.state}")
        why = f"aborted by operator: {reason or 'no reason given'}"
        for run in self.host_runs(rollout_id):
            if run.state in ("pending", "noticed"):
                await self._cancel(run, why)
        rollout.state, rollout.reason = "aborted", why
        rollout.finished_at = self.now()
        self._drop_clock_lookups(rollout_id)
        rollout.note(why)
        await self.store.save_rollout(rollout)
        await self._status(rollout)
        return rollout

    async def _cancel(self, run: HostRun, reason: str) -> None:
        was_noticed = run.state == "noticed"
        run.state, run.error = "cancelled", reason
        await self.store.save_host(run)
        if was_noticed:
            with self._host_trace(run, "maintenance.cancel"):
                await self.publish(
                    MaintenanceCancelled(
                        event_id=_event_id(run.scheduled_event_id, "cancelled"),
                        host=run.host,
                        rollout_id=run.rollout_id,
                        scheduled_event_id=run.scheduled_event_id,
                        reason=reason,
                    )
                )

    # ------------------------------------------------------------ events

    def on_inventory(self, event: HostInventory) -> None:
        """Keep the newest inventory of each host."""
        known = self.inventory.get(event.host)
        if known is None or known.occurred_at <= event.occurred_at:
            self.inventory[event.host] = event
            self._placements[event.host] = placement_of(event.vms)

    def _run_for(self, rollout_id: str | None, host: str) -> HostRun | None:
        if rollout_id is None:
            return None
        return self.hosts.get((rollout_id, host))

    async def on_approved(self, event: MaintenanceApproved) -> None:
        """A VM approved its scheduled event: the wave may start before its notice ends."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None or run.scheduled_event_id != event.scheduled_event_id:
            return
        if event.vm in run.approved_by or run.state not in ("pending", "noticed"):
            return
        run.approved_by.append(event.vm)
        await self.store.save_host(run)
        rollout = self.rollouts[run.rollout_id]
        rollout.note(f"{run.host}: approved by {event.vm}")
        await self.store.save_rollout(rollout)

    async def on_deferred(self, event: MaintenanceDeferred) -> None:
        """A VM asked to postpone its event: honoured within the policy, logged either way."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None or run.scheduled_event_id != event.scheduled_event_id:
            return
        if any(d.get("event_id") == str(event.event_id) for d in run.deferrals):
            return
        rollout = self.rollouts[run.rollout_id]
        granted = 0.0
        if run.state == "noticed" and len(run.deferrals) < self.max_defers and run.not_before:
            granted = min(event.defer_s, self.max_defer_s)
        run.deferrals.append(
            {
                "event_id": str(event.event_id),
                "vm": event.vm,
                "asked_s": event.defer_s,
                "granted_s": granted,
            }
        )
        rollout.note(
            f"{run.host}: {event.vm} asked to defer {event.defer_s:.0f} s, granted {granted:.0f} s"
        )
        if granted:
            for other in self._wave_runs(rollout, run.wave):
                if other.state == "noticed" and other.not_before is not None:
                    other.not_before = other.not_before + timedelta(seconds=granted)
                    other.approved_by.clear()
                    await self._announce(rollout, other)
        await self.store.save_host(run)
        await self.store.save_rollout(rollout)

    async def on_host_paused(self, event: HostPaused) -> None:
        """Record the pause of every VM a host's window stopped, as each one's `VMPaused` would
        (what `vms_paused_now` counts; each record gets its times again with its resume)."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None:
            return
        changed = False
        for vm, paused_at in event.paused_at.items():
            record = run.vm_records.setdefault(vm, VMRecord())
            if record.resumed_at is None and record.paused_at != paused_at:
                record.paused_at = paused_at
                changed = True
        if changed:
            self.store.mark_host(run)

    async def on_patched(self, event: HostPatched) -> None:
        """Record the patch result."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None or run.patch_ok is not None:
            return
        run.patch_ok, run.patch_ms = event.ok, event.patch_ms
        if not event.ok:
            run.error = event.error
        self.store.mark_host(run)

    async def on_host_clock(self, event: HostClockSynced) -> None:
        """Record the clock syncs of a host's VMs (the first result of each VM counts)."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None:
            return
        changed = False
        for vm, clock in event.clocks.items():
            record = run.vm_records.setdefault(vm, VMRecord())
            if record.clock_ok is not None:
                continue
            record.clock_ok = clock.ok
            record.clock_method = clock.method
            record.skew_before_ms = clock.skew_before_ms
            record.skew_after_ms = clock.skew_after_ms
            record.clock_error = clock.error
            changed = True
        if changed:
            self.store.mark_host(run)

    async def on_completed(self, event: MaintenanceCompleted) -> None:
        """A host's window is over: done, or a failure counted against the budget."""
        run = self._run_for(event.rollout_id, event.host)
        if run is None or run.terminal or run.state == "pending":
            return
        rollout = self.rollouts[run.rollout_id]
        run.completed_at = self.now()
        run.ok = event.ok
        run.window_ms, run.patch_ms, run.overhead_ms = (
            event.window_ms,
            event.patch_ms,
            event.overhead_ms,
        )
        run.recovered = event.recovered
        run.error = event.error
        run.resumed_vms = [o.vm for o in event.vms if o.outcome == "resumed"]
        for outcome in event.vms:
            # Each VM's pause as its `VMResumed` says it (the planner reads this instead).
            if outcome.resumed_at is None and outcome.paused_ms is None:
                continue  # skipped, or never stopped
            record = run.vm_records.setdefault(outcome.vm, VMRecord())
            record.paused_at = outcome.paused_at or record.paused_at
            record.resumed_at = outcome.resumed_at
            record.paused_ms = outcome.paused_ms
            record.forced = outcome.forced
            record.resumed_ok = outcome.outcome == "resumed"
        run.state = "done" if event.ok else "failed"
        await self.store.save_host(run)
        if event.ok:
            # The host's record says it all; the rollout's (its whole plan) is not written again
            # per host: this line joins the next write of it (the wave's end at the latest).
            rollout.note(
                f"{run.host}: done (window {event.window_ms:.1f} ms, "
                f"overhead {event.overhead_ms:.2f} ms)"
            )
        else:
            await self._count_failure(rollout, run, event.error or "failed")
            await self.store.save_rollout(rollout)
        await self._status(rollout)

    async def _count_failure(self, rollout: Rollout, run: HostRun, why: str) -> None:
        rollout.failures_since_resume += 1
        rollout.note(f"{run.host}: FAILED: {why}")
        if (
            rollout.state == "running"
            and rollout.failures_since_resume > rollout.request.failure_budget
        ):
            await self._halt(
                rollout,
                f"failure budget exceeded ({rollout.failures_since_resume} > "
                f"{rollout.request.failure_budget}); last: {run.host}: {why}",
            )

    async def _halt(self, rollout: Rollout, reason: str) -> None:
        rollout.state, rollout.reason = "halted", reason
        # A halted wave is not waited for: its lookups start again if it resumes.
        self._drop_clock_lookups(rollout.rollout_id)
        rollout.note(reason)
        log.warning("rollout %s halted: %s", rollout.rollout_id, reason)
        await self.store.save_rollout(rollout)
        await self._status(rollout)

    # ------------------------------------------------------------ the clock

    async def advance(self) -> None:
        """Move every running rollout forward: notice, start, time out, next wave."""
        await self.store.flush()  # anything a failed write left marked
        for rollout in list(self.rollouts.values()):
            if rollout.state in ("running", "halted"):
                with log_context(rollout=rollout.rollout_id):
                    await self._advance(rollout)
        await self._statuses_due()
        now = self.now()
        if self._next_prune is None or now >= self._next_prune:
            self._next_prune = now + timedelta(seconds=PRUNE_EVERY_S)
            try:
                await self.forget_expired()
            except Exception as exc:  # noqa: BLE001 - kept, and tried again later
                # Not a reason to stop moving rollouts (a NATS user without the purge permission
                # would otherwise cost a timeout a minute): kept, and tried again in an hour.
                self._next_prune = now + timedelta(seconds=PRUNE_RETRY_S)
                log.warning("could not forget expired rollouts (trying again in an hour): %s", exc)

    async def forget_expired(self) -> list[str]:
        """Forget the rollouts finished longer than `retention_s` ago, in memory and in the store:
        the state a standby reads at takeover, and every status computed, stay the size of what
        is recent, however long the planner runs. Returns their ids."""
        horizon = self.now() - timedelta(seconds=self.retention_s)
        expired = [
            r
            for r in self.rollouts.values()
            if not r.active and (r.finished_at or r.created_at) < horizon
        ]
        for rollout in expired:
            rid = rollout.rollout_id
            await self.store.forget(rid)  # kept in memory too until it is gone from the store
            for host in self._runs.pop(rid, {}):
                del self.hosts[(rid, host)]
            self._drop_clock_lookups(rid)
            del self.rollouts[rid]
            self._last_status.pop(rid, None)
            self._status_at.pop(rid, None)
            self._status_due.discard(rid)
            log.info(
                "rollout %s forgotten: %s more than %.0f s ago",
                rid,
                rollout.state,
                self.retention_s,
                extra={"rollout": rid},
            )
        return [r.rollout_id for r in expired]

    def seconds_until_due(self) -> float:
        """Time until the earliest notice of a running rollout ends (the ticker wakes then)."""
        now = self.now()
        due = [
            (run.not_before - now).total_seconds()
            for rollout in self.rollouts.values()
            if rollout.state == "running" and rollout.current_wave < len(rollout.waves)
            for run in self._wave_runs(rollout, rollout.current_wave)
            if run.state == "noticed" and run.not_before is not None
        ]
        return max(0.0, min(due, default=3600.0))

    def _wave_runs(self, rollout: Rollout, wave: int) -> list[HostRun]:
        return [self.hosts[(rollout.rollout_id, h)] for h in rollout.waves[wave]]

    async def _advance(self, rollout: Rollout) -> None:
        # A finished wave is followed by the next one at once, not at the next tick.
        moved = False
        try:
            while await self._advance_wave(rollout) and rollout.state == "running":
                moved = True
        finally:
            if moved:
                # The new current wave, stored and said once its hosts are started, or could
                # not be (`_next_wave`).
                await self.store.save_rollout(rollout)
                await self._status(rollout)

    async def _advance_wave(self, rollout: Rollout) -> bool:
        """Move the current wave forward; True once it finished and the next one is current."""
        now = self.now()
        runs = self._wave_runs(rollout, rollout.current_wave)
        for run in runs:
            if run.state == "started" and run.start_by is not None:
                timeout = run.start_by + timedelta(
                    seconds=rollout.request.pause_budget_s + self.host_grace_s
                )
                if now > timeout:
                    run.state, run.error = "failed", "host did not report within its timeout"
                    run.completed_at = now
                    await self.store.save_host(run)
                    await self._count_failure(rollout, run, run.error)
                    await self.store.save_rollout(rollout)
                    await self._status(rollout)
        if rollout.state != "running":
            return False
        if not rollout.wave_noticed:
            announced = await self._notice_wave(rollout, rollout.current_wave)
            rollout.wave_noticed = True
            if announced:
                await self._notice_ahead(rollout)
                await self.store.save_rollout(rollout)
                await self._status(rollout)
                return False
        noticed = [r for r in runs if r.state == "noticed"]
        if noticed and all(r.state != "pending" for r in runs):
            due = max(r.not_before or now for r in noticed)
            approved = all(r.approved_by for r in noticed)
            if now >= due or approved:
                why = "notice passed" if now >= due else "every event approved"
                rollout.note(f"wave {rollout.current_wave}: starting {len(noticed)} host(s), {why}")
                # Every host of the wave at once: their events go out in one round of acks. The
                # notice of the waves after it goes out with them, queued behind them, not once
                # they are acknowledged: on a loaded bus (the wave's windows just opened) that
                # took long enough for the notice to end after the wave did, and the next wave
                # to wait for it.
                starts = [asyncio.ensure_future(self._start(rollout, run)) for run in noticed]
                notice = asyncio.ensure_future(self._notice_ahead(rollout, after_starts=True))
                await asyncio.gather(*starts, notice)
                await self.store.save_rollout(rollout)
                if notice.result():
                    await self._status(rollout)
        if await self._notice_ahead(rollout):
            await self.store.save_rollout(rollout)
            await self._status(rollout)
        if self.clock_lookup is not None and all(r.terminal for r in runs):
            await self._look_up_clocks(runs, now)
        if all(r.terminal and r.clock_settled(now, self.clock_timeout_s) for r in runs):
            for run in runs:
                self._clock_lookup_due.pop((run.rollout_id, run.host), None)
            await self._next_wave(rollout)
            return True
        return False

    async def _look_up_clocks(self, runs: list[HostRun], now: datetime) -> None:
        """The clock results a finished wave still waits for, read from the stream.

        The wave waits for every resumed VM's clock result, as its host's `HostClockSynced`
        brings it through the planner's consumer. A delivery that never reaches the planner (two
        1,000-host soaks in some thirty lost one `HostClockSynced` between the server and the
        handler, and JetStream gave it again only after its 30 s ack wait) would hold the whole
        rollout until `clock_timeout_s`, though the result is in the stream. So once a host's
        results are `clock_lookup_after_s` late, they are read from the stream (`clock_lookup`:
        the host's last `HostClockSynced`, then the missing VMs' own `ClockSynced` if that one
        covers only part of them), and again after as long again as the host has waited (2, 4,
        8 s...: clock-sync down costs a read per host now and then, not one per step); a result
        of the same rollout counts as if it had been delivered. The hosts due are read at once,
        not one round trip after the other (the step holds the planner's lock)."""
        assert self.clock_lookup is not None
        due: list[tuple[HostRun, list[str], float]] = []
        for run in runs:
            if run.completed_at is None or run.clock_settled(now, self.clock_timeout_s):
                continue
            key = (run.rollout_id, run.host)
            first = run.completed_at + timedelta(seconds=self.clock_lookup_after_s)
            if now < self._clock_lookup_due.get(key, first):
                continue
            waited = (now - run.completed_at).total_seconds()
            self._clock_lookup_due[key] = now + timedelta(seconds=max(waited, 0.1))
            due.append((run, run.vms_without_clock(), waited))
        if not due:
            return
        lookup = self.clock_lookup
        results = await asyncio.gather(
            *(lookup(run.rollout_id, run.host, missing) for run, missing, _ in due),
            return_exceptions=True,
        )
        for (run, _, waited), result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                # The wave waits on, as it would have anyway.
                log.warning("could not read the clock results of %s: %s", run.host, result)
                continue
            if result:
                log.warning(
                    "%s: %d clock result(s) read from the stream, %.1f s after the host "
                    "completed (their delivery did not come)",
                    run.host,
                    len(result),
                    waited,
                )
                await self.on_host_clock(
                    HostClockSynced(host=run.host, rollout_id=run.rollout_id, clocks=result)
                )

    def _drop_clock_lookups(self, rollout_id: str) -> None:
        """Forget when the clock results of `rollout_id`'s hosts are due to be read: its wave is
        no longer waited for (aborted, halted, forgotten)."""
        for key in [k for k in self._clock_lookup_due if k[0] == rollout_id]:
            del self._clock_lookup_due[key]

    async def _notice_ahead(self, rollout: Rollout, after_starts: bool = False) -> int:
        """Notice for the `notice_ahead_waves` waves after the current one (those who have none
        yet): their notice runs while the current wave is patched, so a rollout does not pay the
        notice once per wave. Returns how many hosts got it now.

        `after_starts`: run alongside the current wave's starts (as a task made after theirs):
        they queue their events first, and this yields once before making its own, so the
        publisher writes the starts before any notice is made."""
        if after_starts:
            await asyncio.sleep(0)
        last = min(
            len(rollout.waves), rollout.current_wave + 1 + rollout.request.notice_ahead_waves
        )
        announced = 0
        for wave in range(rollout.current_wave + 1, last):
            announced += await self._notice_wave(rollout, wave)
        return announced

    async def _notice_wave(self, rollout: Rollout, wave: int) -> int:
        """Give notice to the hosts of `wave` that have none yet; how many got it."""
        horizon = self._horizon()
        announcing = []
        for run in self._wave_runs(rollout, wave):
            if run.state != "pending":
                continue
            vms = self._fresh_vms(run.host, horizon)
            if vms is None:
                run.state, run.error = "skipped", "host no longer reports an inventory"
                rollout.skipped_hosts[run.host] = run.error
                rollout.note(f"{run.host}: skipped: {run.error}")
                await self.store.save_host(run)
                continue
            run.vms = [v.vm for v in vms]
            run.noticed_at = self.now()
            run.not_before = run.noticed_at + timedelta(seconds=self._notice_s(rollout))
            run.state = "noticed"
            announcing.append(self._announce(rollout, run))
        await asyncio.gather(*announcing)
        if announcing:
            ahead = "" if wave == rollout.current_wave else " (ahead of its turn)"
            rollout.note(f"wave {wave}: notice given to {len(announcing)} host(s){ahead}")
        return len(announcing)

    def _host_trace(self, run: HostRun, name: str) -> Any:
        """A span in the host maintenance's own trace (one trace per host maintenance)."""
        if not run.trace_carrier:
            # The first span of this host's maintenance is a new root, linked to the submit.
            link = trace.get_current_span().get_span_context()
            span = self.tracer.start_span(
                name,
                context=otel_context.Context(),
                links=[Link(link)] if link.is_valid else [],
                attributes={"pp.host": run.host, "pp.rollout_id": run.rollout_id},
            )
            with trace.use_span(span, end_on_exit=False):
                run.trace_carrier = current_carrier()
            return trace.use_span(span, end_on_exit=True)
        return self.tracer.start_as_current_span(
            name,
            context=context_from_carrier(run.trace_carrier),
            attributes={"pp.host": run.host, "pp.rollout_id": run.rollout_id},
        )

    async def _announce(self, rollout: Rollout, run: HostRun) -> None:
        assert run.not_before is not None
        with self._host_trace(run, f"maintenance.plan {run.host}"):
            await self.publish(
                MaintenancePlanned(
                    event_id=_event_id(
                        run.scheduled_event_id, f"planned-{run.not_before.isoformat()}"
                    ),
                    host=run.host,
                    rollout_id=rollout.rollout_id,
                    update_id=rollout.request.update_id,
                    description=rollout.request.description,
                    scheduled_event_id=run.scheduled_event_id,
                    wave=run.wave,
                    event_type=run.event_type,
                    not_before=run.not_before,
                    expected_pause_s=rollout.request.expected_pause_s,
                    pause_budget_s=rollout.request.pause_budget_s,
                    vms=run.vms,
                )
            )
        await self.store.save_host(run)

    async def _start(self, rollout: Rollout, run: HostRun) -> None:
        now = self.now()
        run.state, run.started_at = "started", now
        run.start_by = now + timedelta(seconds=self.start_timeout_s)
        with self._host_trace(run, f"maintenance.start {run.host}"):
            await self.publish(
                MaintenanceStarted(
                    event_id=_event_id(run.scheduled_event_id, "started"),
                    host=run.host,
                    rollout_id=rollout.rollout_id,
                    scheduled_event_id=run.scheduled_event_id,
                    event_type=run.event_type,
                    patch=rollout.request.patch,
                    pause_budget_s=rollout.request.pause_budget_s,
                    vms=run.vms,
                    start_by=run.start_by,
                )
            )
        await self.store.save_host(run)

    async def _next_wave(self, rollout: Rollout) -> None:
        done_wave = rollout.current_wave
        rollout.current_wave += 1
        rollout.wave_noticed = False
        rollout.note(f"wave {done_wave}: finished")
        if rollout.current_wave < len(rollout.waves):
            await self._replan_remaining(rollout)
        if rollout.current_wave >= len(rollout.waves):
            rollout.state = "completed"
            rollout.finished_at = self.now()
            runs = self.host_runs(rollout.rollout_id)
            failed = sum(r.state == "failed" for r in runs)
            rollout.note(f"completed: {sum(r.state == 'done' for r in runs)} ok, {failed} failed")
        elif rollout.state == "running":
            # The next wave's hosts are started first (`_advance` stores the rollout and says
            # its status then): two round trips to the bus less between one wave and the next.
            # A planner taking over before that store finds the finished wave current, moves on
            # from it again, and starts only what is not started yet (each host's record is
            # written with its start; a start published again has the same id).
            return
        await self.store.save_rollout(rollout)
        await self._status(rollout)

    async def _replan_remaining(self, rollout: Rollout) -> None:
        """Inventory may have changed since the plan: plan the hosts still to do again, so that a
        VM that moved still never shares a wave with another UD of its set."""
        remaining = [h for wave in rollout.waves[rollout.current_wave :] for h in wave]
        horizon = self._horizon()
        unchanged = all(
            self._fresh_vms(host, horizon) is not None
            and self._placements[host] == self.hosts[(rollout.rollout_id, host)].placement
            for host in remaining
        )
        if unchanged:
            return  # the plan still holds: keep it as announced
        fleet = self._fleet()
        plan = plan_waves(
            fleet,
            hosts=remaining,
            max_hosts_in_flight=rollout.request.max_hosts_in_flight,
            allow_placement_violations=rollout.request.allow_placement_violations,
        )
        new_waves = plan.waves
        if new_waves == rollout.waves[rollout.current_wave :]:
            return
        planned = {h for wave in new_waves for h in wave}
        for host in remaining:
            if host not in planned:
                run = self.hosts[(rollout.rollout_id, host)]
                why = (
                    "host no longer reports an inventory"
                    if host not in fleet
                    else "placement violation"
                )
                if run.state == "noticed":  # given notice ahead of its wave: the event goes
                    await self._cancel(run, f"skipped: {why}")
                run.state, run.error, run.dropped = "skipped", why, True
                rollout.skipped_hosts[host] = why
                self.store.mark_host(run)
        for offset, wave in enumerate(new_waves):
            for host in wave:
                run = self.hosts[(rollout.rollout_id, host)]
                run.wave = rollout.current_wave + offset
                run.placement = self._placements[host]
                self.store.mark_host(run)
        await self.store.flush()  # the host records at once, before the rollout's new plan
        rollout.waves = rollout.waves[: rollout.current_wave] + new_waves
        rollout.note(f"re-planned {len(remaining)} remaining host(s) into {len(new_waves)} wave(s)")

    async def _status(self, rollout: Rollout) -> None:
        """Publish the rollout's status if it changed since the last one published.

        A change of state, wave or reason goes out at once; a change of the host counts alone at
        most every `STATUS_EVERY_S` (`advance` sends the latest one when it is due): a wave of
        many hosts completing is not one status event, and one count over the rollout's hosts,
        per host."""
        rid = rollout.rollout_id
        waves_done = min(rollout.current_wave, len(rollout.waves))
        last = self._last_status.get(rid)
        now = self.now()
        if (
            last is not None
            and (last["state"], last["waves_total"], last["waves_done"], last["reason"])
            == (rollout.state, len(rollout.waves), waves_done, rollout.reason)
            and (now - self._status_at[rid]).total_seconds() < STATUS_EVERY_S
        ):
            self._status_due.add(rid)
            return
        self._status_due.discard(rid)
        ok = failed = 0
        for run in self._runs.get(rid, {}).values():
            ok += run.state == "done"
            failed += run.state == "failed"
        status = RolloutStatus(
            rollout_id=rid,
            state=rollout.state,
            waves_total=len(rollout.waves),
            waves_done=waves_done,
            hosts_ok=ok,
            hosts_failed=failed,
            reason=rollout.reason,
        )
        content = status.model_dump(exclude={"event_id", "occurred_at"})
        if last == content:
            return
        self._last_status[rid] = content
        self._status_at[rid] = now
        await self.publish(status)

    async def _statuses_due(self) -> None:
        """The statuses held back by `_status` whose time has come."""
        now = self.now()
        for rid in list(self._status_due):
            rollout = self.rollouts.get(rid)
            if rollout is None:
                self._status_due.discard(rid)
            elif (now - self._status_at[rid]).total_seconds() >= STATUS_EVERY_S:
                await self._status(rollout)

    # ------------------------------------------------------------ views

    def summary(self, rollout: Rollout) -> dict[str, Any]:
        """A rollout as the CLI shows it (without per-VM details)."""
        runs = self.host_runs(rollout.rollout_id)
        return {
            **rollout.model_dump(mode="json", exclude={"log"}),
            "waves": rollout.waves,
            "waves_total": len(rollout.waves),
            "hosts_total": len(runs),
            "hosts_ok": sum(r.state == "done" for r in runs),
            "hosts_failed": sum(r.state == "failed" for r in runs),
            "hosts_in_flight": sum(r.state == "started" for r in runs),
            "vms_paused_now": sum(
                1
                for r in runs
                if r.state == "started"
                for rec in r.vm_records.values()
                if rec.paused_at is not None and rec.resumed_at is None
            ),
            "log": rollout.log[-20:],
        }

    def report(
        self,
        rollout: Rollout,
        offset: int = 0,
        limit: int = 100,
        max_bytes: int = REPLY_MAX_BYTES,
    ) -> dict[str, Any]:
        """A rollout per host and per VM, one page of hosts at a time (`next_offset` is None on
        the last page): a fleet's report does not fit in one NATS message. A page holds up to
        `limit` hosts, fewer when more would not fit in `max_bytes`."""
        runs = self.host_runs(rollout.rollout_id)
        # Its plan, if very large, is not repeated on every page (each host has its wave).
        summary = fit_reply(self.summary(rollout), max_bytes // 2)
        page = fill_page(
            (
                r.model_dump(mode="json", exclude={"trace_carrier"}) | {"trace_id": _trace_id(r)}
                for r in runs[offset : offset + limit]
            ),
            max_bytes - len(json.dumps(summary)) - 1024,  # and the page's own keys
        )
        end = offset + len(page)
        return {
            **summary,
            "hosts": page,
            "offset": offset,
            "next_offset": end if end < len(runs) else None,
        }


def _trace_id(run: HostRun) -> str | None:
    parent = run.trace_carrier.get("traceparent")
    return parent.split("-")[1] if parent else None
