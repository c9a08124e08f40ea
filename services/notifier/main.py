"""notifier's FastStream app with its HTTP server: `python -m services.notifier --listen HOST:PORT`
or `faststream run services.notifier.main:app` (listen address from `PP_LISTEN`).

Serves the Scheduled Events API to the VMs and turns their approvals into bus events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import uvicorn
from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import DeliverPolicy, NatsMessage

from services.notifier.api import build_api
from services.notifier.document import ScheduledEvent, ScheduledEventsDocument
from shared.bus import EventPublisher, events_stream, make_app, make_broker, wait_for_stream
from shared.contracts import (
    HostInventory,
    MaintenanceApproved,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenancePlanned,
    MaintenanceStarted,
    parse_event,
)
from shared.logs import setup_logging
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

SERVICE = "notifier"

log = logging.getLogger(__name__)

ACCEPTED = (
    HostInventory,
    MaintenancePlanned,
    MaintenanceStarted,
    MaintenanceCompleted,
    MaintenanceCancelled,
)


class NotifierSettings(BusSettings):
    """notifier settings (`PP_LISTEN`, ...)."""

    listen: str = "127.0.0.1:8080"
    """HOST:PORT of the Scheduled Events API (the VMs reach it as 169.254.169.254:80)."""


class _Server(uvicorn.Server):
    """uvicorn inside the FastStream app: signals belong to FastStream."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_app(settings: NotifierSettings) -> FastStream:
    """The notifier as a FastStream app serving HTTP on `settings.listen`."""
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    broker = make_broker(SERVICE, settings, telemetry)
    publisher = EventPublisher(broker)
    document = ScheduledEventsDocument()

    async def approve(event: ScheduledEvent, vm: str) -> None:
        await publisher.publish(
            MaintenanceApproved(
                host=event.host,
                rollout_id=event.rollout_id,
                scheduled_event_id=event.event_id,
                vm=vm,
            )
        )
        log.info("event %s approved by %s", event.event_id, vm)

    # The whole host event history, in stream order, rebuilds the documents at start; every
    # replica replays the same sequence and so serves the same document and incarnation.
    @broker.subscriber(
        "pp.evt.host.>",
        stream=events_stream(declare=False),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.ACK_FIRST,
        title="pp.evt.host.>:notifier",
        description="Inventory and maintenance events that make up the documents.",
    )
    async def on_host_event(body: dict[str, Any], msg: NatsMessage) -> None:
        event = parse_event(body, ACCEPTED, msg.raw_message.subject)
        if isinstance(event, HostInventory):
            document.on_inventory(event)
        elif isinstance(event, MaintenancePlanned):
            document.on_planned(event)
        elif isinstance(event, MaintenanceStarted):
            document.on_started(event)
        elif isinstance(event, MaintenanceCompleted):
            document.on_completed(event)
        elif isinstance(event, MaintenanceCancelled):
            document.on_cancelled(event)

    api = build_api(document, approve)
    host, _, port = settings.listen.rpartition(":")
    server = _Server(
        uvicorn.Config(
            api, host=host or "0.0.0.0", port=int(port), log_level="warning", access_log=False
        )
    )
    tasks: list[asyncio.Task[None]] = []

    app = make_app(
        broker, SERVICE, "Scheduled Events API for the VMs; turns approvals into bus events."
    )

    @app.on_startup
    async def startup() -> None:
        await broker.connect()
        await wait_for_stream(broker)

    @app.after_startup
    async def serve() -> None:
        tasks.append(asyncio.create_task(server.serve(), name="http"))
        log.info(
            "Scheduled Events API on http://%s%s", settings.listen, "/metadata/scheduledevents"
        )

    @app.on_shutdown
    async def shutdown() -> None:
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.stop()
        telemetry.shutdown()

    return app


app = build_app(NotifierSettings())
