"""The event stream stays bounded under a fleet's heartbeats.

Every host-agent publishes its whole inventory every heartbeat; a stream that kept them all grew
by some 30 MB per host and day until the server's store was full, and from then on the server
refused every event, pauses and resumes included. The planner declares the stream with a bound
per subject (`PP_STREAM_MAX_PER_SUBJECT`): here, on a real nats-server whose store is smaller
than what the heartbeats publish, every inventory is still stored, each subject keeps its newest
ones, and the planner knows each host's latest inventory. A stream declared before the bound
existed gets it when the planner starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared import subjects
from shared.bus import DLQ_STREAM_NAME
from shared.client import PlannerClient, connect
from shared.contracts import HostInventory, VMInfo
from shared.devstack import LocalStack
from shared.settings import BusSettings
from tests.support.fleet import wait_hosts, wait_stream

HOSTS = [f"hv-{i:03d}" for i in range(50)]
STORE_MB = 16
ROUNDS = 100  # 50 hosts x 100 rounds x 3.4 KB: 17 MB, more than the store holds
KEPT = BusSettings().stream_max_per_subject


def inventory(host: str) -> HostInventory:
    """A host of 20 VMs, as its agent reports it (a new event id each heartbeat)."""
    return HostInventory(
        host=host,
        hypervisor="Test",
        vms=[
            VMInfo(
                vm=f"{host}-vm-{i:02d}",
                uuid=str(uuid.uuid4()),
                availability_set=f"set-{i % 4}",
                update_domain=i % 5,
                fault_domain=i % 3,
                ip=f"10.1.{i}.{len(host)}",
                state="running",
            )
            for i in range(20)
        ],
    )


async def publish_rounds(js: JetStreamContext, rounds: int) -> dict[str, str]:
    """`rounds` heartbeats of every host, each stored (acknowledged) before the next round;
    returns each host's last event id."""
    last: dict[str, str] = {}
    for _ in range(rounds):
        events = [inventory(h) for h in HOSTS]
        await asyncio.gather(
            *(
                js.publish(
                    e.subject(),
                    e.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": str(e.event_id)},
                )
                for e in events
            )
        )
        last.update({e.host: str(e.event_id) for e in events})
    return last


async def test_heartbeats_never_fill_the_store(workdir: Path) -> None:
    stack = LocalStack(workdir)
    stack.start_nats(config=f"jetstream {{ max_file_store: {STORE_MB}MB }}\n")
    nc = await connect(stack.nats_url)
    js = nc.jetstream()
    try:
        # The stream as a planner declared it before the bound existed, with some history.
        await js.add_stream(
            StreamConfig(
                name=subjects.STREAM_NAME,
                subjects=[subjects.EVENTS_ROOT],
                storage=StorageType.FILE,
                duplicate_window=120,
            )
        )
        await publish_rounds(js, 2 * KEPT)
        before = await js.stream_info(subjects.STREAM_NAME)
        assert before.state.messages == 2 * KEPT * len(HOSTS)

        stack.start_service("planner", "planner")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            info = await js.stream_info(subjects.STREAM_NAME)
            if info.config.max_msgs_per_subject == KEPT and info.state.messages <= KEPT * len(
                HOSTS
            ):
                break
            assert loop.time() < deadline, "the planner did not bound the existing stream"
            await asyncio.sleep(0.1)
        # Trimmed by the planner (nats-server 2.9 only bounds a subject's new events), to the
        # newest of each host.
        assert info.state.messages == KEPT * len(HOSTS)
        assert info.state.first_seq == KEPT * len(HOSTS) + 1

        # More than the server's store can hold: every inventory is stored all the same.
        last = await publish_rounds(js, ROUNDS)
        published_mb = ROUNDS * len(HOSTS) * len(inventory(HOSTS[0]).model_dump_json()) / 1e6
        assert published_mb > STORE_MB
        info = await js.stream_info(subjects.STREAM_NAME)
        assert info.state.messages <= KEPT * len(HOSTS) + 10  # and the planner's own few
        assert info.state.bytes < STORE_MB * 1_000_000 / 4

        # Each host's newest inventory is the one kept last, and the one the planner knows.
        for host in HOSTS:
            stored = await js.get_last_msg(subjects.STREAM_NAME, subjects.host_inventory(host))
            assert json.loads(stored.data or b"{}")["event_id"] == last[host]
        client = PlannerClient(nc)
        await wait_hosts(client, HOSTS)
        deadline = loop.time() + 30
        while True:
            known = {h["host"]: h["event_id"] for h in await client.hosts()}
            if known == last:
                break
            assert loop.time() < deadline, "the planner does not know the latest inventories"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
        stack.stop()


async def test_a_flood_of_bad_input_keeps_the_newest_dead_letters(workdir: Path) -> None:
    """Dead letters are kept up to `PP_DLQ_MAX_MSGS`, the newest: a publisher flooding the bus
    with bad input cannot fill the store (each dead letter holds up to 64 KiB of its message)."""
    bound, sent = 20, 120
    stack = LocalStack(workdir)
    stack.start_nats()
    nc = await connect(stack.nats_url)
    js = nc.jetstream()
    try:
        stack.start_service("planner", "planner", PP_DLQ_MAX_MSGS=str(bound))
        await wait_stream(nc)
        for i in range(sent):  # one host each: the events stream keeps them all
            await js.publish(subjects.host_inventory(f"bad-{i:03d}"), b"not an event %d" % i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            with contextlib.suppress(NotFoundError):
                last = await js.get_last_msg(DLQ_STREAM_NAME, subjects.dead_letter("planner"))
                if json.loads(last.data or b"{}")["subject"] == subjects.host_inventory(
                    f"bad-{sent - 1:03d}"
                ):
                    break
            assert loop.time() < deadline, "the last bad message was never dead-lettered"
            await asyncio.sleep(0.1)
        info = await js.stream_info(DLQ_STREAM_NAME)
        assert info.config.max_msgs == bound
        assert info.state.messages == bound
        first = await js.get_msg(DLQ_STREAM_NAME, info.state.first_seq)
        assert json.loads(first.data or b"{}")["subject"] == subjects.host_inventory(
            f"bad-{sent - bound:03d}"
        )
        # And the planner goes on answering.
        assert await PlannerClient(nc).hosts() == []
    finally:
        await nc.close()
        stack.stop()
