"""Faults while rollouts run, each test stopping by itself and asserting the outcome: NATS nodes
and servers dying, agents killed mid-pause, every event delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
from nats.js.api import KeyValueConfig, StreamConfig

from shared import subjects
from shared.bus import _declare, _open_bucket
from shared.client import EventWatcher, PlannerClient, connect
from shared.contracts import (
    ClockSynced,
    HostInventory,
    HostPatched,
    MaintenanceCompleted,
    MaintenanceStarted,
    VMPaused,
    VMResumed,
)
from shared.devstack import LocalStack, NatsCluster, NatsServer
from tests.support.fleet import (
    VM_IP_BASE,
    ready,
    sim_vms,
    start_core,
    status_reached,
    wait_http,
)

HOSTS = ["c0", "c1", "c2"]


def start_hosts(stack: LocalStack, hosts: list[str] = HOSTS) -> None:
    for i, host in enumerate(hosts):
        spec = [
            (f"{host}-web", "web", i),
            (f"{host}-db", "db", i % 2),
            (f"{host}-solo", None, None),
        ]
        stack.add_sim_host(host, sim_vms(spec, first_ip=10 * i + 1))


async def stream_events(url: str) -> list[dict[str, Any]]:
    """Every event stored in the stream, read afresh (a new connection, a new consumer) once
    every replica of the stream is current: a node restarted mid-rollout may still be catching
    up, and JetStream API requests through it time out meanwhile."""
    nc = await connect(url)
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            info = await js.stream_info("PAUSEPATCH")
            replicas = info.cluster.replicas if info.cluster else None
            if all(r.current and not r.offline for r in replicas or []):
                watcher = await EventWatcher(nc).start()
                break
        except nats.errors.TimeoutError:
            pass
        assert loop.time() < deadline, "the stream's replicas never all became current"
        await asyncio.sleep(0.2)
    info = await js.stream_info("PAUSEPATCH")
    await watcher.wait_for(lambda w: len(w.received) >= info.state.messages, 30, "the whole stream")
    await watcher.stop()
    await nc.close()
    return [r.raw for r in watcher.received]


def each_once(events: list[dict[str, Any]], rollout_id: str, vms: list[str]) -> None:
    """Every VM's pause, resume and clock events are in the stream exactly once."""
    counts = Counter(
        (e["type"], e["vm"])
        for e in events
        if e.get("rollout_id") == rollout_id
        and e["type"] in ("VMPaused", "VMResumed", "ClockSynced")
    )
    for vm in vms:
        for kind in ("VMPaused", "VMResumed", "ClockSynced"):
            assert counts[(kind, vm)] == 1, (kind, vm, counts[(kind, vm)])


def all_vms(hosts: list[str] = HOSTS) -> list[str]:
    return [f"{h}-{role}" for h in hosts for role in ("web", "db", "solo")]


async def test_one_nats_node_killed_mid_rollout_loses_nothing_and_patches_no_host_twice(
    workdir: Path,
) -> None:
    stack = LocalStack(workdir, extra_env={"PP_HEARTBEAT_S": "2"})
    cluster = stack.start_nats_cluster(3)
    nc = await connect(cluster.url)
    try:
        client, watcher = PlannerClient(nc), EventWatcher(nc)
        start_core(stack, notifier=False)
        start_hosts(stack)
        await ready(stack, client, watcher, HOSTS)
        await _lose_a_node_mid_rollout(stack, client, watcher)
    finally:
        await nc.close()
        stack.stop()


async def _lose_a_node_mid_rollout(
    stack: LocalStack, client: PlannerClient, watcher: EventWatcher
) -> None:
    assert stack.cluster is not None
    cluster = stack.cluster

    rollout = await client.submit(
        {
            "update_id": "node-loss",
            "patch": {"duration_s": 1.0},
            "notice_s": 0.5,
            "max_hosts_in_flight": 1,
        }
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: w.events(VMPaused, rollout_id=rid), 30, "the first pause")
    victim = cluster.nodes[0]
    victim.stop(signal.SIGKILL)  # mid-window
    await asyncio.sleep(3)
    victim.start(wait=False)  # back later, same store

    await watcher.wait_for(status_reached(rid), 120, "the rollout")
    events = await stream_events(cluster.url)
    starts = Counter(e["host"] for e in events if e["type"] == "MaintenanceStarted")
    assert starts == dict.fromkeys(HOSTS, 1), starts
    done = Counter(e["host"] for e in events if e["type"] == "MaintenanceCompleted")
    assert done == dict.fromkeys(HOSTS, 1), done
    each_once(events, rid, all_vms())


async def test_nats_restarted_mid_pause_window_never_lengthens_the_pause(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    start_hosts(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    patch_s = 3.0
    rollout = await client.submit(
        {
            "update_id": "outage",
            "patch": {"duration_s": patch_s},
            "notice_s": 0,
            "pause_budget_s": 10,
        }
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: len(w.events(VMPaused, rollout_id=rid)) == 3, 30, "the pauses")
    assert stack.nats is not None
    stack.nats.stop(signal.SIGKILL)  # the whole bus is gone while the VMs are paused
    await asyncio.sleep(patch_s + 1)  # the window ends during the outage
    stack.nats.start()

    events = []
    for _ in range(60):
        events = await stream_events(stack.nats_url)
        if any(e["type"] == "RolloutStatus" and e["state"] == "completed" for e in events):
            break
        await asyncio.sleep(1)
    resumed = [e for e in events if e["type"] == "VMResumed" and e["rollout_id"] == rid]
    assert len(resumed) == 3
    for event in resumed:  # the pause ended on time, the outage notwithstanding
        assert patch_s * 1000 <= event["paused_ms"] < patch_s * 1000 + 100, event
        assert not event["forced"]
    each_once(events, rid, all_vms(HOSTS[:1]))
    assert sum(e["type"] == "HostPatched" for e in events) == 1
    assert sum(e["type"] == "MaintenanceCompleted" for e in events) == 1


async def test_an_idle_agent_asks_for_its_start_again_as_soon_as_the_bus_is_back(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    # An agent waits for its host's start on a pull request the server holds; a restarted
    # server has forgotten it. Its polls here last a minute: the start must not wait for that.
    client, watcher = bus
    start_core(stack, notifier=False)
    host = HOSTS[0]
    stack.add_sim_host(
        host, sim_vms([(f"{host}-web", "web", 0), (f"{host}-db", "db", 0)]), PP_START_POLL_S="60"
    )
    await ready(stack, client, watcher, [host])
    durable = f"host-agent-{host}-started"
    js = client.nc.jetstream()
    loop = asyncio.get_running_loop()

    async def waiting_requests(timeout: float) -> None:
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(nats.errors.Error):
                if (await js.consumer_info(subjects.STREAM_NAME, durable)).num_waiting >= 1:
                    return
            assert loop.time() < deadline, "the agent's pull request is not on the server"
            await asyncio.sleep(0.05)

    await waiting_requests(30)
    assert stack.nats is not None
    stack.nats.stop(signal.SIGKILL)
    stack.nats.start()
    # The agent reconnects within a second or two (1 s between attempts) and asks again.
    await waiting_requests(15)
    rollout = await client.submit(
        {"update_id": "after-restart", "patch": {"duration_s": 0.1}, "notice_s": 0}
    )
    rid = rollout["rollout_id"]
    done = await watcher.wait_for(
        lambda w: w.events(MaintenanceCompleted, rollout_id=rid), 20, "the host's window"
    )
    assert done[0].ok and len(done[0].vms) == 2


async def test_host_agent_killed_mid_pause_resumes_from_its_journal_and_the_host_counts_failed(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    start_hosts(stack, HOSTS[:1])
    await ready(stack, client, watcher, HOSTS[:1])
    rollout = await client.submit(
        {
            "update_id": "agent-crash",
            "patch": {"duration_s": 20},
            "notice_s": 0,
            "failure_budget": 0,
        }
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(lambda w: len(w.events(VMPaused, rollout_id=rid)) == 3, 30, "pauses")
    agent = stack.services["host-agent-c0"]
    agent.kill()
    agent.start()  # same host, same state directory: its journal is there

    recovered = await watcher.wait_for(
        lambda w: [e for e in w.events(VMResumed, rollout_id=rid) if e.recovered], 30, "recovery"
    )
    await watcher.wait_for(
        lambda w: len([e for e in w.events(VMResumed, rollout_id=rid) if e.recovered]) == 3, 30
    )
    assert recovered[0].forced
    halted = await watcher.wait_for(status_reached(rid, ("halted",)), 30, "the halt")
    assert "c0" in (halted[0].reason or "")
    completed = watcher.events(MaintenanceCompleted, rollout_id=rid)
    assert len(completed) == 1 and completed[0].recovered
    report = await client.get(rid)
    assert report["hosts"][0]["state"] == "failed" and report["hosts"][0]["recovered"]


async def test_every_event_delivered_twice_changes_nothing(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    notifier = start_core(stack)
    start_hosts(stack)
    await ready(stack, client, watcher, HOSTS)
    await wait_http(notifier)  # its API opens once it has replayed the stream
    rollout = await client.submit(
        {"update_id": "replay", "patch": {"duration_s": 0.1}, "notice_s": 0}
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(status_reached(rid), 60, "the rollout")
    await watcher.wait_for(
        lambda w: len(w.events(ClockSynced, rollout_id=rid)) == len(all_vms()), 30, "clocks"
    )
    before = await client.get(rid)
    original = list(watcher.received)
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(local_address=VM_IP_BASE + "1"), base_url=notifier
    ) as http:
        incarnation_before = (
            await http.get(
                "/metadata/scheduledevents",
                params={"api-version": "2020-07-01"},
                headers={"Metadata": "true"},
            )
        ).json()["DocumentIncarnation"]

    # Replay the whole stream: every event again, with new message ids so JetStream keeps them.
    js = client.nc.jetstream()
    for received in original:
        await js.publish(received.subject, json.dumps(received.raw).encode())

    # Wait until every durable consumer has seen (and acknowledged) the copies.
    async def consumers_idle() -> bool:
        for consumer in await js.consumers_info("PAUSEPATCH"):
            if consumer.num_pending or consumer.num_ack_pending:
                return False
        return True

    for _ in range(100):
        if await consumers_idle():
            break
        await asyncio.sleep(0.2)
    assert await consumers_idle()
    await asyncio.sleep(1)  # anything a service would emit in reaction is on the stream by now

    # Everything received since the replay began is a copy (each original exactly once, in
    # whatever order inventory heartbeats interleave with them) or a reaction. (Heartbeats go
    # on meanwhile: they are not a reaction to anything.)
    copies = Counter(json.dumps(r.raw, sort_keys=True) for r in original)
    reactions = []
    for r in watcher.received[len(original) :]:
        key = json.dumps(r.raw, sort_keys=True)
        if copies[key] > 0:
            copies[key] -= 1
        elif not isinstance(r.event, HostInventory):
            reactions.append(r.raw)
    assert not +copies, "not every copy came back"
    assert not reactions, f"services reacted to the replay: {reactions}"
    ids = Counter(
        str(r.event.event_id)
        for r in watcher.received
        if r.event is not None and not isinstance(r.event, HostInventory)
    )
    assert set(ids.values()) == {2}  # each original once, its copy once; nothing new
    after = await client.get(rid)
    for key in ("state", "hosts_ok", "hosts_failed", "current_wave"):
        assert after[key] == before[key], key
    assert [h["state"] for h in after["hosts"]] == [h["state"] for h in before["hosts"]]
    assert sum(isinstance(r.event, MaintenanceStarted) for r in watcher.received) == 2 * len(HOSTS)
    assert sum(isinstance(r.event, HostPatched) for r in watcher.received) == 2 * len(HOSTS)
    # The VMs' Scheduled Events documents stay empty: finished events do not come back.
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(local_address=VM_IP_BASE + "1"), base_url=notifier
    ) as http:
        doc = (
            await http.get(
                "/metadata/scheduledevents",
                params={"api-version": "2020-07-01"},
                headers={"Metadata": "true"},
            )
        ).json()
    assert doc["Events"] == [] and doc["DocumentIncarnation"] == incarnation_before


async def test_streams_and_buckets_are_declared_once_the_cluster_can_place_them(
    workdir: Path,
) -> None:
    # A 3-node cluster that lost its quorum: JetStream refuses (or does not answer) a new
    # stream. The declaration goes on until a quorum is back; it used to give up at the first
    # refusal and stop the planner.
    cluster = NatsCluster(workdir, 3).start()
    try:
        for node in cluster.nodes[1:]:
            node.stop(signal.SIGKILL)
        nc = await connect(cluster.nodes[0].url)
        js = nc.jetstream(timeout=1)  # each refusal or unanswered request within the wait below
        config = StreamConfig(name="OWNED", subjects=["owned.>"], num_replicas=3)
        bucket = KeyValueConfig(bucket="owned", replicas=3, history=1)
        deadline = time.monotonic() + 60
        declaring = asyncio.ensure_future(_declare(js, config, deadline))
        opening = asyncio.ensure_future(_open_bucket(js, bucket, deadline))
        await asyncio.sleep(2)
        assert not declaring.done() and not opening.done()  # refused meanwhile, still trying
        for node in cluster.nodes[1:]:
            node.start(wait=False)
        await asyncio.wait_for(declaring, 60)
        kv = await asyncio.wait_for(opening, 60)
        assert (await js.stream_info("OWNED")).config.num_replicas == 3
        assert (await kv.status()).bucket == "owned"
        assert (await js.stream_info("KV_owned")).config.num_replicas == 3
        await nc.close()
    finally:
        cluster.stop()


async def test_a_server_whose_picked_port_was_taken_meanwhile_starts_on_another(
    workdir: Path,
) -> None:
    # Free when picked, taken when the server binds it (seen once in CI, beside other tests'
    # connections): the first start moves to new ports; a restart keeps its port.
    server = NatsServer(workdir)
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
    try:
        assert server.port != taken
        nc = await connect(server.url)
        assert (await nc.jetstream().account_info()).streams == 0
        await nc.close()
        port = server.port
        server.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            with pytest.raises(RuntimeError, match="address already in use"):
                server.start()
        assert server.port == port
    finally:
        server.stop()


async def test_a_cluster_is_ready_only_when_every_node_joined_and_a_taken_port_is_replaced(
    workdir: Path,
) -> None:
    # A meta leader alone is a quorum of 2 out of 3: a stream on 3 replicas is still refused.
    # The test cluster waits for every node, and a port taken between picking and starting
    # makes it start again on new ports instead of running with a node short.
    cluster = NatsCluster(workdir, 3)
    taken = cluster.nodes[2].port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
    try:
        assert taken not in [node.port for node in cluster.nodes]
        assert all(node.proc is not None and node.proc.poll() is None for node in cluster.nodes)
        nc = await connect(cluster.url)
        js = nc.jetstream(timeout=5)
        # At once, no retry: every node is a current peer of the meta leader.
        await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
        placed = (await js.stream_info("R3")).cluster
        assert placed is not None and len(placed.replicas or []) == 2
        await nc.close()
        cluster.nodes[1].stop(signal.SIGKILL)
        with pytest.raises(RuntimeError, match="n1"):
            cluster.formed()
    finally:
        cluster.stop()
