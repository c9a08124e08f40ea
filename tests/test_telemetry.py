"""Telemetry is configured by the standard OTEL_* variables only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.trace import SpanContext

from shared.bus import make_broker
from shared.client import connect
from shared.contracts import ClockAction
from shared.devstack import NatsServer
from shared.settings import BusSettings
from shared.telemetry import Telemetry

PROBE = """
import time
from shared.telemetry import setup_telemetry
t = setup_telemetry("probe")
with t.tracer("probe").start_as_current_span("work"):
    pass
start = time.monotonic()
t.shutdown()
print(t.exporting, t.tracer_provider.resource.attributes["service.name"], time.monotonic() - start)
"""


def probe(env: dict[str, str]) -> tuple[str, str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], out[1], float(out[2])


def test_no_endpoint_means_no_export_and_no_delay_at_shutdown() -> None:
    exporting, name, shutdown_s = probe({"PATH": "/usr/bin:/bin"})
    assert exporting == "False" and name == "probe" and shutdown_s < 0.5


@pytest.mark.parametrize("extra", [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}])
def test_exporting_can_be_switched_off_the_standard_way(extra: dict[str, str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **extra}
    assert probe(env)[0] == "False"


def test_service_name_and_endpoint_come_from_the_standard_variables() -> None:
    started = time.monotonic()
    exporting, name, _ = probe(
        {
            "PATH": "/usr/bin:/bin",
            "OTEL_SERVICE_NAME": "planner-eu-1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        }
    )
    assert exporting == "True" and name == "planner-eu-1"
    assert time.monotonic() - started < 30


async def test_a_process_exporting_nothing_hands_its_handlers_the_senders_trace_context(
    nats_server: NatsServer,
) -> None:
    """No span per message where nothing is exported (`shared.bus._TraceContext`): the handler
    runs in the sender's own span context (what it publishes continues that trace), and a
    message without one is handled outside any trace."""
    provider = TracerProvider(sampler=sampling.ParentBased(sampling.ALWAYS_OFF))
    silent = Telemetry(provider, NoOpMeterProvider(), exporting=False)
    broker = make_broker("host-agent", BusSettings(nats_url=nats_server.url), silent)
    seen: asyncio.Queue[SpanContext] = asyncio.Queue()

    @broker.subscriber("pp.cmd.host.h1.clock")
    async def on_clock(command: ClockAction) -> dict[str, object]:
        seen.put_nowait(trace.get_current_span().get_span_context())
        return {"readings": []}

    await broker.start()
    nc = await connect(nats_server.url)
    try:
        body = json.dumps(ClockAction(vms=["v1"], action="sync").to_json()).encode()
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        headers = {"content-type": "application/json", "traceparent": parent}
        await nc.request("pp.cmd.host.h1.clock", body, timeout=5, headers=headers)
        context = await asyncio.wait_for(seen.get(), 5)
        assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
        assert format(context.span_id, "016x") == "b7ad6b7169203331"  # no span in between
        assert context.trace_flags.sampled

        del headers["traceparent"]
        await nc.request("pp.cmd.host.h1.clock", body, timeout=5, headers=headers)
        assert not (await asyncio.wait_for(seen.get(), 5)).is_valid
    finally:
        await nc.close()
        await broker.stop()
