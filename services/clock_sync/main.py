"""clock-sync's FastStream app: `faststream run services.clock_sync.main:app` or
`python -m services.clock_sync`.

After every resume, has the VM's host-agent set the guest clock from the host clock, checks the
skew left, retries (JetStream redelivery with a delay, so one slow guest never holds up the
others) and reports `ClockSynced`; the results of a host's VMs handled together are reported once
more, at once, in one `HostClockSynced` (what the planner reads: one event per host, not per VM).

A resume is handled once: the result of a resume has a fixed id (JetStream stores it once within
its two-minute de-duplication window), and any other copy of a resume than the agent's own first
delivery (a redelivery, an older copy, a replay stored under another message id) is looked up in
the stream itself: the VM's last `ClockSynced` tells whether its clock was set since.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import PullSub
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import ValidationError

from services.clock_sync.batcher import HostBatcher
from services.clock_sync.sync import clock_result, decide, result_id
from shared import liveness, subjects
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
    HostClockSynced,
    VMClock,
    VMResumed,
    utcnow,
)
from shared.logs import log_context, setup_logging
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

SERVICE = "clock-sync"
RECENT = timedelta(seconds=DUPLICATE_WINDOW_S / 2)
HOST_RESULT = uuid.UUID("5f0c2a52-7d1e-4c55-9a1b-6a3c1f0d2e11")
"""Namespace of a `HostClockSynced`'s id (made of its VMs' result ids)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Synced:
    """A VM's result, and the publish storing it (None: it is in the stream already)."""

    result: ClockSynced
    storing: asyncio.Future[None] | None


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
    state: dict[str, asyncio.Future[Any]] = {}
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
        # on its hosts' agents and on the stream's acks (each message is acknowledged once its
        # result and its host's are stored). `in_flight` bounds how many wait at once.
        # Never more than the bound itself: a batch larger than it (a small
        # `PP_CLOCK_IN_FLIGHT`, or a fetch that brought more than its batch) would wait for
        # permits only its own completion gives back, for ever, and this replica with it.
        held = min(len(items), settings.clock_in_flight)
        for _ in range(held):
            await in_flight.acquire()
        hosts: dict[tuple[str, str | None], list[tuple[VMResumed, Msg]]] = {}
        for event, raw in items:
            assert isinstance(event, VMResumed)
            hosts.setdefault((event.host, event.rollout_id), []).append((event, raw))
        task = asyncio.ensure_future(asyncio.gather(*(sync_host(g) for g in hosts.values())))
        pending.add(task)
        task.add_done_callback(pending.discard)
        task.add_done_callback(lambda _: release(held))

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

    async def sync_host(group: list[tuple[VMResumed, Msg]]) -> None:
        """The resumes of one host in a batch: each VM's `ClockSynced` and one `HostClockSynced`
        with them all, stored together; then each resume is acknowledged (a crash in between
        redelivers them, and their host's result goes out again)."""
        fresh: list[tuple[VMResumed, Msg]] = []
        others: list[tuple[VMResumed, Msg]] = []
        for event, raw in group:
            (fresh if event.ok and first_delivery(event, raw) else others).append((event, raw))
        # The others each in a task of its own, meanwhile.
        others_synced = (
            asyncio.gather(*(sync_one(event, raw) for event, raw in others)) if others else None
        )
        synced = await sync_fresh(fresh)
        if others_synced is not None:
            synced += await others_synced
        done = [
            (raw, s) for (_, raw), s in zip(fresh + others, synced, strict=True) if s is not None
        ]
        if not done:
            return
        first, first_raw = group[0]
        with (
            trace.use_span(trace.get_current_span(context_of(first_raw)), end_on_exit=False),
            log_context(rollout=first.rollout_id, host=first.host),
        ):
            stored = await asyncio.gather(
                publisher.publish(host_result(first.host, first.rollout_id, [s for _, s in done])),
                *(s.storing for _, s in done if s.storing is not None),
                return_exceptions=True,
            )
            failed = [e for e in stored if isinstance(e, BaseException)]
            if failed:
                log.error("clock results not stored (%r): retrying", failed[0])
                for raw, _ in done:
                    await raw.nak(delay=settings.clock_retry_s)
                return
        for raw, _ in done:
            await raw.ack()

    def host_result(host: str, rollout_id: str | None, done: list[Synced]) -> HostClockSynced:
        # The same results make the same event: published again (a redelivery, another
        # replica), JetStream stores it once.
        ids = ",".join(sorted(str(s.result.event_id) for s in done))
        return HostClockSynced(
            event_id=uuid.uuid5(HOST_RESULT, ids),
            host=host,
            rollout_id=rollout_id,
            clocks={s.result.vm: VMClock.of(s.result) for s in done},
        )

    def first_delivery(event: VMResumed, raw: Msg) -> bool:
        """A fresh first delivery of the agent's own message (its message id is the event's id)
        cannot be a duplicate: its result id is de-duplicated by the stream for two minutes.
        Anything else (an older copy, a redelivery, a copy stored under another message id: a
        replay) is looked up in the stream (`sync`): a copy set apart by nothing but its message
        id would otherwise have its host's result sent again, in another grouping, under another
        id, and stored."""
        return (
            (raw.metadata.num_delivered or 1) == 1
            and utcnow() - event.occurred_at < RECENT
            and (raw.headers or {}).get("Nats-Msg-Id") == str(event.event_id)
        )

    async def sync_fresh(group: list[tuple[VMResumed, Msg]]) -> list[Synced | None]:
        """The first deliveries of a host's resumes (the usual case): one request for all of
        their clocks, each VM's result in the trace of its pause; no task per VM."""
        if not group:
            return []
        host = group[0][0].host
        spans = (
            [
                tracer.start_span(f"clock.sync {event.vm}", context=context_of(raw))
                for event, raw in group
            ]
            if telemetry.exporting
            else None
        )
        answers = await asyncio.gather(
            *batcher.asked(host, [event.vm for event, _ in group]), return_exceptions=True
        )
        results: list[Synced | None] = []
        contexts: dict[str | None, otel_context.Context] = {}
        for n, ((event, raw), answer) in enumerate(zip(group, answers, strict=True)):
            if spans is not None:
                context = trace.set_span_in_context(spans[n])
            else:  # the VMs of a window share its trace context: extracted once
                traceparent = (raw.headers or {}).get("traceparent")
                if traceparent not in contexts:
                    contexts[traceparent] = context_of(raw)
                context = contexts[traceparent]
            try:
                reading, failure = agent_answer(host, answer)
                results.append(await decided(event, raw, 1, reading, failure, context))
            except Exception:
                with log_context(rollout=event.rollout_id, host=event.host, vm=event.vm):
                    log.exception("clock sync failed; retrying")
                await raw.nak(delay=settings.clock_retry_s)
                results.append(None)
            finally:
                if spans is not None:
                    spans[n].end()
        return results

    async def sync_one(event: VMResumed, raw: Msg) -> Synced | None:
        """One resumed VM, in the trace of its pause: its result (being stored), acknowledged
        with its host's; None once it is handled otherwise (retried later, or acknowledged)."""
        with (
            in_trace(event, raw),
            log_context(rollout=event.rollout_id, host=event.host, vm=event.vm),
        ):
            try:
                return await sync(event, raw)
            except Exception:
                log.exception("clock sync failed; retrying")
                await raw.nak(delay=settings.clock_retry_s)
                return None

    async def sync(event: VMResumed, raw: Msg) -> Synced | None:
        """The VM's result (being stored, or already in the stream), or None: handled."""
        attempt = raw.metadata.num_delivered or 1
        if not first_delivery(event, raw):
            stored = await synced_since(event)
            if stored is not None:
                log.info("resume %s already synced: ignoring the duplicate", event.event_id)
                if attempt > 1 and stored.event_id == result_id(event):
                    # Delivered again, not replayed: this replica (or another) stored the VM's
                    # result and may have stopped before its host's; that one goes out again.
                    return Synced(stored, None)
                await raw.ack()
                return None
        if not event.ok:
            result = clock_result(event, None, False, 0, "VM was not resumed")
            return Synced(result, publisher.storing(result))
        reading, failure = await ask_agent(event)
        return await decided(event, raw, attempt, reading, failure, None)

    async def decided(
        event: VMResumed,
        raw: Msg,
        attempt: int,
        reading: ClockReading | None,
        failure: str | None,
        context: otel_context.Context | None,
    ) -> Synced | None:
        """The agent's answer (or why there is none) made a result, queued in trace `context`
        (by default the current one); None when retried later."""
        decision = decide(
            event,
            reading,
            attempt,
            settings.clock_max_attempts,
            settings.clock_retry_s,
            settings.clock_max_skew_ms,
            failure,
        )
        result = decision.event
        # One line per VM: info when something is wrong, debug otherwise (fleets are large).
        level = logging.INFO if result is None or not result.ok else logging.DEBUG
        if log.isEnabledFor(level):
            # In the resume's trace (its id on the line), when it is not current already.
            with (
                trace.use_span(trace.get_current_span(context), end_on_exit=False)
                if context is not None
                else nullcontext(),
                log_context(rollout=event.rollout_id, host=event.host, vm=event.vm),
            ):
                if result is None:
                    log.info("clock not set yet (attempt %d): retrying", attempt)
                else:
                    log.log(
                        level,
                        "clock %s: skew before %s ms, after %s ms",
                        "synced" if result.ok else "NOT synced",
                        _ms(result.skew_before_ms),
                        _ms(result.skew_after_ms),
                    )
        if result is None:
            await raw.nak(delay=decision.retry_in_s)
            return None
        return Synced(result, publisher.storing(result, context))

    async def synced_since(event: VMResumed) -> ClockSynced | None:
        """The VM's last `ClockSynced` in the stream, when it is this resume's result or came
        after it (a later resume's: setting the clock again for this one would change nothing)."""
        js = broker.config.connection_state.stream
        try:
            last = await js.get_last_msg(
                subjects.STREAM_NAME, subjects.vm_clock(event.host, event.vm)
            )
        except NotFoundError:
            return None
        try:
            body = json.loads(last.data or b"")
            stored = ClockSynced.model_validate(body)
        except (ValueError, ValidationError):
            return None  # not a result we can read: better sync again than never
        if stored.event_id == result_id(event) or stored.occurred_at >= event.occurred_at:
            return stored
        return None

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
            answer: ClockReading | BaseException = await batcher.reading(event.host, event.vm)
        except Exception as exc:  # noqa: BLE001 - said by agent_answer, or raised again
            answer = exc
        return agent_answer(event.host, answer)

    def agent_answer(
        host: str, answer: ClockReading | BaseException
    ) -> tuple[ClockReading | None, str | None]:
        """The agent's reading, or why there is none (anything else is raised)."""
        if isinstance(answer, TimeoutError | NoRespondersError):
            return None, f"host-agent of {host} did not answer ({type(answer).__name__})"
        if isinstance(answer, ValidationError):
            return None, f"unexpected answer from host-agent of {host}: {answer}"
        if isinstance(answer, BaseException):
            raise answer
        return answer, None

    app = make_app(broker, SERVICE, "Sets every resumed guest clock and reports the skew.")

    @app.on_startup
    async def startup() -> None:
        await broker.connect()
        await wait_for_stream(broker)

    @app.after_startup
    async def started() -> None:
        # This replica's own liveness, for its health check: the consumer it shares with the
        # other replicas looks served as long as any of them pulls (`shared.liveness`).
        state["liveness"] = asyncio.ensure_future(liveness.keep(settings.state_dir, SERVICE))

    @app.on_shutdown
    async def shutdown() -> None:
        if "liveness" in state:
            state["liveness"].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state["liveness"]
        # Syncs under way finish (or time out); what is left unacknowledged is redelivered.
        if pending:
            await asyncio.wait(pending, timeout=settings.clock_request_timeout_s)
        await publisher.stop()
        telemetry.shutdown()

    return app


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


app = build_app(ClockSyncSettings())
