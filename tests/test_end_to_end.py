"""The four services as separate processes on one real nats-server pause, patch and resume a
host end to end, in one trace per host maintenance."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from shared.client import EventWatcher, PlannerClient
from shared.contracts import (
    ClockSynced,
    HostInventory,
    HostPatched,
    MaintenancePlanned,
    VMPaused,
    VMResumed,
)
from shared.devstack import LocalStack
from tests.support.fleet import ready, sim_vms, start_core, status_reached
from tests.support.otlp import OtlpReceiver

VMS = [("web-1", "web", 0), ("web-2", "web", 0), ("db-1", "db", 1), ("db-2", "db", 1)]
PATCH_S = 0.3


async def poll_document(
    base_url: str, source: str, seen: list[dict[str, Any]], stop: asyncio.Event
) -> None:
    """Poll the Scheduled Events document as the VM at `source` does, recording every change."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
        while not stop.is_set():
            try:
                r = await http.get(
                    "/metadata/scheduledevents",
                    params={"api-version": "2020-07-01"},
                    headers={"Metadata": "true"},
                )
                if r.status_code == 200:
                    doc = r.json()
                    if not seen or seen[-1] != doc:
                        seen.append(doc)
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def test_pauses_patches_resumes_one_host_in_one_trace(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher], otlp: OtlpReceiver
) -> None:
    client, watcher = bus
    notifier_url = start_core(stack)
    vms = sim_vms(VMS)
    stack.add_sim_host("h1", vms)
    await ready(stack, client, watcher, ["h1"])

    seen: list[dict[str, Any]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_document(notifier_url, vms[0].ip or "", seen, stop))
    # The notifier must know web-1's address before the event is planned.
    await watcher.wait_for(lambda w: w.events(HostInventory, host="h1"), 10, "inventory")
    rollout = await client.submit(
        {
            "update_id": "kernel-fix-1",
            "patch": {"duration_s": PATCH_S},
            "notice_s": 1.5,
            "pause_budget_s": 5,
            "expected_pause_s": 1,
        }
    )
    rollout_id = rollout["rollout_id"]
    final = await watcher.wait_for(
        status_reached(rollout_id, ("completed", "halted", "aborted", "failed")),
        60,
        "the rollout to finish",
    )
    assert final[-1].state == "completed", final[-1]
    await watcher.wait_for(lambda w: len(w.events(ClockSynced, rollout_id=rollout_id)) == 4, 20)
    await asyncio.sleep(0.3)  # the poller's last round after the event disappeared
    stop.set()
    await poller

    # Per VM, in stream order: planned < paused < patched < resumed < clock synced.
    seq = {id(r.event): r.seq for r in watcher.received if r.event is not None}
    planned = watcher.events(MaintenancePlanned, rollout_id=rollout_id)
    patched = watcher.events(HostPatched, rollout_id=rollout_id)
    assert len(planned) == 1 and len(patched) == 1 and patched[0].ok
    for name, _, _ in VMS:
        paused = watcher.events(VMPaused, vm=name, rollout_id=rollout_id)
        resumed = watcher.events(VMResumed, vm=name, rollout_id=rollout_id)
        clock = watcher.events(ClockSynced, vm=name, rollout_id=rollout_id)
        assert len(paused) == len(resumed) == len(clock) == 1, name
        order = [seq[id(e)] for e in (planned[0], paused[0], patched[0], resumed[0], clock[0])]
        assert order == sorted(order), (name, order)
        assert PATCH_S * 1000 <= resumed[0].paused_ms < 5000
        assert not resumed[0].forced

    # Every VM is running at the end. The agent lists its host again when the window closes;
    # that listing finds what its last inventory said, so it publishes none (the heartbeat
    # repeats it): no inventory ever showed a VM paused, and the last shows every VM running.
    inventories = watcher.events(HostInventory, host="h1")
    assert inventories and all(v.state == "running" for i in inventories for v in i.vms)
    assert {v.vm for v in inventories[-1].vms} == {name for name, _, _ in VMS}

    # The document went Scheduled -> Started -> gone, its incarnation increasing each time.
    statuses = [[e["EventStatus"] for e in d["Events"]] for d in seen]
    assert ["Scheduled"] in statuses and ["Started"] in statuses and statuses[-1] == []
    assert statuses.index(["Scheduled"]) < statuses.index(["Started"]) < len(statuses) - 1
    incarnations = [d["DocumentIncarnation"] for d in seen]
    assert incarnations == sorted(incarnations) and len(set(incarnations)) == len(incarnations)
    scheduled = next(
        d for d in seen if d["Events"] and d["Events"][0]["EventStatus"] == "Scheduled"
    )
    event = scheduled["Events"][0]
    # The host carries both sets; web-1 is shown its own set's VMs only.
    assert event["EventType"] == "Freeze" and sorted(event["Resources"]) == ["web-1", "web-2"]
    assert event["NotBefore"].endswith("GMT") and event["DurationInSeconds"] == 1

    # One trace holds spans of all four services; each vm.pause span lasts the VM's pause.
    resumed_by_vm = {e.vm: e for e in watcher.events(VMResumed, rollout_id=rollout_id)}

    def trace_complete(spans: list[Any]) -> bool:
        pauses = [s for s in spans if s.name.startswith("vm.pause ")]
        if len(pauses) < 4:
            return False
        trace_id = pauses[0].trace_id
        services = {s.service for s in spans if s.trace_id == trace_id}
        return {"planner", "host-agent", "notifier", "clock-sync"} <= services

    spans = otlp.wait_for(trace_complete, timeout=30)
    pauses = [s for s in spans if s.name.startswith("vm.pause ")]
    assert len({s.trace_id for s in pauses}) == 1
    for span in pauses:
        vm = span.name.removeprefix("vm.pause ")
        assert abs(span.duration_ms - resumed_by_vm[vm].paused_ms) <= 5, (vm, span.duration_ms)

    # Each resume is published in its pause's trace (a `... create` span under the VM's
    # vm.pause), and clock-sync's work on that VM continues that span.
    def clock_follows_resume(spans: list[Any]) -> bool:
        by_id = {s.span_id: s for s in spans}
        chained = set()
        for sync in (s for s in spans if s.name.startswith("clock.sync ")):
            publish = by_id.get(sync.parent_span_id)
            pause = by_id.get(publish.parent_span_id) if publish else None
            vm = sync.name.removeprefix("clock.sync ")
            if (
                publish is not None
                and publish.service == "host-agent"
                and publish.name == f"pp.evt.vm.h1.{vm}.resumed create"
                and publish.attributes.get("messaging.message.id")
                == str(resumed_by_vm[vm].event_id)
                and pause is not None
                and pause.name == f"vm.pause {vm}"
            ):
                chained.add(vm)
        return chained == set(resumed_by_vm)

    otlp.wait_for(clock_follows_resume, timeout=30)
