"""Telemetry is configured by the standard OTEL_* variables only."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

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
