"""Bad input never stops a service: it is dead-lettered with its reason, and work goes on."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from nats.js.api import DeliverPolicy

from shared.client import EventWatcher, PlannerClient
from shared.contracts import RolloutStatus
from shared.devstack import LocalStack, free_port
from tests.support.fleet import ready, sim_vms, start_core

GARBAGE = b"\x00\xffnot json"
WRONG_TYPE = json.dumps(
    {"type": "VMPaused", "host": "h1", "vm": "a", "paused_at": "yesterday"}
).encode()
UNKNOWN_TYPE = json.dumps({"type": "VMExploded", "host": "h1", "vm": "a"}).encode()
# A VMPaused in all but its own word for it: no "type" (the model's default must not stand in).
TYPELESS = json.dumps({"host": "h1", "vm": "a", "paused_at": "2026-01-01T00:00:00Z"}).encode()
# Valid JSON, larger than any message of the contract may be (PP_MAX_MESSAGE_BYTES, 512 KiB).
OVERSIZED = json.dumps({"type": "HostInventory", "host": "h1", "pad": "x" * 600_000}).encode()

# (subject, services that consume it)
SUBSCRIBED = [
    ("pp.evt.host.h1.inventory", {"planner", "notifier"}),
    ("pp.evt.host.h1.planned", {"notifier"}),
    ("pp.evt.host.h1.approved", {"planner"}),
    ("pp.evt.host.h1.deferred", {"planner"}),
    ("pp.evt.host.h1.started", {"host-agent", "notifier"}),
    ("pp.evt.host.h1.cancelled", {"notifier"}),
    ("pp.evt.host.h1.paused", {"planner"}),
    ("pp.evt.host.h1.patched", {"planner"}),
    ("pp.evt.host.h1.completed", {"planner", "notifier"}),
    # The notifier reads the VM events no other service reads, for dead letters only.
    ("pp.evt.vm.h1.a.paused", {"notifier"}),
    ("pp.evt.vm.h1.a.resumed", {"clock-sync"}),
    ("pp.evt.vm.h1.a.clock", {"notifier"}),
    ("pp.evt.host.h1.clock", {"planner"}),
]
COMMANDS = [
    "pp.cmd.rollout.submit",
    "pp.cmd.rollout.plan",
    "pp.cmd.rollout.get",
    "pp.cmd.rollout.halt",
    "pp.cmd.rollout.resume",
    "pp.cmd.rollout.abort",
    "pp.cmd.host.h1.clock",
]


async def test_malformed_messages_are_dead_lettered_and_services_keep_working(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack)
    stack.add_sim_host("h1", sim_vms([("a", "web", 0), ("b", "web", 0)]))
    await ready(stack, client, watcher, ["h1"])
    nc = client.nc
    js = nc.jetstream()

    dead: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        dead.append(json.loads(msg.data))

    await js.subscribe(
        "pp.dlq.>",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=collect,
    )
    for subject, _ in SUBSCRIBED:
        for body in (GARBAGE, WRONG_TYPE, UNKNOWN_TYPE, OVERSIZED):
            await js.publish(subject, body)
    await js.publish("pp.evt.host.h1.paused", TYPELESS)

    # Commands answer a structured error at once, and are dead-lettered too.
    for subject in COMMANDS:
        reply = await nc.request(subject, GARBAGE, timeout=5)
        body = json.loads(reply.data)
        assert body["error"] == "invalid-request" and body["detail"], (subject, body)

    expected = (
        {(service, subject) for subject, services in SUBSCRIBED for service in services}
        | {("planner", s) for s in COMMANDS if "rollout" in s}
        | {("host-agent", "pp.cmd.host.h1.clock")}
    )

    oversized_by = {"planner", "notifier", "clock-sync", "host-agent"}

    def typeless() -> list[dict[str, Any]]:
        return [d for d in dead if base64.b64decode(d["original_b64"]) == TYPELESS]

    async def all_dead_lettered() -> None:
        while not (
            expected <= {(d["service"], d["subject"]) for d in dead}
            and oversized_by <= {d["service"] for d in dead if "oversized" in d["reason"]}
            and len(typeless()) == 2
        ):
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(all_dead_lettered(), 30)
    except TimeoutError:
        missing = expected - {(d["service"], d["subject"]) for d in dead}
        raise AssertionError(f"never dead-lettered: {sorted(missing)}") from None
    assert sorted((d["service"], d["reason"]) for d in typeless()) == [
        ("notifier", "unknown event type None"),
        ("planner", "unknown event type None"),
    ]
    garbage = [d for d in dead if base64.b64decode(d["original_b64"]) == GARBAGE]
    assert garbage and all(d["reason"] for d in dead)
    reasons = " ".join(d["reason"] for d in dead)
    assert "oversized" in reasons and "VMExploded" in reasons
    oversized = [d for d in dead if "oversized" in d["reason"]]
    assert all(d["truncated"] and d["size"] == len(OVERSIZED) for d in oversized)
    assert {d["service"] for d in oversized} >= oversized_by

    # Every service still works: a rollout goes through.
    rollout = await client.submit(
        {"update_id": "after-garbage", "patch": {"duration_s": 0.05}, "notice_s": 0}
    )
    done = await watcher.wait_for(
        lambda w: [
            e
            for e in w.events(RolloutStatus, rollout_id=rollout["rollout_id"])
            if e.state == "completed"
        ],
        60,
        "the rollout after the garbage",
    )
    assert done[0].hosts_ok == 1 and done[0].hosts_failed == 0


async def test_a_message_every_replica_reads_is_dead_lettered_once(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """Each notifier replica reads every event: an unreadable one is found by each, and stored
    once in the dead letters (its id is the service, stream and sequence), with where it is."""
    client, watcher = bus
    start_core(stack, notifier=False)
    stack.add_sim_host("h1", sim_vms([("a", "web", 0)]))
    await ready(stack, client, watcher, ["h1"])
    replicas = ("notifier-a", "notifier-b")
    for name in replicas:
        stack.start_service(name, "notifier", ["--listen", f"127.0.0.1:{free_port()}"])
    js = client.nc.jetstream()
    bad = {"pp.evt.vm.h1.a.paused": GARBAGE, "pp.evt.host.h1.planned": UNKNOWN_TYPE}
    stored = {subject: (await js.publish(subject, body)).seq for subject, body in bad.items()}

    def said(name: str, subject: str) -> str | None:
        for line in stack.services[name].log_tail(400).splitlines():
            if subject in line and "dead-lettered" in line:
                return "already" if "already" in line else "stored"
        return None

    async def both_replicas_done() -> None:
        while not all(said(name, subject) for name in replicas for subject in bad):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(both_replicas_done(), 60)
    for subject in bad:
        # One replica stored it, the other was told it was there already.
        assert sorted(str(said(name, subject)) for name in replicas) == ["already", "stored"]
    letters: list[dict[str, Any]] = []
    sub = await js.subscribe(
        "pp.dlq.notifier", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    info = await js.stream_info("PAUSEPATCH_DLQ")
    for _ in range(info.state.messages):
        msg = await sub.next_msg(timeout=10)
        letters.append(json.loads(msg.data))
        assert msg.headers and msg.headers["Nats-Msg-Id"].startswith("dlq.notifier.PAUSEPATCH.")
    await sub.unsubscribe()
    by_subject = {d["subject"]: d for d in letters}
    assert sorted(d["subject"] for d in letters) == sorted(bad)
    for subject, seq in stored.items():
        letter = by_subject[subject]
        assert (letter["stream"], letter["stream_seq"]) == ("PAUSEPATCH", seq)
        assert base64.b64decode(letter["original_b64"]) == bad[subject]
