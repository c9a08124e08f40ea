"""Rollout state, and its home: a JetStream KV bucket written with compare-and-set.

One key per rollout (`r.<id>`: the request, where it is, counters) and one per host of it
(`h.<id>.<host>`: its wave, what happened on that host), so that no value grows with the
fleet. The plan itself is not stored whole: each host record carries its wave, and a planner
that loads the bucket puts the waves back together from them (a plan of tens of thousands of
hosts would not fit in one NATS message, and was written again at every change of the rollout).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Literal

from nats.js.errors import KeyWrongLastSequenceError
from pydantic import BaseModel, ConfigDict, Field

from shared.bus import read_bucket
from shared.contracts import RolloutState, RolloutSubmit, VMInfo, utcnow

log = logging.getLogger(__name__)

HostState = Literal["pending", "noticed", "started", "done", "failed", "skipped", "cancelled"]
TERMINAL_HOST_STATES = {"done", "failed", "skipped", "cancelled"}
ACTIVE_ROLLOUT_STATES = {"planned", "running", "halted"}


class VMRecord(BaseModel):
    """What happened to one VM during its host's window."""

    model_config = ConfigDict(extra="ignore")

    paused_at: datetime | None = None
    resumed_at: datetime | None = None
    paused_ms: float | None = None
    forced: bool = False
    resumed_ok: bool | None = None
    clock_ok: bool | None = None
    clock_method: str | None = None
    skew_before_ms: float | None = None
    skew_after_ms: float | None = None
    clock_error: str | None = None


class HostRun(BaseModel):
    """One host of a rollout."""

    model_config = ConfigDict(extra="ignore")

    rollout_id: str
    host: str
    wave: int
    scheduled_event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    state: HostState = "pending"
    event_type: Literal["Freeze", "Reboot"] = "Freeze"
    vms: list[str] = Field(default_factory=list)
    noticed_at: datetime | None = None
    not_before: datetime | None = None
    approved_by: list[str] = Field(default_factory=list)
    deferrals: list[dict[str, Any]] = Field(default_factory=list)
    started_at: datetime | None = None
    start_by: datetime | None = None
    completed_at: datetime | None = None
    ok: bool | None = None
    patch_ok: bool | None = None
    patch_ms: float | None = None
    window_ms: float | None = None
    overhead_ms: float | None = None
    error: str | None = None
    recovered: bool = False
    vm_records: dict[str, VMRecord] = Field(default_factory=dict)
    dropped: bool = False
    """Left out of the plan by a re-plan (skipped): no longer in any of the rollout's waves."""
    resumed_vms: list[str] = Field(default_factory=list)
    """VMs the agent's `MaintenanceCompleted` reports started again (each gets a clock result)."""
    placement: list[tuple[str, int]] = Field(default_factory=list)
    """The (availability set, update domain) pairs the host carried when it was planned."""
    trace_carrier: dict[str, str] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """Nothing more will happen to this host in this rollout."""
        return self.state in TERMINAL_HOST_STATES

    def clock_settled(self, now: datetime, clock_timeout_s: float) -> bool:
        """Every resumed VM has a clock result, or waiting longer is pointless."""
        if self.completed_at is None:
            return True
        if (now - self.completed_at).total_seconds() >= clock_timeout_s:
            return True
        return not self.vms_without_clock()

    def vms_without_clock(self) -> list[str]:
        """The VMs the agent reports resumed that have no clock result yet, whatever order their
        own events arrive in."""
        return [
            vm
            for vm in self.resumed_vms
            if vm not in self.vm_records or self.vm_records[vm].clock_ok is None
        ]


class Rollout(BaseModel):
    """A rollout: the request, its plan, where it is."""

    model_config = ConfigDict(extra="ignore")

    rollout_id: str
    request: RolloutSubmit
    event_type: Literal["Freeze", "Reboot"]
    created_at: datetime = Field(default_factory=utcnow)
    state: RolloutState = "planned"
    reason: str | None = None
    waves: list[list[str]] = Field(default_factory=list, exclude=True)
    """The plan (each wave sorted by host name). Not in the stored record: `RolloutStore`
    rebuilds it from the host records' waves (`rebuild_waves`)."""
    lower_bound: int = 0
    violations: list[dict[str, Any]] = Field(default_factory=list)
    skipped_hosts: dict[str, str] = Field(default_factory=dict)
    current_wave: int = 0
    wave_noticed: bool = False
    failures_since_resume: int = 0
    finished_at: datetime | None = None
    log: list[str] = Field(default_factory=list)

    def note(self, message: str) -> None:
        """Record a line in the rollout's own history (shown by `status`) and in the log."""
        log.info("%s", message, extra={"rollout": self.rollout_id})
        self.log.append(f"{utcnow().isoformat(timespec='seconds')} {message}")
        del self.log[:-200]

    @property
    def active(self) -> bool:
        """Not finished."""
        return self.state in ACTIVE_ROLLOUT_STATES


def rebuild_waves(hosts: Sequence[HostRun]) -> list[list[str]]:
    """A rollout's plan from its host records: by wave, each wave sorted by name, as planned
    (a host a re-plan left out is in none)."""
    waves: dict[int, list[str]] = {}
    for run in hosts:
        if not run.dropped:
            waves.setdefault(run.wave, []).append(run.host)
    return [sorted(waves[w]) for w in sorted(waves)]


def placement_of(vms: Sequence[VMInfo]) -> list[tuple[str, int]]:
    """A host's (set, UD) pairs, sorted: what its place in a plan depends on."""
    return sorted({(v.availability_set, v.update_domain or 0) for v in vms if v.availability_set})


def new_rollout_id() -> str:
    """A short, sortable, unique rollout id (also a valid subject token and KV key)."""
    return f"r{utcnow().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


class LeadershipLost(Exception):
    """Another planner wrote our records: this one must stop."""


class RolloutStore:
    """Rollouts in a KV bucket; every write is a compare-and-set on the last revision we saw.

    Writes are gathered: a save marks the record and waits for the next flush, which writes every
    record marked meanwhile once (its latest state) — concurrent handlers share one round of
    writes, and each handler still returns (and its message is acknowledged) only once its change
    is stored.
    """

    def __init__(self, kv: Any, js: Any, bucket: str) -> None:
        self.kv = kv
        self.js = js
        """Its JetStream context: a forgotten rollout is purged from the bucket's stream."""
        self.bucket = bucket
        self._revisions: dict[str, int] = {}
        self._dirty: dict[str, BaseModel] = {}
        self._pending: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._unacked: dict[str, list[bytes]] = {}
        self._after: list[Callable[[], Awaitable[None]]] = []
        self._soon: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.gather_s = 0.01
        """How long per-VM records are gathered before they are written together."""
        """Values sent since the last acknowledged write of each key (one may have landed)."""
        self.writes = 0

    @staticmethod
    def rollout_key(rollout_id: str) -> str:
        """KV key of a rollout."""
        return f"r.{rollout_id}"

    @staticmethod
    def host_key(rollout_id: str, host: str) -> str:
        """KV key of one host of a rollout."""
        return f"h.{rollout_id}.{host}"

    async def _put(self, key: str, value: BaseModel) -> None:
        self._dirty[key] = value
        await self.flush()

    def mark_host(self, run: HostRun) -> None:
        """Mark a host record to be written by the next flush (soon), without waiting."""
        self._dirty[self.host_key(run.rollout_id, run.host)] = run
        self._flush_soon()

    def after_flush(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` (an acknowledgement) once what is marked now is stored."""
        if not self._dirty and self._pending is None:
            self._spawn(callback())
            return
        self._after.append(callback)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(
                self.gather_s, lambda: self._spawn(self._flush_and_ack())
            )

    async def _flush_and_ack(self) -> None:
        self._soon = None
        callbacks, self._after = self._after, []
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - unacknowledged: redelivered, written next time
            log.warning("writing rollout records failed; they are written again later")
            return
        await asyncio.gather(*(cb() for cb in callbacks), return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write what is marked (waiting for the flush already under way, if any)."""
        if not self._dirty and self._pending is None:
            return
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._flush())
        await asyncio.shield(self._pending)

    async def _flush(self) -> None:
        async with self._lock:
            await asyncio.sleep(0)  # what concurrent handlers mark in this turn joins the batch
            self._pending = None
            batch, self._dirty = self._dirty, {}
            results = await asyncio.gather(
                *(self._write(key, value) for key, value in batch.items()), return_exceptions=True
            )
        failed = [(k, r) for k, r in zip(batch, results, strict=True) if isinstance(r, Exception)]
        for key, _ in failed:
            self._dirty.setdefault(key, batch[key])  # written again by the next flush
        if failed:
            raise failed[0][1]

    async def _write(self, key: str, value: BaseModel) -> None:
        data = value.model_dump_json().encode()
        last = self._revisions.get(key)
        attempts = self._unacked.setdefault(key, [])
        attempts.append(data)
        try:
            if last is None:
                self._revisions[key] = await self.kv.create(key, data)
            else:
                self._revisions[key] = await self.kv.update(key, data, last=last)
        except KeyWrongLastSequenceError:
            # Either an earlier attempt landed although its ack was lost (a node failing over):
            # then the stored value is ours and we carry on from its revision; or another
            # planner wrote it: then this one is no longer the active planner.
            entry = await self.kv.get(key)
            if entry.value not in attempts:
                raise LeadershipLost(f"{key} was written by someone else") from None
            self._revisions[key] = entry.revision
            await self._write(key, value)
            return
        del self._unacked[key]
        self.writes += 1

    async def save_rollout(self, rollout: Rollout) -> None:
        """Write a rollout's summary (CAS)."""
        await self._put(self.rollout_key(rollout.rollout_id), rollout)

    async def save_host(self, run: HostRun) -> None:
        """Write one host's record (CAS)."""
        await self._put(self.host_key(run.rollout_id, run.host), run)

    async def forget(self, rollout_id: str) -> None:
        """Remove a rollout and every host record of it from the bucket: purged from the bucket's
        stream by subject, so that no delete marker is left per key (a bucket read at takeover
        then costs what is kept, not what ever was). The host records go first: a planner that
        dies in between forgets the rest next time, and none is ever left without its rollout."""
        await self.flush()
        stream, prefix = f"KV_{self.bucket}", f"$KV.{self.bucket}."
        hosts = self.host_key(rollout_id, "")
        await self.js.purge_stream(stream, subject=f"{prefix}{hosts}>")
        await self.js.purge_stream(stream, subject=prefix + self.rollout_key(rollout_id))
        # Nor written again: a record marked meanwhile (a late result) would come back alone.
        for known in (self._revisions, self._unacked, self._dirty):
            for key in [k for k in known if k.startswith(hosts)]:
                del known[key]
            known.pop(self.rollout_key(rollout_id), None)

    async def load_all(self) -> tuple[list[Rollout], list[HostRun]]:
        """Every rollout and host record in the bucket (at start or takeover). A bucket that
        cannot be read fails the start: a planner never takes over with a state it did not see."""
        rollouts: list[Rollout] = []
        hosts: list[HostRun] = []
        for key, entry in (await read_bucket(self.kv)).items():
            self._revisions[key] = entry.revision
            if key.startswith("r."):
                # (A record written before plans were left out of it still carries its waves.)
                rollouts.append(Rollout.model_validate_json(entry.value))
            elif key.startswith("h."):
                hosts.append(HostRun.model_validate_json(entry.value))
        by_rollout: dict[str, list[HostRun]] = {}
        for run in hosts:
            by_rollout.setdefault(run.rollout_id, []).append(run)
        for rollout in rollouts:
            if not rollout.waves:
                rollout.waves = rebuild_waves(by_rollout.get(rollout.rollout_id, []))
        return rollouts, hosts
