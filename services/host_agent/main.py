"""host-agent's FastStream app: `faststream run services.host_agent.main:app` (settings from
`PP_*` env vars) or `python -m services.host_agent --host NAME --libvirt-uri URI`.

One agent process serves one hypervisor host. For simulations at fleet scale (`PP_FLEET_FILE`,
`--fleet FILE`: one `{"host": ..., "libvirt_uri": ...}` JSON object per line) one process may
serve many simulated hosts, each with its own connection, window, journal and subscriptions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import NatsBroker, PullSub

from services.host_agent.agent import HostAgent, HostAgentSettings
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor, dispatch_events_on
from shared import subjects
from shared.bus import (
    EventPublisher,
    current_message,
    events_stream,
    make_app,
    make_broker,
    wait_for_stream,
)
from shared.contracts import ClockAction, MaintenanceStarted, ensure_on_subject
from shared.logs import setup_logging
from shared.telemetry import setup_telemetry

SERVICE = "host-agent"


def hosts_of(settings: HostAgentSettings) -> list[HostAgentSettings]:
    """The host(s) this process serves: `settings` itself, or one per line of the fleet file."""
    if settings.fleet_file is None:
        return [settings]
    hosts = []
    for line in Path(settings.fleet_file).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            hosts.append(
                settings.model_copy(
                    update={"host": entry["host"], "libvirt_uri": entry["libvirt_uri"]}
                )
            )
    return [HostAgentSettings.model_validate(h.model_dump()) for h in hosts]


def subscribe(
    broker: NatsBroker, host: str, agents: dict[str, HostAgent], poll_s: float, inbox: bytes
) -> None:
    """The subscriptions of one host's agent (`inbox`: its pull consumer's delivery prefix)."""

    @broker.subscriber(
        subjects.host_started(host),
        stream=events_stream(declare=False),
        durable=f"host-agent-{host}-started",
        # A long poll: an idle host costs the server one request per `poll_s`.
        pull_sub=PullSub(batch_size=1, timeout=poll_s),
        inbox_prefix=inbox,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title=f"{subjects.host_started('{host}')}:host-agent",
        description="Run the maintenance window of this host.",
    )
    async def on_started(event: MaintenanceStarted) -> None:
        msg = current_message(broker)
        ensure_on_subject(event, msg.raw_message.subject)
        await agents[host].on_started(event)

    @broker.subscriber(
        subjects.host_clock_command(host),
        title=f"{subjects.host_clock_command('{host}')}:host-agent",
        description="Set or read a guest clock (request/reply).",
    )
    async def on_clock(command: ClockAction) -> dict[str, object]:
        return (await agents[host].clock(command)).to_json()


def build_app(settings: HostAgentSettings) -> FastStream:
    """The agent of `settings.host` (or of every host of the fleet file) as a FastStream app."""
    # The GIL changes hands every 0.5 ms while a window is open (`quick_gil_handoff`), at the
    # interpreter's default otherwise.
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    broker = make_broker(SERVICE, settings, telemetry)
    publisher = EventPublisher(broker)
    hosts = hosts_of(settings)
    agents: dict[str, HostAgent] = {}
    for host in hosts:
        subscribe(broker, host.host, agents, host.start_poll_s, host.pull_inbox)

    app = make_app(broker, SERVICE, "Runs the pause window of one host.")

    @app.on_startup
    async def startup() -> None:
        dispatch_events_on(asyncio.get_running_loop())
        for host in hosts:
            hypervisor = LibvirtHypervisor(host.libvirt_uri)
            agent = HostAgent(host, hypervisor, publisher, telemetry)
            hypervisor.watch(agent.inventory_changed)
            agents[host.host] = agent
        # Recovery first, before waiting on the bus: a VM left paused cannot wait for NATS.
        await asyncio.gather(*(agent.recover() for agent in agents.values()))
        await broker.connect()
        await wait_for_stream(broker)

    @app.after_startup
    async def started() -> None:
        for agent in agents.values():
            agent.spawn(agent.heartbeat(), name="heartbeat")

    @app.on_shutdown
    async def shutdown() -> None:
        await asyncio.gather(*(agent.close() for agent in agents.values()))
        await publisher.stop()
        telemetry.shutdown()

    return app


app = build_app(HostAgentSettings())
