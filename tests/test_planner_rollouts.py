"""Fleet rollouts end to end, on a real nats-server with every service a separate process: the
update-domain rule holds in time, approvals start waves early, failures halt, and a planner that
dies (or its standby) finishes the rollout with every host patched once."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from shared.client import CommandError, EventWatcher, PlannerClient
from shared.contracts import (
    ClockSynced,
    HostClockSynced,
    HostInventory,
    HostPaused,
    MaintenanceApproved,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenancePlanned,
    MaintenanceStarted,
    VMClock,
    VMInfo,
    VMPaused,
    VMResumed,
)
from shared.devstack import LocalStack
from tests.support.fleet import (
    planner_on_small_messages,
    ready,
    sim_vms,
    start_core,
    status_reached,
    wait_hosts,
    wait_stream,
)

HOSTS = [f"h{i}" for i in range(6)]


def fleet_vms(i: int) -> list[tuple[str, str | None, int | None]]:
    """Host i carries one VM of each set: web (3 UDs), db (4 UDs), cache (5 UDs)."""
    return [
        (f"web-{i}", "web", i % 3),
        (f"db-{i}", "db", i % 4),
        (f"cache-{i}", "cache", i % 5),
    ]


def start_fleet(stack: LocalStack, hosts: list[str] = HOSTS, **env: str) -> None:
    for i, host in enumerate(hosts):
        stack.add_sim_host(host, sim_vms(fleet_vms(i), first_ip=10 * i + 1), **env)


def pause_intervals(w: EventWatcher, rollout_id: str) -> dict[str, tuple[datetime, datetime]]:
    paused = {e.vm: e.paused_at for e in w.events(VMPaused, rollout_id=rollout_id)}
    return {e.vm: (paused[e.vm], e.resumed_at) for e in w.events(VMResumed, rollout_id=rollout_id)}


async def test_never_pauses_two_update_domains_of_a_set_at_the_same_time(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    start_fleet(stack)
    await ready(stack, client, watcher, HOSTS)

    plan = await client.plan({"update_id": "u1", "patch": {"duration_s": 0.2}})
    assert sorted(h for wave in plan["waves"] for h in wave) == HOSTS
    assert len(plan["waves"]) >= plan["lower_bound"] >= 5  # cache spans 5 UDs
    assert not watcher.events(MaintenancePlanned)  # a dry run starts nothing

    rollout = await client.submit(
        {"update_id": "u1", "patch": {"duration_s": 0.2}, "notice_s": 0.2, "max_hosts_in_flight": 3}
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(status_reached(rid), 120, "the rollout")

    # Each host patched exactly once.
    completed = watcher.events(MaintenanceCompleted, rollout_id=rid)
    assert sorted(e.host for e in completed) == HOSTS and all(e.ok for e in completed)

    # In time: two VMs of one set in different UDs were never paused at once.
    placement = {
        vm.vm: (vm.availability_set, vm.update_domain)
        for inv in watcher.events(HostInventory)
        for vm in inv.vms
    }
    intervals = pause_intervals(watcher, rid)
    assert len(intervals) == 3 * len(HOSTS)
    for a, (a0, a1) in intervals.items():
        for b, (b0, b1) in intervals.items():
            (set_a, ud_a), (set_b, ud_b) = placement[a], placement[b]
            if set_a == set_b and ud_a != ud_b:
                assert a1 <= b0 or b1 <= a0, f"{a} (UD {ud_a}) and {b} (UD {ud_b}) overlapped"

    # Notice ahead (the default): a wave got its notice while the wave ahead of it was patched
    # (before any of its hosts finished), and started only once every one of them had finished.
    wave_of = {e.host: e.wave for e in watcher.events(MaintenancePlanned, rollout_id=rid)}
    waves = max(wave_of.values()) + 1
    assert waves >= 5

    def times(kind: type[Any], wave: int) -> list[Any]:
        return [
            e.occurred_at for e in watcher.events(kind, rollout_id=rid) if wave_of[e.host] == wave
        ]

    for wave in range(1, waves):
        assert max(times(MaintenancePlanned, wave)) < min(times(MaintenanceCompleted, wave - 1))
        assert min(times(MaintenanceStarted, wave)) >= max(times(MaintenanceCompleted, wave - 1))


async def test_approvals_start_a_wave_before_its_notice_ends(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    start_fleet(stack, HOSTS[:2])
    await ready(stack, client, watcher, HOSTS[:2])
    js = client.nc.jetstream()

    rollout = await client.submit(
        {"update_id": "approved", "patch": {"duration_s": 0.1}, "notice_s": 3600}
    )
    rid = rollout["rollout_id"]
    approved: set[str] = set()

    async def approve_every_planned_event() -> None:
        # What the notifier does when a VM POSTs StartRequests: one approval covers the event.
        while True:
            for planned in watcher.events(MaintenancePlanned, rollout_id=rid):
                if planned.host not in approved:
                    approved.add(planned.host)
                    event = MaintenanceApproved(
                        host=planned.host,
                        rollout_id=rid,
                        scheduled_event_id=planned.scheduled_event_id,
                        vm=planned.vms[0],
                    )
                    await js.publish(event.subject(), json.dumps(event.to_json()).encode())
            await asyncio.sleep(0.05)

    approver = asyncio.create_task(approve_every_planned_event())
    try:
        await watcher.wait_for(status_reached(rid), 60, "the approved rollout")
    finally:
        approver.cancel()
    planned = {e.host: e for e in watcher.events(MaintenancePlanned, rollout_id=rid)}
    for started in watcher.events(MaintenanceStarted, rollout_id=rid):
        assert started.occurred_at < planned[started.host].not_before


async def test_a_failed_patch_halts_the_rollout_at_a_failure_budget_of_zero(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    start_fleet(stack)
    await ready(stack, client, watcher, HOSTS)
    plan = await client.plan({"update_id": "x", "patch": {"duration_s": 0}})
    failing = plan["waves"][1][0]

    rollout = await client.submit(
        {
            "update_id": "bad-patch",
            # The agent tells the patch which host it runs on: this one fails on one host.
            "patch": {"command": f'[ "$PP_HOST" != "{failing}" ]'},
            "notice_s": 0.1,
            "failure_budget": 0,
        }
    )
    rid = rollout["rollout_id"]
    halted = await watcher.wait_for(status_reached(rid, ("halted",)), 60, "the halt")
    assert failing in (halted[0].reason or "") and "failure budget" in (halted[0].reason or "")
    await asyncio.sleep(1.0)  # any host wrongly started after the halt would show up by now
    started = {e.host for e in watcher.events(MaintenanceStarted, rollout_id=rid)}
    later = {h for wave in rollout["waves"][2:] for h in wave}
    assert failing in started and not (started & later)

    # The operator can see why, resume it (the budget counts from zero again), or abort it.
    status = await client.get(rid)
    assert status["state"] == "halted" and status["hosts_failed"] == 1
    aborted = await client.abort(rid, "bad patch")
    assert aborted["state"] == "aborted"
    with pytest.raises(CommandError, match="invalid-state"):
        await client.resume(rid)


async def test_planner_killed_mid_rollout_finishes_it_with_each_host_patched_once(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_LEASE_TTL_S="2")
    start_fleet(stack)
    await ready(stack, client, watcher, HOSTS)
    rollout = await client.submit(
        {
            "update_id": "crash",
            "patch": {"duration_s": 1.0},
            "notice_s": 0.5,
            "max_hosts_in_flight": 2,
        }
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: w.events(MaintenanceStarted, rollout_id=rid), 30, "a start")
    stack.services["planner"].kill()  # kill -9 with a window in flight
    stack.start_service("planner-2", "planner", (), PP_LEASE_TTL_S="2")

    await watcher.wait_for(status_reached(rid), 120, "the rollout after the crash")
    starts: dict[str, int] = defaultdict(int)
    for e in watcher.events(MaintenanceStarted, rollout_id=rid):
        starts[e.host] += 1
    assert sorted(starts) == HOSTS and set(starts.values()) == {1}, starts
    completed = watcher.events(MaintenanceCompleted, rollout_id=rid)
    assert sorted(e.host for e in completed) == HOSTS


async def test_standby_planner_takes_over_when_the_active_one_dies(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_LEASE_TTL_S="2", PP_INSTANCE_ID="planner-a")
    stack.start_service("planner-b", "planner", (), PP_LEASE_TTL_S="2", PP_INSTANCE_ID="planner-b")
    start_fleet(stack, HOSTS[:3])
    await ready(stack, client, watcher, HOSTS[:3])
    kv = await client.nc.jetstream().key_value("pp_planner_lease")
    active = ((await kv.get("leader")).value or b"").decode()
    assert active in ("planner-a", "planner-b")  # exactly one holds the lease
    standby = "planner-b" if active == "planner-a" else "planner-a"

    rollout = await client.submit(
        {"update_id": "takeover", "patch": {"duration_s": 0.5}, "notice_s": 0.5}
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: w.events(MaintenanceStarted, rollout_id=rid), 30, "a start")
    stack.services["planner" if active == "planner-a" else "planner-b"].kill()

    await watcher.wait_for(status_reached(rid), 120, "the standby to finish the rollout")
    assert ((await kv.get("leader")).value or b"").decode() == standby
    completed = watcher.events(MaintenanceCompleted, rollout_id=rid)
    assert sorted(e.host for e in completed) == HOSTS[:3]


async def test_reboot_impact_shuts_vms_down_and_starts_them_with_reboot_notice(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_REBOOT_MIN_NOTICE_S="1")
    start_fleet(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    # Expected pause above the budget: not memory-preserving, so a Reboot maintenance.
    rollout = await client.submit(
        {
            "update_id": "kernel",
            "patch": {"duration_s": 0.1},
            "expected_pause_s": 20,
            "pause_budget_s": 5,
            "notice_s": 0,
        }
    )
    rid = rollout["rollout_id"]
    assert rollout["event_type"] == "Reboot"
    await watcher.wait_for(status_reached(rid), 60, "the reboot rollout")
    planned = watcher.events(MaintenancePlanned, rollout_id=rid)[0]
    assert planned.event_type == "Reboot"
    assert (planned.not_before - planned.occurred_at).total_seconds() >= 0.99  # Reboot minimum
    completed = watcher.events(MaintenanceCompleted, rollout_id=rid)[0]
    assert completed.ok and completed.event_type == "Reboot"
    assert {o.outcome for o in completed.vms} == {"resumed"}


async def test_refuses_a_pause_budget_above_30_seconds_with_a_clear_error(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    start_fleet(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    with pytest.raises(CommandError) as refused:
        await client.submit({"update_id": "long", "patch": {"duration_s": 1}, "pause_budget_s": 45})
    assert refused.value.error == "invalid-request" and "pause_budget_s" in str(
        refused.value.detail
    )


async def test_a_host_that_disappears_is_skipped_and_reported(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_INVENTORY_STALE_S="2")
    start_fleet(stack, HOSTS[:3], PP_HEARTBEAT_S="0.5")
    await ready(stack, client, watcher, HOSTS[:3])
    rollout = await client.submit(
        {"update_id": "gone", "patch": {"duration_s": 0.1}, "notice_s": 3, "max_hosts_in_flight": 1}
    )
    rid = rollout["rollout_id"]
    last = rollout["waves"][-1][0]
    stack.services[f"host-agent-{last}"].stop()  # it stops reporting before its wave
    await watcher.wait_for(status_reached(rid), 90, "the rollout")
    report = await client.get(rid)
    skipped = {h["host"]: h for h in report["hosts"] if h["state"] == "skipped"}
    assert list(skipped) == [last] and "inventory" in (skipped[last]["error"] or "")
    assert not watcher.events(MaintenanceStarted, rollout_id=rid, host=last)


async def test_abort_cancels_the_events_not_started(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    start_fleet(stack, HOSTS[:2])
    await ready(stack, client, watcher, HOSTS[:2])
    rollout = await client.submit(
        {"update_id": "later", "patch": {"duration_s": 0.1}, "notice_s": 600}
    )
    rid = rollout["rollout_id"]
    # Two waves, and the second one has its notice ahead of its turn (notice_ahead_waves=1).
    await watcher.wait_for(lambda w: len(w.events(MaintenancePlanned, rollout_id=rid)) == 2, 20)
    planned = watcher.events(MaintenancePlanned, rollout_id=rid)
    await client.abort(rid, "change freeze")
    await watcher.wait_for(
        lambda w: len(w.events(MaintenanceCancelled, rollout_id=rid)) == 2, 20, "cancellations"
    )
    cancelled = watcher.events(MaintenanceCancelled, rollout_id=rid)
    assert {e.scheduled_event_id for e in cancelled} == {e.scheduled_event_id for e in planned}
    assert not watcher.events(MaintenanceStarted, rollout_id=rid)


async def test_a_host_that_does_not_answer_counts_as_a_failure(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_START_TIMEOUT_S="1", PP_HOST_GRACE_S="1")
    start_fleet(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    stack.services["host-agent-h0"].kill()  # its inventory is fresh, but nobody will answer
    rollout = await client.submit(
        {"update_id": "silent", "patch": {"duration_s": 0.1}, "notice_s": 0, "pause_budget_s": 2}
    )
    rid = rollout["rollout_id"]
    halted = await watcher.wait_for(status_reached(rid, ("halted",)), 30, "the halt")
    assert "did not report" in (halted[0].reason or "")
    report = await client.get(rid)
    assert report["hosts"][0]["state"] == "failed"


async def test_a_page_of_the_fleet_inventory_fits_in_one_message(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, _ = bus
    start_core(stack, notifier=False, clock_sync=False)
    await wait_stream(client.nc)
    js = client.nc.jetstream()
    hosts = [f"hv-{i:03d}" for i in range(400)]
    for i, host in enumerate(hosts):  # 400 hosts of 20 VMs each report, as their agents would
        inventory = HostInventory(
            host=host,
            vms=[
                VMInfo(
                    vm=f"{host}-vm{j:02d}",
                    uuid=f"{i:08x}-0000-4000-8000-{j:012x}",
                    availability_set=f"set-{j % 4}",
                    update_domain=i % 5,
                    fault_domain=i % 3,
                    ip=f"10.{i // 250}.{i % 250}.{j + 1}",
                    state="running",
                )
                for j in range(20)
            ],
        )
        await js.publish(
            inventory.subject(),
            inventory.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(inventory.event_id)},
        )
    await wait_hosts(client, hosts, timeout=60)
    # 500 inventories asked for: 1.4 MB, more than NATS carries. The page stops short of it.
    page = await client.call("hosts", {"limit": 500})
    assert len(json.dumps(page)) < 1024 * 1024
    assert 0 < len(page["hosts"]) < len(hosts) and page["total"] == len(hosts)
    assert page["next_offset"] == len(page["hosts"])
    assert [h["host"] for h in await client.hosts()] == hosts


async def test_an_answer_larger_than_one_message_leaves_the_plan_out_and_says_so(
    workdir: Path,
) -> None:
    # A server that carries 64 KiB per message, and 1,800 hosts with long names: the plan alone
    # is larger (77 KB; a rollout of ~60,000 hosts is, against the 1 MiB of
    # deploy/nats/nats.conf). Such an answer used to be dropped: the caller timed out.
    async with planner_on_small_messages(workdir) as (_, nc):
        client = PlannerClient(nc)
        js = nc.jetstream()
        hosts = [f"hypervisor-{i:05d}-rack-{i // 40:03d}-west-example" for i in range(1800)]
        for i, host in enumerate(hosts):
            vm = VMInfo(vm=f"vm-{i:05d}", uuid=f"{i:032x}", state="running")
            inventory = HostInventory(host=host, vms=[vm])
            await js.publish(
                inventory.subject(),
                inventory.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(inventory.event_id)},
            )
        await wait_hosts(client, hosts, timeout=60)

        request = {"update_id": "u", "patch": {"duration_s": 0}, "max_hosts_in_flight": 100}
        plan = await client.plan(request)
        assert "waves" not in plan and plan["waves_total"] == 18
        assert plan["left_out"] == ["waves", "violations", "unknown_hosts"]
        assert "report" in plan["left_out_why"] and plan["lower_bound"] == 18
        # Submitted all the same, and said so: the answer has the counts, not the plan...
        summary = await client.submit({**request, "notice_s": 3600})
        assert summary["state"] == "running" and summary["waves_total"] == 18
        assert "waves" not in summary and summary["hosts_total"] == len(hosts)
        # ...and each host's wave is in the report, a page at a time.
        report = await client.get(summary["rollout_id"])
        waves = {h["host"]: h["wave"] for h in report["hosts"]}
        assert sorted(waves) == sorted(hosts)
        assert sorted(Counter(waves.values()).values()) == [100] * 18


async def test_the_planner_counts_the_vms_paused_now_from_each_hosts_pause_event(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """`vms_paused_now` while a window's patch runs, from the agent's one `HostPaused` per
    window (the planner no longer reads each VM's `VMPaused`), and 0 once they resumed."""
    client, watcher = bus
    start_core(stack, notifier=False)
    start_fleet(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    rollout = await client.submit(
        {"update_id": "u1", "patch": {"duration_s": 3.0}, "notice_s": 0.1, "pause_budget_s": 10}
    )
    rid = rollout["rollout_id"]
    paused = await watcher.wait_for(
        lambda w: w.events(HostPaused, rollout_id=rid), 30, "the host's pauses"
    )
    assert sorted(paused[0].paused_at) == sorted(vm for vm, _, _ in fleet_vms(0))
    summary: dict[str, Any] = {}
    deadline = asyncio.get_running_loop().time() + 2.5  # the patch runs 3 s from the pauses
    while asyncio.get_running_loop().time() < deadline:
        summary = await client.call("get", {"rollout_id": rid, "summary": True})
        if summary["vms_paused_now"] == 3:
            break
        await asyncio.sleep(0.05)
    assert summary["vms_paused_now"] == 3, summary
    assert not watcher.events(VMResumed, rollout_id=rid)  # still within the patch
    await watcher.wait_for(status_reached(rid), 60, "the rollout")
    summary = await client.call("get", {"rollout_id": rid, "summary": True})
    assert summary["vms_paused_now"] == 0 and summary["state"] == "completed"


async def test_the_planner_has_every_vms_clock_result_from_its_hosts_clock_events(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """The planner reads one `HostClockSynced` per host (clock-sync's results for the VMs it
    handled together), not each VM's `ClockSynced`: its report still has every VM's result,
    the same as the VM's own event says."""
    client, watcher = bus
    start_core(stack, notifier=False)
    start_fleet(stack, HOSTS[:2])
    await ready(stack, client, watcher, HOSTS[:2])
    rollout = await client.submit(
        {"update_id": "clocks", "patch": {"duration_s": 0.05}, "notice_s": 0}
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(status_reached(rid), 60, "the rollout")
    synced = {(e.host, e.vm): e for e in watcher.events(ClockSynced, rollout_id=rid)}
    by_host = watcher.events(HostClockSynced, rollout_id=rid)
    assert len(synced) == 6
    assert sorted((e.host, vm) for e in by_host for vm in e.clocks) == sorted(synced)
    for event in by_host:
        for vm, clock in event.clocks.items():
            assert clock == VMClock.of(synced[(event.host, vm)])
    report = await client.get(rid)
    records = {
        (h["host"], vm): (r["clock_ok"], r["clock_method"], r["clock_error"])
        for h in report["hosts"]
        for vm, r in h["vm_records"].items()
    }
    assert records == {key: (e.ok, e.method, e.error) for key, e in synced.items()}
