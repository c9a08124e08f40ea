"""clock-sync and old copies of a resume (a replay or a redelivery past JetStream's two-minute
de-duplication window): the first sets the clock and reports it once; a copy of a resume whose
result is in the stream asks no agent and reports nothing again. Real nats-server, planner (it
declares the stream), clock-sync and a test-driver host-agent, all processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.clock_sync.sync import result_id
from shared import subjects
from shared.client import EventWatcher, PlannerClient
from shared.contracts import ClockSynced, Event, HostClockSynced, VMClock, VMResumed, utcnow
from shared.devstack import LocalStack
from tests.support.fleet import ready, sim_vms, start_core

HOST = "hv-01"


def resumed(host: str, rollout_id: str, at: datetime) -> VMResumed:
    """The resume, at `at`, of the host's VM `<host>-a` after a 1 s pause."""
    return VMResumed(
        host=host,
        vm=f"{host}-a",
        rollout_id=rollout_id,
        occurred_at=at,
        paused_at=at - timedelta(seconds=1),
        resumed_at=at,
        paused_ms=1000.0,
        budget_ms=30000.0,
    )


async def consumer_idle(client: PlannerClient, timeout: float = 20.0) -> None:
    """Wait until clock-sync's durable has no message pending or unacknowledged."""
    js = client.nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.consumer_info(subjects.STREAM_NAME, "clock-sync-resumed")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"clock-sync still busy: {info}")
        await asyncio.sleep(0.05)


async def synced(
    watcher: EventWatcher, vms: list[str], timeout: float, what: str
) -> list[ClockSynced]:
    """The `ClockSynced` of `HOST` once every VM of `vms` has one."""
    return await watcher.wait_for(
        lambda w: (
            len({r.vm for r in w.events(ClockSynced, host=HOST)}) >= len(vms)
            and w.events(ClockSynced, host=HOST)
        ),
        timeout,
        what,
    )


async def store_event(js: Any, event: Event) -> None:
    """Store an event as its sender does (its event id as the message id)."""
    await js.publish(
        event.subject(),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(event.event_id)},
    )


async def one_vm_host_watched(
    stack: LocalStack, client: PlannerClient, watcher: EventWatcher
) -> list[bytes]:
    """planner, clock-sync and the agent of `HOST` (one VM) running; returns the list every clock
    request clock-sync sends to that agent goes to, seen from the side."""
    start_core(stack, notifier=False)
    stack.add_sim_host(HOST, sim_vms([(f"{HOST}-a", None, None)]))
    await ready(stack, client, watcher, [HOST])
    asked: list[bytes] = []

    async def observe(msg: Msg) -> None:
        asked.append(msg.data)

    await client.nc.subscribe(subjects.host_clock_command(HOST), cb=observe)
    await client.nc.flush()
    return asked


async def test_an_old_copy_of_a_synced_resume_asks_no_agent_and_reports_nothing_again(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    asked = await one_vm_host_watched(stack, client, watcher)

    # A resume from ten minutes ago, for a VM that has no clock result yet: an old copy
    # (outside the de-duplication window) is looked up, nothing is found, the clock is set.
    then = utcnow() - timedelta(minutes=10)
    resume = resumed(HOST, "r-old", then)
    js = client.nc.jetstream()
    await js.publish(resume.subject(), resume.model_dump_json().encode())
    results = await watcher.wait_for(
        lambda w: w.events(ClockSynced, vm=resume.vm), 20, "the first clock result"
    )
    assert [r.event_id for r in results] == [result_id(resume)]
    assert results[0].attempts == 1 and results[0].rollout_id == "r-old"
    # The same result for its host, stored before the resume is acknowledged.
    await consumer_idle(client)
    hosts = await watcher.wait_for(
        lambda w: w.events(HostClockSynced, host=HOST), 10, "the host's clock result"
    )
    assert hosts[0].rollout_id == "r-old"
    assert hosts[0].clocks == {resume.vm: VMClock.of(results[0])}
    assert len(asked) == 1 and resume.vm.encode() in asked[0]

    # The same resume again (a new message id, so JetStream stores the copy): its result is in
    # the stream, so no agent is asked and nothing is reported.
    copies_before = len(watcher.events(VMResumed, vm=resume.vm))
    await js.publish(
        resume.subject(),
        resume.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(uuid.uuid4())},
    )
    await watcher.wait_for(
        lambda w: len(w.events(VMResumed, vm=resume.vm)) > copies_before, 10, "the copy"
    )
    await consumer_idle(client)
    await client.nc.flush()
    assert len(asked) == 1, asked
    assert len(watcher.events(ClockSynced, vm=resume.vm)) == 1

    # An even older resume of the same VM (another event): its clock was set since, by the
    # result above, so again nothing is asked and nothing reported.
    older = resume.model_copy(
        update={
            "event_id": uuid.uuid4(),
            "occurred_at": then - timedelta(minutes=5),
            "resumed_at": then - timedelta(minutes=5),
        }
    )
    await js.publish(older.subject(), older.model_dump_json().encode())
    await watcher.wait_for(lambda w: w.events(VMResumed, event_id=older.event_id), 10, "it")
    await consumer_idle(client)
    await client.nc.flush()
    assert len(asked) == 1, asked
    assert len(watcher.events(ClockSynced, vm=resume.vm)) == 1
    assert len(watcher.events(HostClockSynced, host=HOST)) == 1


async def test_a_resume_delivered_again_whose_vms_result_is_stored_gets_its_hosts_result(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """A replica that stored a VM's `ClockSynced` and stopped before its host's result (and its
    ack): the resume comes again, and its host's result goes out with what is stored, the VM's
    clock not set twice. (The host here has no agent, so the first try fails and the resume is
    delivered again; its result is stored meanwhile, as that replica would have.)"""
    client, watcher = bus
    start_core(stack, notifier=False, PP_CLOCK_RETRY_S="0.3")
    await ready(stack, client, watcher, [])
    host = "hv-agentless"
    resume = resumed(host, "r-again", utcnow())
    js = client.nc.jetstream()
    await store_event(js, resume)
    stored = ClockSynced(
        event_id=result_id(resume),
        host=host,
        vm=resume.vm,
        rollout_id="r-again",
        ok=True,
        skew_before_ms=-1234.0,
        skew_after_ms=0.25,
        method="host-time",
        attempts=1,
    )
    await store_event(js, stored)
    [result] = await watcher.wait_for(
        lambda w: w.events(HostClockSynced, host=host), 20, "the host's clock result"
    )
    assert result.rollout_id == "r-again" and result.clocks == {resume.vm: VMClock.of(stored)}
    await consumer_idle(client)
    assert [e.event_id for e in watcher.events(ClockSynced, vm=resume.vm)] == [stored.event_id]


async def test_a_result_carries_on_the_trace_of_its_resume_from_a_replica_that_exports_nothing(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """Each VM's result goes on in its own resume's trace, the VMs of one host handled together
    (here two resumes of one host in two traces)."""
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    # A replica that exports no traces (the stack's services export to the test's receiver).
    stack.start_service("clock-sync", "clock_sync", (), OTEL_TRACES_EXPORTER="none")
    stack.add_sim_host(HOST, sim_vms([(f"{HOST}-a", None, None), (f"{HOST}-b", None, None)]))
    await ready(stack, client, watcher, [HOST])
    first = resumed(HOST, "r-traced", utcnow())
    second = first.model_copy(update={"vm": f"{HOST}-b", "event_id": uuid.uuid4()})
    traceparents = {}
    for resume in (first, second):
        trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        traceparents[resume.vm] = f"00-{trace_id}-{parent}-00"
        await client.nc.jetstream().publish(
            resume.subject(),
            resume.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(resume.event_id), "traceparent": traceparents[resume.vm]},
        )
    await watcher.wait_for(lambda w: len(w.events(ClockSynced, host=HOST)) == 2, 20, "results")
    for resume in (first, second):
        stored = await client.nc.jetstream().get_last_msg(
            subjects.STREAM_NAME, subjects.vm_clock(HOST, resume.vm)
        )
        # The resume's trace, unrecorded, and no span of clock-sync's own in between.
        assert (stored.headers or {})["traceparent"] == traceparents[resume.vm]


async def test_a_batch_larger_than_the_in_flight_bound_is_synced(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """`PP_CLOCK_IN_FLIGHT` bounds the resumes one replica handles at once; a batch larger than
    the bound (three resumes stored before clock-sync starts, fetched together, against a
    bound of one) is handled all the same, not waited on for ever."""
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    vms = [f"{HOST}-a", f"{HOST}-b", f"{HOST}-c"]
    stack.add_sim_host(HOST, sim_vms([(vm, None, None) for vm in vms]))
    await ready(stack, client, watcher, [HOST])
    js = client.nc.jetstream()
    first = resumed(HOST, "r-bound", utcnow())
    for vm in vms:
        await store_event(js, first.model_copy(update={"vm": vm, "event_id": uuid.uuid4()}))
    stack.start_service("clock-sync", "clock_sync", (), PP_CLOCK_IN_FLIGHT="1")
    results = await synced(watcher, vms, 30, "every result")
    assert sorted(r.vm for r in results) == vms, results
    await consumer_idle(client)
    # The bound still holds for what comes next: one more resume, one more result.
    await store_event(
        js, first.model_copy(update={"event_id": uuid.uuid4(), "rollout_id": "r-bound-2"})
    )
    await watcher.wait_for(
        lambda w: [r for r in w.events(ClockSynced, host=HOST) if r.rollout_id == "r-bound-2"],
        30,
        "the later result",
    )
    await consumer_idle(client)


async def test_resumes_whose_agent_answers_only_later_are_synced_once_it_does(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """The agent of a host does not answer yet (it is starting): its VMs' first deliveries are
    retried, and once it answers each VM has one result, after more than one attempt."""
    client, watcher = bus
    start_core(stack, notifier=False, PP_CLOCK_RETRY_S="0.3")
    await ready(stack, client, watcher, [])
    js = client.nc.jetstream()
    first = resumed(HOST, "r-later", utcnow())
    resumes = [first, first.model_copy(update={"vm": f"{HOST}-b", "event_id": uuid.uuid4()})]
    for resume in resumes:
        await store_event(js, resume)

    async def retried() -> None:
        redelivered = 0
        while redelivered < 2:
            await asyncio.sleep(0.05)
            with contextlib.suppress(NotFoundError):  # clock-sync's consumer is not made yet
                info = await js.consumer_info(subjects.STREAM_NAME, "clock-sync-resumed")
                redelivered = info.num_redelivered

    await asyncio.wait_for(retried(), 20)
    assert watcher.events(ClockSynced, host=HOST) == []
    stack.add_sim_host(HOST, sim_vms([(f"{HOST}-a", None, None), (f"{HOST}-b", None, None)]))
    # A retry is a nak with a delay, a core NATS message: one lost on its way leaves the resume
    # to the consumer's ack wait (30 s), after which the server delivers it again by itself.
    # Both are the product working; the wait covers the slower one.
    results = await synced(watcher, [f"{HOST}-a", f"{HOST}-b"], 45, "both results")
    assert sorted(r.vm for r in results) == [f"{HOST}-a", f"{HOST}-b"], results
    # The agent's own answer (the test driver has no guest clock to set), after the retries.
    assert all(r.attempts > 1 and "did not answer" not in (r.error or "") for r in results)
    # Stored with its VMs' results, read by the watcher a moment after them.
    hosts = await watcher.wait_for(
        lambda w: (
            len([vm for h in w.events(HostClockSynced, host=HOST) for vm in h.clocks]) >= 2
            and w.events(HostClockSynced, host=HOST)
        ),
        10,
        "the host's results",
    )
    assert sorted(vm for h in hosts for vm in h.clocks) == [f"{HOST}-a", f"{HOST}-b"]
    await consumer_idle(client)
    assert len(watcher.events(ClockSynced, host=HOST)) == 2


async def test_a_fresh_copy_of_a_resume_under_another_message_id_asks_no_agent_and_reports_nothing(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """A replay seconds after the resume (its copy stored under another message id): taken for
    the agent's own resume, it would set the clock again and report its host's result again, in
    another grouping, under another id, stored anew. It is looked up instead."""
    client, watcher = bus
    asked = await one_vm_host_watched(stack, client, watcher)
    resume = resumed(HOST, "r-fresh", utcnow())
    js = client.nc.jetstream()
    body = resume.model_dump_json().encode()
    await js.publish(resume.subject(), body, headers={"Nats-Msg-Id": str(resume.event_id)})
    await watcher.wait_for(lambda w: w.events(HostClockSynced, host=HOST), 20, "the result")
    await consumer_idle(client)
    assert len(asked) == 1
    await js.publish(resume.subject(), body, headers={"Nats-Msg-Id": str(uuid.uuid4())})
    await watcher.wait_for(lambda w: len(w.events(VMResumed, vm=resume.vm)) == 2, 10, "the copy")
    await consumer_idle(client)
    await client.nc.flush()
    assert len(asked) == 1, asked
    assert len(watcher.events(ClockSynced, vm=resume.vm)) == 1
    assert len(watcher.events(HostClockSynced, host=HOST)) == 1
