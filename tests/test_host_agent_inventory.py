"""The agent's inventory on the libvirt test driver: published at start, on every change and on
its heartbeat, and not again when a listing finds what was last published (a window over, every
VM running again as before it), which every reader of inventories would parse for nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.host_agent.agent import HostAgent, HostAgentSettings
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor
from shared.bus import EventPublisher, make_broker
from shared.contracts import Event, HostInventory, VMInfo
from shared.devstack import SimVM, sim_node_xml
from shared.telemetry import setup_telemetry
from tests.support.fleet import eventually


class RecordingPublisher(EventPublisher):
    """Keeps the inventories the agent emits (the bus is not what is tested here)."""

    inventories: list[HostInventory]

    def emit(self, event: Event) -> None:
        if isinstance(event, HostInventory):
            self.inventories.append(event)


class CountingHypervisor(LibvirtHypervisor):
    """The test driver, counting the agent's listings of the host."""

    listings = 0

    def list_vms(self) -> tuple[list[VMInfo], list[str]]:
        result = super().list_vms()
        self.listings += 1
        return result


def make_agent(
    tmp_path: Path, heartbeat_s: float
) -> tuple[HostAgent, CountingHypervisor, RecordingPublisher]:
    node = tmp_path / "node.xml"
    node.write_text(sim_node_xml([SimVM(f"vm-{i}") for i in range(3)]))
    hv = CountingHypervisor(f"test://{node}")
    settings = HostAgentSettings(host="h1", state_dir=tmp_path, heartbeat_s=heartbeat_s)
    telemetry = setup_telemetry("host-agent")
    publisher = RecordingPublisher(make_broker("host-agent", settings, telemetry))
    publisher.inventories = []
    return HostAgent(settings, hv, publisher, telemetry), hv, publisher


async def test_a_listing_that_finds_nothing_new_publishes_nothing_and_a_change_does(
    tmp_path: Path,
) -> None:
    agent, hv, publisher = make_agent(tmp_path, heartbeat_s=600)
    task = asyncio.create_task(agent.heartbeat())
    try:
        await eventually(lambda: len(publisher.inventories) == 1, "the first inventory")
        assert {vm.state for vm in publisher.inventories[0].vms} == {"running"}
        # What a window does when it closes: the host is listed again, and nothing changed.
        agent.inventory_changed()
        await eventually(lambda: hv.listings >= 2, "the host listed again")
        # Then a real change. Had the listing above been published, it would be the second
        # inventory, with every VM running.
        hv.connection.lookupByName("vm-1").suspend()
        agent.inventory_changed()
        await eventually(lambda: len(publisher.inventories) >= 2, "the changed inventory")
        states = {vm.vm: vm.state for vm in publisher.inventories[1].vms}
        assert states == {"vm-0": "running", "vm-1": "paused", "vm-2": "running"}
    finally:
        task.cancel()
        await agent.close()


async def test_the_heartbeat_stays_due_after_the_last_inventory_published(
    tmp_path: Path,
) -> None:
    heartbeat_s = 2.0
    agent, hv, publisher = make_agent(tmp_path, heartbeat_s=heartbeat_s)
    task = asyncio.create_task(agent.heartbeat())
    try:
        await eventually(lambda: len(publisher.inventories) == 1, "the first inventory")
        first = time.monotonic()
        # A listing that finds nothing new, halfway to the heartbeat, must not put it off.
        await asyncio.sleep(heartbeat_s / 2)
        agent.inventory_changed()
        await eventually(lambda: hv.listings >= 2, "the host listed again")
        await eventually(lambda: len(publisher.inventories) == 2, "the heartbeat", timeout=10)
        late = time.monotonic() - first
        # The heartbeat, due `heartbeat_s` after the first (not the listing halfway, published;
        # nor a heartbeat put off by it, 1.5 x `heartbeat_s` after the first).
        assert heartbeat_s * 0.9 < late < heartbeat_s * 1.4, late
        assert publisher.inventories[1].vms == publisher.inventories[0].vms
        assert publisher.inventories[1].event_id != publisher.inventories[0].event_id
    finally:
        task.cancel()
        await agent.close()
