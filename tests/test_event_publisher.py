"""The event publisher on a real nats-server: what it cannot store yet it keeps and sends again,
in order and with the same ids, and each event is stored once, with the headers FastStream sets."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import pytest
from nats.aio.msg import Msg
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import NonRecordingSpan, SpanContext

from services.host_agent.agent import HostAgentSettings
from shared import subjects
from shared.bus import EventPublisher, declare_streams, make_broker
from shared.client import connect
from shared.contracts import VMResumed, utcnow
from shared.devstack import NatsServer
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

EVENTS = 300
"""More than one window of the publisher (256 by default)."""


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if "failed" in r.getMessage() and "retrying" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("window", "depth"),
    [(256, 4), (16, 8)],
    ids=["default-windows", "many-small-windows-in-flight"],
)
async def test_events_emitted_before_the_stream_exists_are_stored_once_in_order(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, window: int, depth: int
) -> None:
    """Several windows are in flight when they fail: what failed is sent again, in the order
    emitted, before anything emitted later is written (even once the stream exists)."""
    caplog.set_level(logging.WARNING, logger="shared.bus")
    broker = make_broker("host-agent", BusSettings(nats_url=nats_server.url), setup_telemetry("t"))
    await broker.connect()
    publisher = EventPublisher(broker, retry_s=0.5, ack_timeout_s=2.0, window=window, depth=depth)
    now = utcnow()
    events = [
        VMResumed(
            host="h1",
            vm=f"vm-{i:03d}",
            rollout_id="r1",
            paused_at=now,
            resumed_at=now + timedelta(milliseconds=100),
            paused_ms=100.0,
            budget_ms=30_000,
            forced=False,
            ok=True,
        )
        for i in range(EVENTS)
    ]
    nc = await connect(nats_server.url)
    try:
        first, later = events[: EVENTS - 40], events[EVENTS - 40 :]
        for event in first:
            publisher.emit(event)
        # Nothing can be stored yet (no stream): the events are refused, kept and sent again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(refusals(caplog)) < 2:
            assert loop.time() < deadline, "the publisher never said it was refused"
            await asyncio.sleep(0.05)
        assert publisher.published == 0
        # The stream appears while the refused ones wait to be sent again, and more events come:
        # they go after the refused ones, not before.
        await declare_streams(broker)
        for event in later:
            publisher.emit(event)
        assert await publisher.drain(timeout=20), f"{publisher.published} of {EVENTS} stored"
        assert publisher.published == EVENTS

        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM_NAME)
        assert info.state.messages == EVENTS  # each once
        sub = await js.pull_subscribe(subjects.vm_resumed(), durable=None)
        stored: list[Msg] = []
        while len(stored) < EVENTS:
            stored.extend(await sub.fetch(100, timeout=5))
        ids = [json.loads(m.data)["event_id"] for m in stored]
        assert ids == [str(e.event_id) for e in events]  # in the order emitted
        for msg, event in zip(stored, events, strict=True):
            assert msg.subject == event.subject()
            assert msg.headers is not None
            assert msg.headers["Nats-Msg-Id"] == str(event.event_id)
            assert msg.headers["correlation_id"] == str(event.event_id)
            assert msg.headers["content-type"] == "application/json"
            assert VMResumed.model_validate_json(msg.data) == event
    finally:
        await publisher.stop()
        await nc.close()
        await broker.stop()


async def test_jetstream_requests_wait_as_long_as_the_settings_say(nats_server: NatsServer) -> None:
    """A fleet of agents starting at once queues its consumer creations on JetStream: an agent
    waits longer for them (60 s) than the other services (5 s), on the context every consumer
    and stream request of its broker goes through."""
    for settings, expected in (
        (BusSettings(nats_url=nats_server.url), 5.0),
        (HostAgentSettings(nats_url=nats_server.url, host="h1"), 60.0),
        (BusSettings(nats_url=nats_server.url, js_api_timeout_s=12.5), 12.5),
    ):
        broker = make_broker("t", settings, setup_telemetry("t"))
        await broker.connect()
        try:
            js = broker.config.connection_state.stream
            assert js._jsm._timeout == expected  # what consumer_info / add_consumer wait
            await declare_streams(broker)  # and the context works
        finally:
            await broker.stop()


async def test_each_event_carries_the_trace_context_it_was_emitted_in(
    nats_server: NatsServer,
) -> None:
    """The events of one window share a span context, and what the propagators write for it is
    used again: an event emitted in another context, or with baggage, still carries its own."""
    broker = make_broker("host-agent", BusSettings(nats_url=nats_server.url), setup_telemetry("t"))
    await broker.connect()
    await declare_streams(broker)
    publisher = EventPublisher(broker)

    def span(trace_id: int, span_id: int) -> otel_context.Context:
        return trace.set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=True))
        )

    window_a, window_b = span(0xA1, 0xA2), span(0xB1, 0xB2)
    with_baggage = baggage.set_baggage("tenant", "t-7", context=window_a)
    contexts = [window_a, window_a, window_b, with_baggage, window_a, None, window_b]
    now = utcnow()
    events = []
    for i, ctx in enumerate(contexts):
        event = VMResumed(
            host="h1", vm=f"vm-{i}", paused_at=now, resumed_at=now, paused_ms=1.0, budget_ms=1e4
        )
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            publisher.emit(event)
        finally:
            if token is not None:
                otel_context.detach(token)
        events.append(event)
    nc = await connect(nats_server.url)
    try:
        assert await publisher.drain(timeout=10)
        sub = await nc.jetstream().pull_subscribe(subjects.vm_resumed(), durable=None)
        stored: list[Msg] = []
        while len(stored) < len(events):
            stored.extend(await sub.fetch(len(events), timeout=5))
        headers = [dict(m.headers or {}) for m in stored]
        parents = [h.get("traceparent") for h in headers]
        a = f"00-{0xA1:032x}-{0xA2:016x}-00"
        b = f"00-{0xB1:032x}-{0xB2:016x}-00"
        assert parents == [a, a, b, a, a, None, b]
        assert [h.get("baggage") for h in headers] == [None, None, None, "tenant=t-7"] + [None] * 3
    finally:
        await publisher.stop()
        await nc.close()
        await broker.stop()
