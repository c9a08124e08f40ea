"""The agent's clock command on the libvirt test driver: every VM answered, in order, without a
thread per VM (the driver serializes its calls; hundreds of simulated hosts share one process)."""

from __future__ import annotations

import threading
from pathlib import Path

from services.host_agent.agent import HostAgent, HostAgentSettings
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor
from shared.bus import EventPublisher, make_broker
from shared.contracts import ClockAction, ClockReadings
from shared.devstack import SimVM, sim_node_xml
from shared.telemetry import setup_telemetry


async def test_a_clock_command_answers_every_vm_in_order_on_one_thread(tmp_path: Path) -> None:
    node = tmp_path / "node.xml"
    node.write_text(sim_node_xml([SimVM(f"vm-{i}") for i in range(6)]))
    hv = LibvirtHypervisor(f"test://{node}")
    settings = HostAgentSettings(host="h1", state_dir=tmp_path)
    telemetry = setup_telemetry("host-agent")
    publisher = EventPublisher(make_broker("host-agent", settings, telemetry))
    agent = HostAgent(settings, hv, publisher, telemetry)
    try:
        wanted = ["vm-3", "no-such-vm", "vm-0", "vm-5", "vm-1", "vm-2", "vm-4"]
        result = await agent.clock(ClockAction(vms=wanted, action="sync"))
        assert isinstance(result, ClockReadings)
        assert [r.vm for r in result.readings] == wanted
        # The test driver has no guest clock: every reading says so.
        assert all(not r.ok and r.method == "none" and r.error for r in result.readings)
        threads = [t for t in threading.enumerate() if t.name.startswith("agent")]
        assert len(threads) == 1, [t.name for t in threads]
    finally:
        await agent.close()
