"""clock-sync's FastStream app: `faststream run services.clock_sync.main:app` or
`python -m services.clock_sync`.

After every resume, has the VM's host-agent set the guest clock from the host clock, checks the
skew left, retries (JetStream redelivery with a delay, so one slow guest never holds up the
others) and reports `ClockSynced`.

A resume is handled once: the result of a resume has a fixed id (JetStream stores it once within
its two-minute de-duplication window), and an older copy of a resume (a redelivery, a replay) is
looked up in the stream itself: the VM's last `ClockSynced` tells whether its clock was set since.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import PullSub
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from opentelemetry import propagate, trace
from pydantic import ValidationError

from services.clock_sync.batcher import HostBatcher
from services.clock_sync.sync import clock_result, decide, result_id
from shared import subjects
from shared.bus import (
    DUPLICATE_WINDOW_S,
    EventPublisher,
    context_of,
    events_stream,
    make_app,
    make_broker,
    raw_only,
    read_batch,
    wait_for_stream,
)
from shared.contracts import (
    ClockAction,
    ClockReading,
    ClockReadings,
    ClockSynced,
    VMResumed,
    utcnow,
)
from shared.logs import log_context, setup_logging
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

SERVICE = "clock-sync"
RECENT = timedelta(seconds=DUPLICATE_WINDOW_S / 2)

log = logging.getLogger(__name__)


class ClockSyncSettings(BusSettings):
    """clock-sync settings (`PP_CLOCK_RETRY_S`, ...)."""

    clock_retry_s: float = 1.0
    """Wait between attempts while the guest agent does not answer."""
    clock_max_attempts: int = 30
    clock_max_skew_ms: float = 50.0
    """A sync whose verified skew is above this is retried."""
    clock_request_timeout_s: float = 5.0
    clock_in_flight: int = 4096
    """Resumes handled at once by this replica (the next batch is fetched while earlier ones
    wait on their hosts' agents; past this many, fetching waits)."""


def build_app(settings: ClockSyncSettings) -> FastStream:
    """clock-sync as a FastStream app."""
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    broker = make_broker(SERVICE, settings, telemetry)
    publisher = EventPublisher(broker)
    pending: set[asyncio.Future[Any]] = set()
    in_flight = asyncio.Semaphore(settings.clock_in_flight)

    tracer = telemetry.tracer("pausepatch.clock_sync")

    @broker.subscriber(
        subjects.vm_resumed(),
        stream=events_stream(declare=False),
        durable="clock-sync-resumed",
        # Batches: a host's VMs resume together, and are handled (and their clocks set through
        # one request to the host's agent) together; the fetch returns 50 ms after the first.
        pull_sub=PullSub(batch_size=256, timeout=0.05, batch=True),
        decoder=raw_only,
        inbox_prefix=settings.pull_inbox,
        ack_policy=AckPolicy.MANUAL,
        title="pp.evt.vm.*.*.resumed:clock-sync",
        description="Set the clock of every resumed VM.",
    )
    async def on_resumed() -> None:
        items = await read_batch(broker, SERVICE, (VMResumed,), settings.max_message_bytes)
        # The batch is handled in the background: the next one is fetched while this one waits
        # on its hosts' agents and on the stream's acks (each message is acknowledged by itself,
        # once its result is stored). `in_flight` bounds how many wait at once.
        for _ in items:
            await in_flight.acquire()
        task = asyncio.ensure_future(
            asyncio.gather(*(sync_one(event, raw) for event, raw in items))  # type: ignore[arg-type]
        )
        pending.add(task)
        task.add_done_callback(pending.discard)
        task.add_done_callback(lambda _: release(len(items)))

    def release(count: int) -> None:
        for _ in range(count):
            in_flight.release()

    def in_trace(event: VMResumed, raw: Msg) -> AbstractContextManager[object]:
        """The VM's `clock.sync` span, in the trace of its pause. A process that exports no
        traces records none: the pause's own span (as it came, unrecorded) is then made current
        (its result carries it on), without a span made and ended for nothing per VM."""
        context = context_of(raw)
        if telemetry.exporting:
            return tracer.start_as_current_span(f"clock.sync {event.vm}", context=context)
        return trace.use_span(trace.get_current_span(context), end_on_exit=False)

    async def sync_one(event: VMResumed, raw: Msg) -> None:
        """One resumed VM, in the trace of its pause."""
        with (
            in_trace(event, raw),
            log_context(rollout=event.rollout_id, host=event.host, vm=event.vm),
        ):
            try:
                await sync(event, raw)
            except Exception:
                log.exception("clock sync failed; retrying")
                await raw.nak(delay=settings.clock_retry_s)

    async def sync(event: VMResumed, raw: Msg) -> None:
        attempt = raw.metadata.num_delivered or 1
        # A fresh first delivery cannot be a duplicate that JetStream would not catch: its
        # result id is de-duplicated by the stream for two minutes. Only older copies (a
        # replay, a redelivery) are looked up in the stream.
        fresh = attempt == 1 and utcnow() - event.occurred_at < RECENT
        if not fresh and await synced_since(event):
            log.info("resume %s already synced: ignoring the duplicate", event.event_id)
            await raw.ack()
            return
        if not event.ok:
            await publisher.publish(clock_result(event, None, False, 0, "VM was not resumed"))
            await raw.ack()
            return
        reading, failure = await ask_agent(event)
        decision = decide(
            event,
            reading,
            attempt,
            settings.clock_max_attempts,
            settings.clock_retry_s,
            settings.clock_max_skew_ms,
            failure,
        )
        if decision.event is None:
            log.info("clock not set yet (attempt %d): retrying", attempt)
            await raw.nak(delay=decision.retry_in_s)
            return
        await publisher.publish(decision.event)
        await raw.ack()
        # One line per VM: info when something is wrong, debug otherwise (fleets are large).
        log.log(
            logging.DEBUG if decision.event.ok else logging.INFO,
            "clock %s: skew before %s ms, after %s ms",
            "synced" if decision.event.ok else "NOT synced",
            _ms(decision.event.skew_before_ms),
            _ms(decision.event.skew_after_ms),
        )

    async def synced_since(event: VMResumed) -> bool:
        """The VM's last `ClockSynced` in the stream is this resume's result, or came after it
        (a later resume's: setting the clock again for this one would change nothing)."""
        js = broker.config.connection_state.stream
        try:
            last = await js.get_last_msg(
                subjects.STREAM_NAME, subjects.vm_clock(event.host, event.vm)
            )
        except NotFoundError:
            return False
        try:
            body = json.loads(last.data or b"")
            stored = ClockSynced.model_validate(body)
        except (ValueError, ValidationError):
            return False  # not a result we can read: better sync again than never
        return stored.event_id == result_id(event) or stored.occurred_at >= event.occurred_at

    asked = itertools.count(1)

    async def request(host: str, vms: list[str]) -> list[ClockReading]:
        # Straight on the connection, as the events go (`EventPublisher`), with the headers
        # FastStream would set and the current trace context: FastStream's request pipeline
        # (its publish middlewares, a reply subscriber of its own) was a tenth of this
        # service's CPU, once per host and resume.
        headers = {"content-type": "application/json", "correlation_id": f"{host}-{next(asked)}"}
        propagate.inject(headers)
        reply = await broker.config.connection_state.connection.request(
            subjects.host_clock_command(host),
            ClockAction(vms=vms, action="sync").model_dump_json().encode(),
            timeout=settings.clock_request_timeout_s,
            headers=headers,
        )
        return ClockReadings.model_validate_json(reply.data).readings

    batcher = HostBatcher(request)

    async def ask_agent(event: VMResumed) -> tuple[ClockReading | None, str | None]:
        try:
            return await batcher.reading(event.host, event.vm), None
        except (TimeoutError, NoRespondersError) as exc:
            return None, f"host-agent of {event.host} did not answer ({type(exc).__name__})"
        except ValidationError as exc:
            return None, f"unexpected answer from host-agent of {event.host}: {exc}"

    app = make_app(broker, SERVICE, "Sets every resumed guest clock and reports the skew.")

    @app.on_startup
    async def startup() -> None:
        await broker.connect()
        await wait_for_stream(broker)

    @app.on_shutdown
    async def shutdown() -> None:
        # Syncs under way finish (or time out); what is left unacknowledged is redelivered.
        if pending:
            await asyncio.wait(pending, timeout=settings.clock_request_timeout_s)
        await publisher.stop()
        telemetry.shutdown()

    return app


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


app = build_app(ClockSyncSettings())
