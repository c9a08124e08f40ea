"""host-agent's FastStream app: `faststream run services.host_agent.main:app` (settings from
`PP_*` env vars) or `python -m services.host_agent --host NAME --libvirt-uri URI`."""

from __future__ import annotations

import asyncio
import sys

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import NatsMessage, PullSub

from services.host_agent.agent import HostAgent, HostAgentSettings
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor, dispatch_events_on
from shared import subjects
from shared.bus import EventPublisher, events_stream, make_app, make_broker, wait_for_stream
from shared.contracts import ClockAction, MaintenanceStarted, ensure_on_subject
from shared.logs import setup_logging
from shared.telemetry import setup_telemetry

SERVICE = "host-agent"


def build_app(settings: HostAgentSettings) -> FastStream:
    """The agent of `settings.host` as a FastStream app."""
    # The window's thread must get the GIL back within a millisecond when the patch ends, even
    # while the event loop thread is busy publishing (the default switch interval is 5 ms).
    sys.setswitchinterval(0.0005)
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    broker = make_broker(SERVICE, settings, telemetry)
    publisher = EventPublisher(broker)
    host = settings.host
    state: dict[str, HostAgent] = {}

    @broker.subscriber(
        subjects.host_started(host),
        stream=events_stream(declare=False),
        durable=f"host-agent-{host}-started",
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title=f"{subjects.host_started('{host}')}:host-agent",
        description="Run the maintenance window of this host.",
    )
    async def on_started(event: MaintenanceStarted, msg: NatsMessage) -> None:
        ensure_on_subject(event, msg.raw_message.subject)
        await state["agent"].on_started(event)

    @broker.subscriber(
        subjects.host_clock_command(host),
        title=f"{subjects.host_clock_command('{host}')}:host-agent",
        description="Set or read a guest clock (request/reply).",
    )
    async def on_clock(command: ClockAction) -> dict[str, object]:
        return (await state["agent"].clock(command)).to_json()

    app = make_app(broker, SERVICE, "Runs the pause window of one host.")

    @app.on_startup
    async def startup() -> None:
        dispatch_events_on(asyncio.get_running_loop())
        hypervisor = LibvirtHypervisor(settings.libvirt_uri)
        agent = HostAgent(settings, hypervisor, publisher, telemetry)
        hypervisor.watch(agent.inventory_changed)
        state["agent"] = agent
        # Recovery first, before waiting on the bus: a VM left paused cannot wait for NATS.
        await agent.recover()
        await broker.connect()
        await wait_for_stream(broker)

    @app.after_startup
    async def started() -> None:
        agent = state["agent"]
        agent.spawn(agent.heartbeat(), name="heartbeat")

    @app.on_shutdown
    async def shutdown() -> None:
        if "agent" in state:
            await state["agent"].close()
        await publisher.stop()
        telemetry.shutdown()

    return app


app = build_app(HostAgentSettings())
