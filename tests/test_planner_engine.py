"""The rollout engine alone (its state in a real JetStream KV bucket, time under the test's
control): re-planning when the inventory changes mid-rollout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.planner.engine import REPLY_MAX_BYTES, RequestError, RolloutEngine, fit_reply
from services.planner.main import clock_results_in_stream
from services.planner.state import RolloutStore
from services.planner.waves import WavePlan, check_plan
from shared import subjects
from shared.bus import read_bucket
from shared.client import connect
from shared.contracts import (
    ClockSynced,
    Event,
    HostClockSynced,
    HostInventory,
    HostPaused,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenancePlanned,
    MaintenanceStarted,
    PatchSpec,
    RolloutStatus,
    RolloutSubmit,
    VMClock,
    VMInfo,
    VMWindowOutcome,
    utcnow,
)
from shared.devstack import NatsServer


def vm(name: str, aset: str | None, ud: int | None) -> VMInfo:
    return VMInfo(vm=name, uuid=name, availability_set=aset, update_domain=ud, state="running")


class Clock:
    """The engine's time, moved by the test."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


class Fleet:
    """An engine over a real KV bucket, with a clock the test moves."""

    def __init__(self, engine: RolloutEngine, published: list[Event], clock: Clock) -> None:
        self.engine = engine
        self.published = published
        self.clock = clock

    def report(self, host: str, vms: list[VMInfo]) -> None:
        self.engine.on_inventory(HostInventory(host=host, vms=vms, occurred_at=self.clock.now))

    async def finish_started_hosts(self) -> None:
        for event in self.published:
            if isinstance(event, MaintenanceStarted):
                await self.complete(event)

    async def complete(
        self,
        started: MaintenanceStarted,
        ok: bool = True,
        error: str | None = None,
        vms: list[VMWindowOutcome] | None = None,
    ) -> None:
        """The agent's report of a window (successful unless told) for a start the engine
        published, with what happened to each VM (`vms`) if given."""
        await self.engine.on_completed(
            MaintenanceCompleted(
                host=started.host,
                rollout_id=started.rollout_id,
                scheduled_event_id=started.scheduled_event_id,
                ok=ok,
                window_ms=1,
                patch_ms=1,
                overhead_ms=0,
                error=error,
                vms=vms or [],
            )
        )

    async def tick(self, seconds: float = 1.0) -> None:
        self.clock.now += timedelta(seconds=seconds)
        await self.engine.advance()


@pytest.fixture
async def fleet(nats_server: NatsServer) -> AsyncIterator[Fleet]:
    nc = await connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket="rollouts_test", history=1)
    published: list[Event] = []

    async def publish(event: Event) -> None:
        published.append(event)

    clock = Clock()
    store = RolloutStore(kv, nc.jetstream(), "rollouts_test")
    engine = RolloutEngine(store, publish, TracerProvider().get_tracer("t"), now=clock)
    yield Fleet(engine, published, clock)
    await nc.close()


def started_hosts(published: list[Event]) -> list[str]:
    return [e.host for e in published if isinstance(e, MaintenanceStarted)]


async def test_a_vm_that_moves_mid_rollout_never_shares_a_wave_with_another_ud_of_its_set(
    fleet: Fleet,
) -> None:
    fleet.report("h0", [vm("web-0", "web", 0), vm("db-0", "db", 0)])
    fleet.report("h1", [vm("web-1", "web", 1)])
    fleet.report("h2", [vm("db-1", "db", 1)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=2
        )
    )
    assert rollout.waves == [["h0"], ["h1", "h2"]]  # h1 and h2 share no set
    await fleet.tick()  # notice for wave 0
    await fleet.tick()  # start wave 0
    assert started_hosts(fleet.published) == ["h0"]

    # While h0 is patched, a web VM in UD 0 is placed on h2: h2 and h1 now conflict.
    fleet.report("h2", [vm("db-1", "db", 1), vm("web-9", "web", 0)])
    await fleet.finish_started_hosts()
    await fleet.tick()  # wave 0 ends; the rest is re-planned with the new placement

    remaining = rollout.waves[1:]
    assert sorted(h for w in remaining for h in w) == ["h1", "h2"]
    assert all(not {"h1", "h2"} <= set(w) for w in remaining)
    inventory = {h: inv.vms for h, inv in fleet.engine.inventory.items()}
    assert check_plan(inventory, WavePlan(remaining, lower_bound=2, max_hosts_in_flight=2)) == []
    assert any("re-planned" in line for line in rollout.log)


async def test_an_unchanged_inventory_keeps_the_announced_plan(fleet: Fleet) -> None:
    for i in range(4):
        fleet.report(f"h{i}", [vm(f"web-{i}", "web", i % 2)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    planned = [list(w) for w in rollout.waves]
    while rollout.state == "running":
        await fleet.tick()
        await fleet.finish_started_hosts()
        for host in ("h0", "h1", "h2", "h3"):  # heartbeats: the same placement again
            fleet.report(host, [vm(f"web-{host[1]}", "web", int(host[1]) % 2)])
    assert rollout.state == "completed" and rollout.waves == planned
    assert not any("re-planned" in line for line in rollout.log)
    announced = [e.host for e in fleet.published if isinstance(e, MaintenancePlanned)]
    assert announced == [h for w in planned for h in w]


async def test_a_report_comes_in_pages_that_cover_every_host_once(fleet: Fleet) -> None:
    for i in range(5):
        fleet.report(f"h{i}", [vm(f"v{i}", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    pages, offset = [], 0
    while offset is not None:
        page = fleet.engine.report(rollout, offset, limit=2)
        pages.append([h["host"] for h in page["hosts"]])
        offset = page["next_offset"]
    assert pages == [["h0", "h1"], ["h2", "h3"], ["h4"]]


def planned_hosts(published: list[Event]) -> list[str]:
    return [e.host for e in published if isinstance(e, MaintenancePlanned)]


async def three_waves(fleet: Fleet, notice_ahead_waves: int) -> None:
    for i in range(3):
        fleet.report(f"h{i}", [vm(f"v{i}", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u",
            patch=PatchSpec(duration_s=0),
            notice_s=20,
            max_hosts_in_flight=1,
            notice_ahead_waves=notice_ahead_waves,
        )
    )
    assert rollout.waves == [["h0"], ["h1"], ["h2"]]


async def test_a_wave_gets_its_notice_while_the_wave_before_it_is_patched(fleet: Fleet) -> None:
    await three_waves(fleet, notice_ahead_waves=1)
    await fleet.tick(0)
    assert planned_hosts(fleet.published) == ["h0", "h1"]  # wave 1 ahead of its turn
    await fleet.tick(19)
    assert started_hosts(fleet.published) == []  # nobody starts before their notice ends
    await fleet.tick(1)
    assert started_hosts(fleet.published) == ["h0"]
    await fleet.tick(5)
    assert started_hosts(fleet.published) == ["h0"]  # wave 1's notice has passed, but h0 runs
    await fleet.finish_started_hosts()
    await fleet.tick(0)  # wave 0 finishes; wave 1 starts in the same step, wave 2 gets notice
    assert started_hosts(fleet.published) == ["h0", "h1"]
    assert planned_hosts(fleet.published) == ["h0", "h1", "h2"]
    h2 = [e for e in fleet.published if isinstance(e, MaintenancePlanned) and e.host == "h2"]
    assert h2[0].not_before == fleet.clock.now + timedelta(seconds=20)


async def test_the_wave_after_next_gets_its_notice_without_waiting_for_the_starts_acks(
    fleet: Fleet,
) -> None:
    """On a loaded bus the acks of a wave's starts come late (its windows just opened): the
    notice of the wave after it must not wait for them, or it ends after that wave and the next
    one waits for it."""
    await three_waves(fleet, notice_ahead_waves=1)
    await fleet.tick(0)
    await fleet.tick(20)
    await fleet.finish_started_hosts()
    acked = asyncio.Event()
    noticed = asyncio.Event()
    published = fleet.published

    async def publish(event: Event) -> None:
        published.append(event)
        if isinstance(event, MaintenancePlanned) and event.host == "h2":
            noticed.set()
        if isinstance(event, MaintenanceStarted):
            await acked.wait()  # the stream's ack of a start, held back

    fleet.engine.publish = publish
    advancing = asyncio.create_task(fleet.tick(0))  # wave 0 done: h1 starts, h2 gets notice
    try:
        await asyncio.wait_for(noticed.wait(), 5)
        assert not advancing.done()  # h1's start is still waiting for its ack
        kinds = [(type(e).__name__, getattr(e, "host", None)) for e in published]
        assert kinds.index(("MaintenanceStarted", "h1")) < kinds.index(
            ("MaintenancePlanned", "h2")
        ), kinds  # the start is queued first
    finally:
        acked.set()
        await asyncio.wait_for(advancing, 5)
    assert fleet.engine.hosts[(next(iter(fleet.engine.rollouts)), "h2")].state == "noticed"


async def test_the_next_wave_starts_before_the_finished_one_is_stored_and_said(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    await three_waves(fleet, notice_ahead_waves=1)
    await fleet.tick(0)
    await fleet.tick(20)
    assert started_hosts(fleet.published) == ["h0"]
    await fleet.finish_started_hosts()
    fleet.published.clear()
    await fleet.tick(0)  # wave 0 finishes; wave 1 (noticed ahead, notice passed) starts
    kinds = [type(e).__name__ for e in fleet.published]
    first_start = kinds.index("MaintenanceStarted")
    status = next(
        i
        for i, e in enumerate(fleet.published)
        if isinstance(e, RolloutStatus) and e.waves_done == 1
    )
    assert first_start < status, kinds  # the start waits on no write of the rollout
    rollout = next(iter(fleet.engine.rollouts.values()))
    await fleet.engine.store.flush()

    nc = await connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rollouts_test")
        entry = await kv.get(f"r.{rollout.rollout_id}")
        assert entry.value is not None and json.loads(entry.value)["current_wave"] == 1

        # A standby that took over after h1's start but before the rollout said wave 1: wave 0
        # is current again, finished; it moves on and starts nothing twice.
        rewound = json.loads(entry.value) | {"current_wave": 0, "wave_noticed": True}
        await kv.put(f"r.{rollout.rollout_id}", json.dumps(rewound).encode())
        republished: list[Event] = []

        async def publish(event: Event) -> None:
            republished.append(event)

        standby = RolloutEngine(
            RolloutStore(kv, nc.jetstream(), "rollouts_test"),
            publish,
            TracerProvider().get_tracer("t"),
            now=fleet.clock,
        )
        await standby.load()
        for i in range(3):  # the inventory a standby reads before it takes over
            standby.on_inventory(
                HostInventory(
                    host=f"h{i}", vms=[vm(f"v{i}", None, None)], occurred_at=fleet.clock.now
                )
            )
        assert standby.rollouts[rollout.rollout_id].current_wave == 0
        await standby.advance()
        theirs = standby.rollouts[rollout.rollout_id]
        assert theirs.current_wave == 1 and theirs.state == "running"
        assert started_hosts(republished) == []  # h1 was started, and stored so
        assert standby.hosts[(rollout.rollout_id, "h1")].state == "started"
    finally:
        await nc.close()


async def test_without_notice_ahead_each_wave_waits_its_whole_notice(fleet: Fleet) -> None:
    await three_waves(fleet, notice_ahead_waves=0)
    await fleet.tick(0)
    assert planned_hosts(fleet.published) == ["h0"]
    await fleet.tick(20)
    await fleet.finish_started_hosts()
    await fleet.tick(0)  # wave 0 finishes: wave 1 gets its notice only now
    assert planned_hosts(fleet.published) == ["h0", "h1"]
    await fleet.tick(19)
    assert started_hosts(fleet.published) == ["h0"]
    await fleet.tick(1)
    assert started_hosts(fleet.published) == ["h0", "h1"]


async def test_a_host_noticed_ahead_then_dropped_from_the_plan_gets_its_event_cancelled(
    fleet: Fleet,
) -> None:
    fleet.report("h0", [vm("web-0", "web", 0)])
    fleet.report("h1", [vm("web-1", "web", 1)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    assert rollout.waves == [["h0"], ["h1"]]
    await fleet.tick()  # notice for waves 0 and 1
    await fleet.tick()  # start wave 0
    assert planned_hosts(fleet.published) == ["h0", "h1"]
    # h1 now carries two update domains of the set: it cannot be patched without a violation.
    fleet.report("h1", [vm("web-1", "web", 1), vm("web-2", "web", 0)])
    await fleet.finish_started_hosts()
    await fleet.tick()  # wave 0 ends; the re-plan drops h1
    cancelled = [e for e in fleet.published if isinstance(e, MaintenanceCancelled)]
    assert [e.host for e in cancelled] == ["h1"]
    run = fleet.engine.hosts[(rollout.rollout_id, "h1")]
    assert run.state == "skipped" and cancelled[0].scheduled_event_id == run.scheduled_event_id
    await fleet.tick()
    assert rollout.state == "completed" and started_hosts(fleet.published) == ["h0"]


async def test_a_planner_taking_over_loads_every_rollout_and_host_record_the_other_stored(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    for i in range(40):
        fleet.report(f"h{i:02d}", [vm(f"web-{i}", "web", i % 5)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    await fleet.tick()  # notice
    await fleet.tick()  # wave 0 starts
    await fleet.engine.store.flush()
    mine = {h.host: h.state for h in fleet.engine.host_runs(rollout.rollout_id)}
    assert len(mine) == 40 and {"started", "noticed", "pending"} <= set(mine.values())

    nc = await connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rollouts_test")

        async def publish(event: Event) -> None:
            pass

        for _ in range(5):  # the same state every time
            store = RolloutStore(kv, nc.jetstream(), "rollouts_test")
            other = RolloutEngine(store, publish, TracerProvider().get_tracer("t"))
            await other.load()
            assert list(other.rollouts) == [rollout.rollout_id]
            assert other.rollouts[rollout.rollout_id].active
            theirs = {h.host: h.state for h in other.host_runs(rollout.rollout_id)}
            assert theirs == mine
    finally:
        await nc.close()


async def run_to_the_end(fleet: Fleet, hosts: list[str]) -> str:
    """Submit a rollout over `hosts` (reported now) and drive it until it completes."""
    for host in hosts:
        fleet.report(host, [vm(f"vm-{host}", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    while rollout.state == "running":
        await fleet.tick()
        await fleet.finish_started_hosts()
    assert rollout.state == "completed"
    return rollout.rollout_id


async def test_rollouts_finished_longer_ago_than_the_retention_are_forgotten_everywhere(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    day = 24 * 3600.0
    fleet.engine.retention_s = 1.5 * day
    old = await run_to_the_end(fleet, ["h0", "h1"])
    await fleet.tick(day)
    recent = await run_to_the_end(fleet, ["h0", "h1"])
    await fleet.tick(day)
    for host in ("h0", "h1"):
        fleet.report(host, [vm(f"vm-{host}", None, None)])
    active = await fleet.engine.submit(  # still giving notice when the old one expires
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=3600)
    )
    await fleet.tick()  # notice given: an hour of it
    await fleet.tick(61)  # the old one finished two days ago, the recent one one day ago

    engine = fleet.engine
    assert set(engine.rollouts) == {recent, active.rollout_id}
    assert {rid for rid, _ in engine.hosts} == {recent, active.rollout_id}
    with pytest.raises(RequestError):
        engine.get(old)
    assert {h.host for h in engine.host_runs(recent)} == {"h0", "h1"}

    nc = await connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rollouts_test")
        stored = await read_bucket(kv)
        assert not [key for key in stored if old in key]
        assert {key for key in stored if recent in key} == {
            f"r.{recent}",
            f"h.{recent}.h0",
            f"h.{recent}.h1",
        }
        # Purged, not deleted: no marker is left behind for a takeover to read.
        assert (await kv.status()).values == len(stored)
        # A standby taking over now loads what is kept, nothing of the forgotten rollout.
        standby = RolloutEngine(
            RolloutStore(kv, nc.jetstream(), "rollouts_test"),
            engine.publish,
            TracerProvider().get_tracer("t"),
        )
        await standby.load()
        assert set(standby.rollouts) == {recent, active.rollout_id}
        assert standby.rollouts[active.rollout_id].active
    finally:
        await nc.close()

    # The active one is never forgotten, however old; the recent one goes in its turn.
    await fleet.tick(10 * day)
    assert set(engine.rollouts) == {active.rollout_id}
    assert not [key for key in engine.hosts if key[0] == recent]


async def test_a_rollout_that_cannot_be_purged_is_kept_and_rollouts_still_move(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="rollouts_kept", history=1)
        published: list[Event] = []

        async def publish(event: Event) -> None:
            published.append(event)

        clock = Clock()
        # Its purges go to a stream that does not exist: the server refuses every one.
        store = RolloutStore(kv, js, "not_this_bucket")
        engine = RolloutEngine(store, publish, TracerProvider().get_tracer("t"), now=clock)
        engine.retention_s = 24 * 3600.0
        fleet = Fleet(engine, published, clock)
        old = await run_to_the_end(fleet, ["h0"])
        await fleet.tick(2 * 24 * 3600.0)  # due to be forgotten: the purge fails
        assert old in engine.rollouts
        assert "could not forget expired rollouts" in caplog.text
        assert f"r.{old}" in await read_bucket(kv)
        # The rollouts go on regardless.
        assert await run_to_the_end(fleet, ["h0"]) in engine.rollouts
    finally:
        await nc.close()


async def test_host_counts_go_out_at_most_every_half_second_and_state_changes_at_once(
    fleet: Fleet,
) -> None:
    for i in range(6):
        fleet.report(f"h{i}", [vm(f"vm-h{i}", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=3
        )
    )
    assert len(rollout.waves) == 2

    def statuses() -> list[RolloutStatus]:
        return [e for e in fleet.published if isinstance(e, RolloutStatus)]

    async def complete(host: str) -> None:
        await fleet.complete(
            next(e for e in fleet.published if isinstance(e, MaintenanceStarted) and e.host == host)
        )

    await fleet.tick()
    await fleet.tick()
    first, second = rollout.waves
    assert started_hosts(fleet.published) == first
    seen = len(statuses())
    # Two hosts of the wave complete in the same instant: the first count goes out (the last
    # status is seconds old), the second is held back...
    await complete(first[0])
    await complete(first[1])
    assert [(s.hosts_ok, s.waves_done) for s in statuses()[seen:]] == [(1, 0)]
    await fleet.tick(0.3)
    assert len(statuses()) == seen + 1
    # ...and goes out once half a second has passed.
    await fleet.tick(0.3)
    assert [(s.hosts_ok, s.waves_done) for s in statuses()[seen:]] == [(1, 0), (2, 0)]
    # The wave's last host: its end (a new wave) goes out at once, with the counts of the moment.
    await complete(first[2])
    await fleet.tick(0.01)
    assert (statuses()[-1].hosts_ok, statuses()[-1].waves_done) == (3, 1)
    await fleet.tick()
    for host in second:
        await complete(host)
    await fleet.tick(0.01)
    final = statuses()[-1]
    assert (final.state, final.hosts_ok, final.waves_done) == ("completed", 6, 2)


async def test_a_host_done_writes_its_own_record_and_the_rollouts_only_at_the_waves_end(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    for i in range(4):
        fleet.report(f"h{i}", [vm(f"vm-h{i}", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u",
            patch=PatchSpec(duration_s=0),
            notice_s=0,
            max_hosts_in_flight=2,
            failure_budget=1,
        )
    )
    first, second = rollout.waves
    await fleet.tick()
    await fleet.tick()
    assert started_hosts(fleet.published) == first
    nc = await connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rollouts_test")

        async def stored(key: str) -> tuple[int, str]:
            entry = await kv.get(key)
            assert entry.revision is not None and entry.value is not None
            return entry.revision, entry.value.decode()

        rollout_key = f"r.{rollout.rollout_id}"
        before = await stored(rollout_key)
        host = first[0]
        host_before = await stored(f"h.{rollout.rollout_id}.{host}")
        await fleet.complete(
            next(e for e in fleet.published if isinstance(e, MaintenanceStarted) and e.host == host)
        )
        host_after = await stored(f"h.{rollout.rollout_id}.{host}")
        assert host_after[0] > host_before[0] and '"state":"done"' in host_after[1]
        # The rollout's record (its whole plan) is not written again for a host done...
        assert await stored(rollout_key) == before
        # ...but a failure is, at once: it counts against the budget a standby must see.
        other = next(
            e for e in fleet.published if isinstance(e, MaintenanceStarted) and e.host != host
        )
        await fleet.complete(other, ok=False, error="patch failed")
        revision, value = await stored(rollout_key)
        assert revision > before[0] and '"failures_since_resume":1' in value
        # The wave's end writes the rollout, with the done host's line in its history (and the
        # next wave, its notice given ahead, starts in the same step).
        await fleet.tick()
        revision, value = await stored(rollout_key)
        assert '"current_wave":1' in value and f"{host}: done" in value
        # And a standby reading the bucket now carries on from the second wave.
        standby = RolloutEngine(
            RolloutStore(kv, nc.jetstream(), "rollouts_test"),
            fleet.engine.publish,
            TracerProvider().get_tracer("t"),
        )
        await standby.load()
        assert standby.rollouts[rollout.rollout_id].current_wave == 1
        assert {h.host: h.state for h in standby.host_runs(rollout.rollout_id)} == {
            host: "done",
            other.host: "failed",
            **{h: "started" for h in second},
        }
    finally:
        await nc.close()


async def test_the_plan_is_not_stored_whole_and_a_standby_puts_it_back_together(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    for i in range(6):
        fleet.report(f"h{i}", [vm(f"web-{i}", "web", i % 3)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=2
        )
    )
    assert rollout.waves == [["h0", "h3"], ["h1", "h4"], ["h2", "h5"]]
    await fleet.tick()
    await fleet.tick()
    # Mid-rollout, h4 gets a VM of another UD of its set: a placement violation, so the re-plan
    # at the end of wave 0 leaves it out.
    for i in range(6):
        extra = [vm("web-6", "web", 2)] if i == 4 else []
        fleet.report(f"h{i}", [vm(f"web-{i}", "web", i % 3), *extra])
    await fleet.finish_started_hosts()
    await fleet.tick()
    assert rollout.waves == [["h0", "h3"], ["h1"], ["h2", "h5"]]
    assert rollout.current_wave == 1
    await fleet.engine.store.flush()

    nc = await connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rollouts_test")
        entry = await kv.get(f"r.{rollout.rollout_id}")
        assert entry.value is not None
        stored = json.loads(entry.value)
        assert "waves" not in stored and stored["current_wave"] == 1
        standby = RolloutEngine(
            RolloutStore(kv, nc.jetstream(), "rollouts_test"),
            fleet.engine.publish,
            TracerProvider().get_tracer("t"),
        )
        await standby.load()
        theirs = standby.rollouts[rollout.rollout_id]
        assert theirs.waves == rollout.waves
        assert standby.summary(theirs)["waves"] == rollout.waves
        h4 = standby.hosts[(rollout.rollout_id, "h4")]
        assert (h4.state, h4.dropped) == ("skipped", True)

        # A record from before plans were left out of it (its waves inside) loads as it was.
        old = {**stored, "rollout_id": "r-old", "state": "completed"}
        old["waves"] = [["a", "b"], ["c"]]
        await kv.create("r.r-old", json.dumps(old).encode())
        await standby.load()
        assert standby.rollouts["r-old"].waves == [["a", "b"], ["c"]]
    finally:
        await nc.close()


async def test_a_report_page_of_many_large_hosts_still_fits_in_one_message(fleet: Fleet) -> None:
    hosts = [f"h{i:03d}" for i in range(160)]
    for host in hosts:
        fleet.report(host, [vm(f"{host}-vm{j:02d}", None, None) for j in range(20)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(update_id="u", patch=PatchSpec(duration_s=0), notice_s=0)
    )
    done = 0
    while rollout.state == "running":
        await fleet.tick()
        starts = [e for e in fleet.published if isinstance(e, MaintenanceStarted)]
        for started in starts[done:]:
            # What the agent reports of each VM, as in a real window.
            outcomes = [
                VMWindowOutcome(
                    vm=name,
                    outcome="resumed",
                    paused_ms=100.0,
                    paused_at=fleet.clock.now,
                    resumed_at=fleet.clock.now + timedelta(milliseconds=100),
                )
                for name in started.vms
            ]
            await fleet.complete(started, vms=outcomes)
            # and clock-sync's result for each (no guest clock here)
            no_clock = VMClock(ok=False, method="none", attempts=1, error="no guest agent")
            await fleet.engine.on_host_clock(
                HostClockSynced(
                    host=started.host,
                    rollout_id=started.rollout_id,
                    clocks=dict.fromkeys(started.vms, no_clock),
                )
            )
        done = len(starts)
    assert rollout.state == "completed"
    # 500 hosts asked for, each with 20 VMs' records: several MiB. The page stops short of
    # NATS's 1 MiB (at REPLY_MAX_BYTES) and the next one starts where it stopped.
    pages: list[list[str]] = []
    offset: int | None = 0
    while offset is not None:
        page = fleet.engine.report(rollout, offset, limit=500)
        assert len(json.dumps(page)) <= REPLY_MAX_BYTES
        assert page["hosts"] and all(len(h["vm_records"]) == 20 for h in page["hosts"])
        pages.append([h["host"] for h in page["hosts"]])
        offset = page["next_offset"]
    assert len(pages) > 1 and [h for p in pages for h in p] == hosts


def test_an_answer_is_kept_whole_slimmed_or_refused_by_what_fits() -> None:
    waves = [[f"host-{i:03d}" for i in range(w * 50, w * 50 + 50)] for w in range(2)]
    answer = {"rollout_id": "r1", "waves": waves, "violations": [], "state": "running"}
    size = len(json.dumps(answer))
    assert fit_reply(answer, size) == answer
    # One byte short: the same answer without what grows with the fleet, and why.
    slim = fit_reply(answer, size - 1)
    assert slim["waves_total"] == 2 and slim["left_out"] == ["waves", "violations"]
    assert (slim["rollout_id"], slim["state"]) == ("r1", "running")
    assert f"{size:,} bytes" in slim["left_out_why"] and len(json.dumps(slim)) < size
    # Nothing bulky to leave out: a clear error, not an answer that never arrives.
    refused = fit_reply({"log": ["x" * 200]}, 100)
    assert refused["error"] == "too-large" and "more than one NATS message" in refused["detail"]


async def test_a_hosts_completion_gives_each_vm_its_pause_and_resume(fleet: Fleet) -> None:
    """The planner reads no `VMResumed`: each VM's record gets its times from the completion's
    outcomes (and its pause, while the patch runs, from `HostPaused`)."""
    await three_waves(fleet, notice_ahead_waves=1)
    await fleet.tick(0)
    await fleet.tick(20)
    [started] = [e for e in fleet.published if isinstance(e, MaintenanceStarted)]
    paused_at = fleet.clock.now
    await fleet.engine.on_host_paused(
        HostPaused(host="h0", rollout_id=started.rollout_id, paused_at={"v0": paused_at})
    )
    rollout = fleet.engine.rollouts[started.rollout_id]
    assert fleet.engine.summary(rollout)["vms_paused_now"] == 1
    resumed_at = paused_at + timedelta(milliseconds=120)
    outcome = VMWindowOutcome(
        vm="v0", outcome="resumed", paused_ms=120.0, paused_at=paused_at, resumed_at=resumed_at
    )
    await fleet.complete(started, vms=[outcome])
    record = fleet.engine.hosts[(started.rollout_id, "h0")].vm_records["v0"]
    assert (record.paused_at, record.resumed_at, record.paused_ms) == (paused_at, resumed_at, 120)
    assert record.resumed_ok and not record.forced
    assert fleet.engine.summary(rollout)["vms_paused_now"] == 0


async def test_a_wave_ends_with_the_last_of_its_hosts_clock_results_however_they_are_split(
    fleet: Fleet,
) -> None:
    """The planner reads no `ClockSynced`: a host's clock results come in `HostClockSynced`,
    perhaps in parts (two fetches, two clock-sync replicas), perhaps again (a redelivery); the
    wave waits for every resumed VM's, and the first result of each VM is the one kept."""
    fleet.report("h0", [vm("a", None, None), vm("b", None, None)])
    fleet.report("h1", [vm("c", None, None)])
    rollout = await fleet.engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=1
        )
    )
    await fleet.tick(0)
    await fleet.tick(0)
    [started] = [e for e in fleet.published if isinstance(e, MaintenanceStarted)]
    assert started.host == "h0"
    now = fleet.clock.now
    outcomes = [
        VMWindowOutcome(vm=name, outcome="resumed", paused_ms=50.0, paused_at=now, resumed_at=now)
        for name in ("a", "b")
    ]
    await fleet.complete(started, vms=outcomes)

    def clocks(**results: float) -> HostClockSynced:
        return HostClockSynced(
            host="h0",
            rollout_id=rollout.rollout_id,
            clocks={
                name: VMClock(
                    ok=True, skew_before_ms=skew, skew_after_ms=0.5, method="host-time", attempts=1
                )
                for name, skew in results.items()
            },
        )

    await fleet.engine.on_host_clock(clocks(a=-50.0))
    await fleet.tick(0)
    assert started_hosts(fleet.published) == ["h0"]  # b's clock is not known yet
    await fleet.engine.on_host_clock(clocks(a=-999.0, b=-51.0))  # a again: the first one stays
    await fleet.tick(0)
    assert started_hosts(fleet.published) == ["h0", "h1"]
    records = fleet.engine.hosts[(rollout.rollout_id, "h0")].vm_records
    assert {n: (r.clock_ok, r.skew_before_ms) for n, r in records.items()} == {
        "a": (True, -50.0),
        "b": (True, -51.0),
    }
    # A result for a host of no rollout of ours changes nothing (and raises nothing).
    await fleet.engine.on_host_clock(
        HostClockSynced(host="h9", rollout_id=rollout.rollout_id, clocks={})
    )


async def test_clock_results_whose_delivery_never_comes_are_read_from_the_stream(
    nats_server: NatsServer,
) -> None:
    """A wave waits for every resumed VM's clock result, which comes through the planner's
    consumer. When a delivery never arrives (two soaks in some thirty lost a `HostClockSynced`
    between the server and the handler until its 30 s ack wait), the results are read from the
    stream once they are `clock_lookup_after_s` late: the host's last `HostClockSynced`, then,
    if it covers only part of them, each missing VM's own `ClockSynced`; a result of another
    rollout is not one."""
    nc = await connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=subjects.STREAM_NAME, subjects=[subjects.EVENTS_ROOT])
    kv = await js.create_key_value(bucket="rollouts_lookup", history=1)
    published: list[Event] = []

    async def publish(event: Event) -> None:
        published.append(event)

    clock = Clock()
    engine = RolloutEngine(
        RolloutStore(kv, js, "rollouts_lookup"),
        publish,
        TracerProvider().get_tracer("t"),
        now=clock,
        clock_lookup=lambda rollout_id, host, vms: clock_results_in_stream(
            js, rollout_id, host, vms
        ),
        clock_lookup_after_s=2.0,
    )
    fleet = Fleet(engine, published, clock)
    fleet.report("h0", [vm("a", None, None), vm("b", None, None)])
    fleet.report("h1", [vm("c", None, None)])
    rollout = await engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=1
        )
    )
    rid = rollout.rollout_id

    def result(skew: float) -> VMClock:
        return VMClock(
            ok=True, skew_before_ms=skew, skew_after_ms=0.4, method="host-time", attempts=1
        )

    def own_result(host: str, vm_name: str, skew: float) -> ClockSynced:
        """A VM's own `ClockSynced` of this rollout."""
        return ClockSynced(host=host, vm=vm_name, rollout_id=rid, **result(skew).model_dump())

    async def store(event: Event) -> None:
        """What clock-sync stores; nothing of it is handed to the engine."""
        await js.publish(event.subject(), event.model_dump_json().encode())

    async def complete(host: str, vms: list[str]) -> None:
        [started] = [e for e in published if isinstance(e, MaintenanceStarted) and e.host == host]
        now = clock.now
        outcomes = [
            VMWindowOutcome(vm=n, outcome="resumed", paused_ms=50.0, paused_at=now, resumed_at=now)
            for n in vms
        ]
        await fleet.complete(started, vms=outcomes)

    await fleet.tick(0)
    await fleet.tick(0)
    assert started_hosts(published) == ["h0"]
    await complete("h0", ["a", "b"])
    # a's result came in the host's event, b's in its own only (its host event went elsewhere).
    await store(HostClockSynced(host="h0", rollout_id=rid, clocks={"a": result(-50.0)}))
    await store(own_result("h0", "b", -51.0))
    await fleet.tick(1.0)
    assert started_hosts(published) == ["h0"]  # 1 s late: still waiting for the delivery
    await fleet.tick(1.5)
    assert started_hosts(published) == ["h0", "h1"]  # read from the stream 2.5 s in
    records = engine.hosts[(rid, "h0")].vm_records
    assert {n: (r.clock_ok, r.skew_before_ms) for n, r in records.items()} == {
        "a": (True, -50.0),
        "b": (True, -51.0),
    }

    # h1's host result in the stream is another rollout's: not taken, and its VM's own
    # `ClockSynced` is not read either (a host not reported yet costs one read, not one per VM).
    await complete("h1", ["c"])
    await store(own_result("h1", "c", -7.0))
    await store(HostClockSynced(host="h1", rollout_id="r-other", clocks={"c": result(-1.0)}))
    await fleet.tick(2.5)
    assert engine.rollouts[rid].state == "running"
    assert engine.hosts[(rid, "h1")].vm_records["c"].clock_ok is None
    await store(HostClockSynced(host="h1", rollout_id=rid, clocks={"c": result(-52.0)}))
    await fleet.tick(1.0)  # the next lookup waits as long again as the host has waited
    assert engine.rollouts[rid].state == "running"
    await fleet.tick(2.0)
    assert engine.rollouts[rid].state == "completed"
    assert engine.hosts[(rid, "h1")].vm_records["c"].skew_before_ms == -52.0
    await nc.close()


async def test_an_aborted_waves_clock_lookups_are_dropped(nats_server: NatsServer) -> None:
    """A wave whose clock results are late is read from the stream now and then; once its
    rollout is aborted nothing waits for them: neither a lookup nor its schedule is kept."""
    nc = await connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket="rollouts_dropped", history=1)
    published: list[Event] = []
    looked_up: list[str] = []

    async def publish(event: Event) -> None:
        published.append(event)

    async def nothing_stored(rollout_id: str, host: str, vms: list[str]) -> dict[str, VMClock]:
        looked_up.append(host)
        return {}

    clock = Clock()
    engine = RolloutEngine(
        RolloutStore(kv, nc.jetstream(), "rollouts_dropped"),
        publish,
        TracerProvider().get_tracer("t"),
        now=clock,
        clock_lookup=nothing_stored,
        clock_lookup_after_s=2.0,
    )
    fleet = Fleet(engine, published, clock)
    fleet.report("h0", [vm("a", None, None)])
    fleet.report("h1", [vm("b", None, None)])
    rollout = await engine.submit(
        RolloutSubmit(
            update_id="u", patch=PatchSpec(duration_s=0), notice_s=0, max_hosts_in_flight=1
        )
    )
    await fleet.tick(0)
    await fleet.tick(0)
    [started] = [e for e in published if isinstance(e, MaintenanceStarted)]
    now = clock.now
    await fleet.complete(
        started,
        vms=[
            VMWindowOutcome(vm="a", outcome="resumed", paused_ms=5.0, paused_at=now, resumed_at=now)
        ],
    )
    await fleet.tick(2.5)
    assert looked_up == ["h0"]
    await engine.abort(rollout.rollout_id, "test")
    assert not [k for k in engine._clock_lookup_due if k[0] == rollout.rollout_id]
    await fleet.tick(10.0)
    assert looked_up == ["h0"]
    assert engine.rollouts[rollout.rollout_id].state == "aborted"
    await nc.close()
