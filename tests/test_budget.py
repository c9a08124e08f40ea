"""The pause budget is a hard limit: a hanging patch is killed and every VM resumed on time."""

from __future__ import annotations

from shared.client import EventWatcher, PlannerClient
from shared.contracts import HostPatched, MaintenanceCompleted, RolloutStatus, VMResumed
from shared.devstack import LocalStack
from tests.support.fleet import processes_with, ready, sim_vms, start_core

BUDGET_S = 2.0
CHILD_SLEEP = "61.2345"


async def test_resumes_every_vm_at_the_budget_when_the_patch_hangs(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    vms = sim_vms([("a", "web", 0), ("b", "web", 0), ("c", "db", 0), ("d", None, None)])
    stack.add_sim_host("h1", vms)
    await ready(stack, client, watcher, ["h1"])

    # The patch hangs, and so does a child it started: the whole process group must die.
    hang = f"sleep {CHILD_SLEEP} & sleep 60"
    rollout = await client.submit(
        {
            "update_id": "hanging-patch",
            "patch": {"command": hang},
            "pause_budget_s": BUDGET_S,
            "expected_pause_s": 1,
            "notice_s": 0,
        }
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: w.events(MaintenanceCompleted, rollout_id=rid), 30, "window")

    resumed = watcher.events(VMResumed, rollout_id=rid)
    assert sorted(e.vm for e in resumed) == ["a", "b", "c", "d"]
    for event in resumed:
        assert event.forced and event.ok
        assert abs(event.paused_ms - BUDGET_S * 1000) <= 100, event.paused_ms
    patched = watcher.events(HostPatched, rollout_id=rid)
    assert len(patched) == 1 and not patched[0].ok and "killed" in (patched[0].error or "")

    # A forced resume is a failure: with a failure budget of 0 the rollout halts and says why.
    halted = await watcher.wait_for(
        lambda w: [e for e in w.events(RolloutStatus, rollout_id=rid) if e.state == "halted"],
        10,
        "the rollout to halt",
    )
    assert "failure budget" in (halted[0].reason or "")
    status = await client.get(rid)
    assert status["hosts"][0]["state"] == "failed"
    # The patch's whole process group was killed, its background child included.
    assert not processes_with(CHILD_SLEEP)
