"""The one OpenTelemetry setup of every service, configured only by the standard `OTEL_*` variables.

With no OTLP endpoint configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or the per-signal variables), or
with `OTEL_TRACES_EXPORTER=none` / `OTEL_SDK_DISABLED=true`, nothing is exported and shutdown
does not wait on anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """The providers of one process."""

    tracer_provider: TracerProvider
    meter_provider: metrics.MeterProvider
    exporting: bool

    def tracer(self, name: str) -> trace.Tracer:
        """A tracer of this process."""
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        """A meter of this process."""
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        """Flush what is buffered (only when exporting) and stop."""
        self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()


def _enabled(signal: str) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


_current: Telemetry | None = None


def setup_telemetry(default_service_name: str) -> Telemetry:
    """Build (once per process) the tracer and meter providers and make them global.

    `OTEL_SERVICE_NAME` wins over `default_service_name`; OTLP over HTTP/protobuf is used when an
    endpoint is configured.
    """
    global _current
    if _current is not None:
        return _current
    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = default_service_name
    resource = Resource.create(attributes)

    tracing = _enabled("traces")
    # Nothing exported: the traces this process starts are not recorded (their context still
    # travels in the messages, and a sampled parent from an exporting peer is honoured), which
    # spares every message a span that goes nowhere. `OTEL_TRACES_SAMPLER` decides otherwise.
    tracer_provider = TracerProvider(
        resource=resource, sampler=None if tracing else sampling.ParentBased(sampling.ALWAYS_OFF)
    )
    if tracing:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    meter_provider: metrics.MeterProvider = metrics.NoOpMeterProvider()
    if _enabled("metrics"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])

    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _current = Telemetry(tracer_provider, meter_provider, exporting=tracing)
    return _current


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to store and continue later."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_carrier(carrier: dict[str, str] | None) -> Context:
    """The trace context stored by `current_carrier`."""
    return propagate.extract(carrier or {})


def trace_id_hex() -> str | None:
    """The current trace id (for log lines), or None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
