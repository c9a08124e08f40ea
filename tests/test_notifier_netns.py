"""An unchanged Azure-style handler, at the address it hard-codes: the notifier listens on
169.254.169.254:80 inside a network namespace of the test's own, the handler runs in a guest
namespace with the VMs' addresses on a veth pair, and its approval starts the rollout early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from shared.client import EventWatcher, PlannerClient
from shared.contracts import (
    HostInventory,
    MaintenanceApproved,
    MaintenancePlanned,
    MaintenanceStarted,
    RolloutStatus,
)
from shared.devstack import REPO, LocalStack, SimVM
from tests.support.fleet import ready, start_core
from tests.support.netns import (
    METADATA_ADDRESS,
    MetadataNetwork,
    NamespacedProcess,
    NatsBridge,
    available,
)

pytestmark = pytest.mark.netns

HANDLER = REPO / "deploy" / "notifier" / "scheduled_events_handler.py"
VMS = [
    SimVM("web-1", "web", 0, 0, ip="192.0.2.11"),
    SimVM("db-1", "db", 0, 0, ip="192.0.2.12"),
]


@pytest.fixture
async def network() -> AsyncIterator[MetadataNetwork]:
    why = available()
    if why is not None:
        pytest.skip(why)
    net = MetadataNetwork([vm.ip or "" for vm in VMS]).create()
    yield net
    net.delete()


async def wait_log(process: NamespacedProcess, text: str, timeout: float) -> str:
    """Until `text` is in the process's log."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in (log := process.log_text()):
        if loop.time() > deadline or not process.running:
            raise TimeoutError(f"{process.name} never logged {text!r}:\n{log[-2000:]}")
        await asyncio.sleep(0.1)
    return log


async def test_azure_style_handler_at_169_254_169_254_approves_and_starts_the_rollout_early(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher], network: MetadataNetwork
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    stack.add_sim_host("h1", VMS)
    await ready(stack, client, watcher, ["h1"])
    await watcher.wait_for(lambda w: w.events(HostInventory, host="h1"), 20, "the inventory")
    bridge = await NatsBridge(network.host, stack.nats.port if stack.nats else 0).start()
    notifier = NamespacedProcess(
        "notifier",
        "notifier",
        ["--listen", f"{METADATA_ADDRESS}:80"],
        # The OTLP receiver is on the root namespace's loopback, out of reach: no telemetry.
        stack.env(PP_NATS_URL=f"nats://127.0.0.1:{bridge.port}", OTEL_SDK_DISABLED="true"),
        stack.workdir / "logs" / "notifier.log",
        namespace=network.host,
    ).start()
    stack.services["notifier"] = notifier
    handler = NamespacedProcess(
        "handler",
        str(HANDLER),
        ["--vm", "web-1"],
        stack.env(),
        stack.workdir / "logs" / "handler.log",
        namespace=network.guest,
        script=True,
    ).start()
    stack.services["handler"] = handler
    try:
        await wait_log(notifier, "Scheduled Events API on", 60)
        await wait_log(handler, "DocumentIncarnation 0: 0 event(s)", 30)
        rollout = await client.submit(
            {
                "update_id": "imds",
                # Started lasts a few of the handler's once-a-second polls.
                "patch": {"duration_s": 3},
                "notice_s": 900,
                "expected_pause_s": 3,
                "pause_budget_s": 10,
            }
        )
        rid = rollout["rollout_id"]
        (planned,) = await watcher.wait_for(
            lambda w: w.events(MaintenancePlanned, rollout_id=rid), 20, "the notice"
        )
        (approval,) = await watcher.wait_for(
            lambda w: w.events(MaintenanceApproved, rollout_id=rid), 30, "the handler's approval"
        )
        assert approval.vm == "web-1" and approval.scheduled_event_id == planned.scheduled_event_id
        (start,) = await watcher.wait_for(
            lambda w: w.events(MaintenanceStarted, rollout_id=rid), 30, "the early start"
        )
        assert start.occurred_at < planned.not_before - timedelta(minutes=10)
        await watcher.wait_for(
            lambda w: [
                e for e in w.events(RolloutStatus, rollout_id=rid) if e.state == "completed"
            ],
            60,
            "the rollout",
        )
        event_id = str(planned.scheduled_event_id)
        log = await wait_log(handler, f"Started {event_id} (Freeze)", 30)
        assert f"approved {event_id} (HTTP 200)" in log
        log = await wait_log(handler, "DocumentIncarnation 3: 0 event(s)", 30)
        # Between changes the handler polled every second and got 304s.
        assert any(
            int(line.split(", ")[1].split()[0]) > 0
            for line in log.splitlines()
            if "answered 304" in line
        )
    finally:
        handler.kill()
        # The bridge runs on this event loop: keep it serving while the notifier drains.
        await asyncio.to_thread(notifier.stop)
        await bridge.stop()
