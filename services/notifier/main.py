"""notifier's FastStream app with its HTTP server: `python -m services.notifier --listen HOST:PORT`
or `faststream run services.notifier.main:app` (listen address from `PP_LISTEN`).

Serves the Scheduled Events API to the VMs, turns their approvals and defers into bus events, and
pushes every change to the configured webhooks.

At start the documents come from the KV snapshot, then the events of hosts and rollouts from just
after the snapshot are replayed in order by an ordered consumer of its own (every replica sees
every one of them); the API opens once the replay reached the last of them as it was at start, so
a restarted replica never serves an older document than the one it served before. Two more
ordered consumers, one per subject, read the VM events no other service reads (their pauses and
clocks) only to dead-letter what cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import uvicorn
from faststream import FastStream
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace

from services.notifier.api import build_api
from services.notifier.document import (
    ACCEPTED,
    Change,
    DeferPolicy,
    ReplayedEvent,
    ScheduledEventsDocument,
)
from services.notifier.service import ScheduledEventsService
from services.notifier.settings import NotifierSettings
from services.notifier.snapshots import SnapshotCadence, SnapshotStore, default_part_size
from services.notifier.webhooks import RetryPolicy, WebhookDispatcher
from shared import subjects
from shared.bus import (
    EventPublisher,
    context_of,
    dead_letter,
    events_stream,
    key_value,
    make_app,
    make_broker,
    read_event,
    recorded,
    until_answered,
    wait_for_stream,
)
from shared.contracts import InvalidMessage, utcnow
from shared.logs import setup_logging
from shared.telemetry import setup_telemetry

SERVICE = "notifier"

AUDITED = (subjects.vm_paused(), subjects.vm_clock())
"""The VM events no other service reads (clock-sync reads the resumes, and dead-letters what it
cannot read of them): the notifier reads them, each subject with an ordered consumer of its own,
only to dead-letter what cannot be read."""

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn inside the FastStream app: signals belong to FastStream."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_app(settings: NotifierSettings) -> FastStream:
    """The notifier as a FastStream app serving HTTP on `settings.listen`."""
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    # Its one JetStream consumer, the ordered replay, acknowledges nothing (AckNone).
    broker = make_broker(SERVICE, settings, telemetry, acks=False)
    publisher = EventPublisher(broker)
    policy = DeferPolicy(settings.max_defers, settings.max_defer_s)
    document = ScheduledEventsDocument(policy, settings.extended_retention_s)
    webhooks = WebhookDispatcher(
        settings.webhook_urls,
        policy,
        RetryPolicy(
            settings.webhook_max_attempts,
            settings.webhook_backoff_s,
            settings.webhook_backoff_max_s,
            settings.webhook_timeout_s,
        ),
        settings.webhook_queue_max,
    )
    max_age = timedelta(seconds=settings.webhook_max_age_s)

    def push(changes: list[Change]) -> None:
        # Changes replayed at start that are long past were pushed when they happened.
        horizon = utcnow() - max_age
        for change in changes:
            if change.occurred_at >= horizon:
                webhooks.push(change)

    service = ScheduledEventsService(document, publisher.publish, push)
    cadence = SnapshotCadence(settings.snapshot_every, settings.snapshot_interval_s)
    store: list[SnapshotStore] = []
    saving: set[asyncio.Task[None]] = set()

    async def save_snapshot(snapshot: dict[str, object]) -> None:
        try:
            if await store[0].save(snapshot):
                log.debug("snapshot written at seq %s", snapshot["seq"])
        except Exception:
            log.exception("could not write the snapshot")

    def maybe_snapshot() -> None:
        if not cadence.due(document.seq, document.size, time.monotonic()) or not store or saving:
            return
        document.prune(utcnow())
        snapshot = document.to_json()  # taken now: exactly the state after `seq`
        cadence.taken(document.seq, time.monotonic())
        task = asyncio.create_task(save_snapshot(snapshot))
        saving.add(task)
        task.add_done_callback(saving.discard)

    # The replay: an ordered consumer of this replica's own, so that every replica applies every
    # event in the one stream order. It reads the events of hosts and rollouts only
    # (`subjects.HOST_AND_ROLLOUT_EVENTS`, the documents' `ACCEPTED`), a seventh of the stream in
    # a rollout of 20-VM hosts: what the documents say of each VM comes from its host's events.
    # Every host's heartbeats pass here, so it is read with nats-py directly: FastStream's
    # per-message pipeline (its context, middlewares, a consume span whether or not anything is
    # recorded) cost more than the documents' own work. It starts just after the snapshot
    # (`startup`); when the server loses it (it lives in the server's memory), the missing idle
    # heartbeats (`replay_heartbeat_s`) make nats-py create it again from the next event.
    tracer = telemetry.tracer("pausepatch.notifier")
    replay: list[JetStreamContext.PushSubscription] = []

    async def on_replayed(raw: Msg) -> None:
        """One event, in stream order (nats-py awaits each before handing over the next)."""
        seq = raw.metadata.sequence.stream
        cadence.replayed += 1
        headers = raw.headers or {}
        try:
            if recorded(headers.get("traceparent")):
                with tracer.start_as_current_span(
                    f"{raw.subject} process",
                    context=context_of(raw),
                    kind=trace.SpanKind.CONSUMER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": raw.subject,
                        "messaging.message.id": headers.get("Nats-Msg-Id", ""),
                    },
                ):
                    await apply(raw, seq)
            else:
                await apply(raw, seq)
        except Exception as exc:  # a document bug must not stop the replay: kept, and said
            log.exception("event at stream seq %d not applied", seq)
            service.skip(seq)
            await dead_letter(broker, SERVICE, raw.subject, raw.data, f"not applied: {exc!r}", raw)
        finally:
            maybe_snapshot()

    async def apply(raw: Msg, seq: int) -> None:
        try:
            event = read_event(raw, ACCEPTED, settings.max_message_bytes)
        except InvalidMessage as exc:
            service.skip(seq)
            await dead_letter(broker, SERVICE, raw.subject, raw.data, str(exc), raw)
            return
        if event is None:
            service.skip(seq)  # an event the documents are not made of (a VM's pause, ...)
        else:
            service.apply(event, seq)

    async def on_vm_event(raw: Msg) -> None:
        """One VM event that no other service reads (`AUDITED`): the documents need none, but
        what cannot be read is dead-lettered with its reason, as every consumer of the bus does.
        An event of a known type is passed over unread, as the replay passes over what the
        documents do not take."""
        try:
            read_event(raw, (), settings.max_message_bytes)
        except InvalidMessage as exc:
            await dead_letter(broker, SERVICE, raw.subject, raw.data, str(exc), raw)

    # The same subscription as the AsyncAPI document shows it (a broker of its own, never
    # connected: the replay above is what runs).
    documented = make_broker(SERVICE, settings, telemetry, acks=False)

    def described(subject: str, description: str) -> Any:
        return documented.subscriber(
            subject,
            stream=events_stream(declare=False),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            idle_heartbeat=settings.replay_heartbeat_s,
            title=f"{subject}:notifier",
            description=description,
        )

    @described(
        subjects.HOST_AND_ROLLOUT_EVENTS,
        "The events of hosts and rollouts that make the documents (inventories, maintenance, "
        "each host's blackouts and clock results), replayed in stream order from just after the "
        "snapshot (other events are passed over).",
    )
    async def replayed(event: ReplayedEvent) -> None:
        """See `on_replayed`."""

    for audited in AUDITED:

        @described(
            audited,
            "VM events no other service reads, from just after the snapshot: none is read, what "
            "cannot be read is dead-lettered.",
        )
        async def audit(raw: bytes) -> None:
            """See `on_vm_event`."""

    api = build_api(service, settings.long_poll_max_s)
    host, _, port = settings.listen.rpartition(":")
    server = _Server(
        uvicorn.Config(
            api,
            host=host or "0.0.0.0",
            port=int(port),
            log_level="warning",
            access_log=False,
            http="httptools",
            backlog=4096,
        )
    )
    tasks: list[asyncio.Task[None]] = []
    catch_up: dict[str, int] = {"target": 0}

    app = make_app(
        broker,
        SERVICE,
        "Scheduled Events API for the VMs; turns approvals into bus events.",
        documented=documented,
    )

    @app.on_startup
    async def startup() -> None:
        await broker.connect()
        await wait_for_stream(broker)
        store.append(
            SnapshotStore(
                await key_value(broker, settings.snapshot_bucket, settings.stream_replicas),
                # What one message carries, as this server announced it (parts past it).
                part_size=default_part_size(broker.config.connection_state.connection),
            )
        )
        js = broker.config.connection_state.stream
        # Each step waits for a JetStream that does not answer (a server restarting meanwhile)
        # instead of failing the start.
        info = await until_answered(
            "reading the stream's state", lambda: js.stream_info(subjects.STREAM_NAME)
        )
        try:  # the replay's last event as of now (the stream's last is likely a VM's)
            last = await until_answered(
                "reading the stream's last event of hosts and rollouts",
                lambda: js.get_last_msg(subjects.STREAM_NAME, subjects.HOST_AND_ROLLOUT_EVENTS),
            )
            catch_up["target"] = last.seq or 0
        except NotFoundError:
            catch_up["target"] = 0
        snapshot = await until_answered("reading the snapshot", store[0].load)
        try:
            if snapshot is not None and int(snapshot["seq"]) <= info.state.last_seq:
                document.load(snapshot)
                cadence.seq = document.seq
                log.info("documents loaded from the snapshot at stream seq %d", document.seq)
            elif snapshot is not None:
                log.warning("ignoring a snapshot beyond the stream's end: was it recreated?")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring an unusable snapshot (%s): replaying the whole stream", exc)
            document.reset()
        if document.seq + 1 < info.state.first_seq:
            # With a bound per subject, the oldest events go as soon as newer ones of their
            # subject come (a host's inventory every heartbeat): a gap is what they superseded,
            # unless the snapshot is older than the stream keeps anything.
            per_subject = info.config.max_msgs_per_subject or -1
            log.log(
                logging.INFO if per_subject > 0 else logging.WARNING,
                "the stream starts at seq %d, after the snapshot's %d: events in between were "
                "superseded by later ones of their subject (the stream keeps %s per subject) "
                "or aged out",
                info.state.first_seq,
                document.seq,
                per_subject if per_subject > 0 else "every event",
            )
        # Each from just after the snapshot: the replay, and the VM events read for dead letters.
        for subject, handler in (
            *((audited, on_vm_event) for audited in AUDITED),
            (subjects.HOST_AND_ROLLOUT_EVENTS, on_replayed),
        ):
            replay.append(
                await until_answered(
                    f"creating the ordered consumer of {subject}",
                    lambda subject=subject, handler=handler: js.subscribe(  # type: ignore[misc]
                        subject,
                        stream=subjects.STREAM_NAME,
                        cb=handler,
                        ordered_consumer=True,
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        config=ConsumerConfig(opt_start_seq=document.seq + 1),
                        idle_heartbeat=settings.replay_heartbeat_s,
                    ),
                )
            )

    @app.after_startup
    async def serve() -> None:
        webhooks.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.catch_up_timeout_s
        while document.seq < catch_up["target"] and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if document.seq < catch_up["target"]:
            log.warning(
                "replay not finished after %.0f s (seq %d of %d): serving anyway",
                settings.catch_up_timeout_s,
                document.seq,
                catch_up["target"],
            )
        tasks.append(asyncio.create_task(server.serve(), name="http"))
        log.info(
            "Scheduled Events API on http://%s%s (documents at stream seq %d)",
            settings.listen,
            "/metadata/scheduledevents",
            document.seq,
        )

    @app.on_shutdown
    async def shutdown() -> None:
        for subscription in replay:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.stop()
        await webhooks.stop()
        telemetry.shutdown()

    return app


app = build_app(NotifierSettings())
