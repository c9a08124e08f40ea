"""Pause traces from Jaeger, for `pausepatch trace ROLLOUT|HOST|TRACE_ID`.

Reads Jaeger's lasting query API, `/api/v3` (Jaeger v2): `GET /api/v3/traces` and
`/api/v3/operations` answer OTLP JSON wrapped as `{"result": {"resourceSpans": [...]}}` (hex trace
and span ids, times as decimal strings of Unix nanoseconds, attribute values typed as
`{"stringValue": ...}`); a response may come as several such chunks one after another, and "no
trace" is `{"error": {"httpCode": 404, ...}}`. Every host maintenance is one trace whose planner
span `maintenance.plan <host>` is where it begins; the tree printed shows each span's service,
duration and start offset, with the `vm.pause <vm>` spans (the blackouts) among them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

HOST_TRACE_ROOT = "maintenance.plan"
"""The planner's first span of a host maintenance, `maintenance.plan <host>`
(services/planner/engine.py): a search on it finds every maintenance trace of a host."""
PLANNER_SERVICE = "planner"
ROLLOUT_ID = re.compile(r"^r\d{14}-[0-9a-f]{8}$")
"""The planner's rollout ids (`r` + UTC timestamp + random suffix)."""
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
"""A W3C trace id, as `report --json` and every log line give it; anything else is a host."""

_STATUS_ERROR = 2
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class JaegerError(Exception):
    """Jaeger answered an error (other than "no traces found")."""


@dataclass(frozen=True)
class Span:
    """One span as Jaeger returns it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """The status message when the span's status is ERROR."""

    @property
    def duration_ms(self) -> float:
        """End minus start."""
        return (self.end_ns - self.start_ns) / 1e6


@dataclass
class Trace:
    """Every span of one trace."""

    trace_id: str
    spans: list[Span]

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)

    @property
    def duration_ms(self) -> float:
        """First start to last end."""
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def services(self) -> list[str]:
        """Services with spans in the trace, by first appearance."""
        return list(dict.fromkeys(s.service for s in sorted(self.spans, key=_start)))

    def attribute(self, name: str) -> Any:
        """The value of attribute `name` on the earliest span that has it."""
        for span in sorted(self.spans, key=_start):
            if name in span.attributes:
                return span.attributes[name]
        return None

    def children(self, span: Span) -> list[Span]:
        """Spans whose parent is `span`, in start order."""
        return sorted((s for s in self.spans if s.parent_span_id == span.span_id), key=_start)

    def roots(self) -> list[Span]:
        """Spans whose parent is not in the trace (normally one), in start order."""
        ids = {s.span_id for s in self.spans}
        return sorted((s for s in self.spans if s.parent_span_id not in ids), key=_start)


def _start(span: Span) -> tuple[int, str]:
    return span.start_ns, span.name


def _value(value: dict[str, Any]) -> Any:
    """An OTLP JSON `AnyValue`."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", []))
    return value.get("bytesValue")


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def _chunks(payload: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a response: one, or several streamed one after another."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(payload) and payload[position].isspace():
            position += 1
        if position >= len(payload):
            return
        chunk, position = decoder.raw_decode(payload, position)
        yield chunk


def parse_traces(payload: str | bytes) -> list[Trace]:
    """The traces in a `/api/v3/traces` response body, oldest first; [] for "no traces found"."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    spans: dict[str, list[Span]] = {}
    for chunk in _chunks(text):
        if "error" in chunk:
            error = chunk["error"]
            if error.get("httpCode") == 404:
                continue
            raise JaegerError(f"Jaeger error {error.get('httpCode')}: {error.get('message')}")
        data = chunk.get("result", chunk)
        for resource_spans in data.get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for raw in scope_spans.get("spans", []):
                    span = _span(raw, service)
                    spans.setdefault(span.trace_id, []).append(span)
    traces = [Trace(trace_id, found) for trace_id, found in spans.items()]
    return sorted(traces, key=lambda t: t.start_ns)


def _span(raw: dict[str, Any], service: str) -> Span:
    status = raw.get("status", {})
    error = None
    if status.get("code") == _STATUS_ERROR:
        error = status.get("message") or "error"
    return Span(
        trace_id=raw["traceId"].lower(),
        span_id=raw["spanId"].lower(),
        parent_span_id=raw.get("parentSpanId", "").lower(),
        name=raw.get("name", ""),
        service=service,
        start_ns=int(raw.get("startTimeUnixNano", 0)),
        end_ns=int(raw.get("endTimeUnixNano", 0)),
        attributes=_attributes(raw.get("attributes", [])),
        error=error,
    )


def parse_since(value: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`."""
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30m, 24h, 7d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class JaegerClient:
    """Jaeger's `/api/v3` query API at `base_url` (the UI's address, port 16686)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def close(self) -> None:
        """Release the connection pool."""
        await self.http.aclose()

    async def _get(self, path: str, params: dict[str, str] | None = None) -> str:
        response = await self.http.get(path, params=params)
        if response.status_code >= 400 and response.status_code != 404:
            raise JaegerError(
                f"{response.request.url} answered {response.status_code}: {response.text[:300]}"
            )
        return response.text

    async def operations(self, service: str) -> list[str]:
        """Span names Jaeger knows for `service`."""
        body = json.loads(await self._get("/api/v3/operations", {"service": service}) or "{}")
        return sorted(op["name"] for op in body.get("operations") or [])

    async def find_traces(
        self,
        service: str,
        operation: str | None,
        start_min: datetime,
        start_max: datetime,
        limit: int = 100,
    ) -> list[Trace]:
        """Whole traces that have a span of `service` (named `operation`) starting in the window."""
        params = {
            "query.service_name": service,
            "query.start_time_min": _rfc3339(start_min),
            "query.start_time_max": _rfc3339(start_max),
            "query.num_traces": str(limit),
        }
        if operation:
            params["query.operation_name"] = operation
        return parse_traces(await self._get("/api/v3/traces", params))

    async def get_trace(self, trace_id: str) -> Trace | None:
        """One trace by id, or None."""
        traces = parse_traces(await self._get(f"/api/v3/traces/{trace_id}"))
        return traces[0] if traces else None


async def pause_traces(
    client: JaegerClient, target: str, since: timedelta, limit: int = 100
) -> list[Trace]:
    """Every host maintenance trace of a rollout (`target` a rollout id) or of a host in the last
    `since`, oldest first; or the one trace whose id `target` is."""
    if TRACE_ID.match(target):
        trace = await client.get_trace(target)
        return [trace] if trace is not None else []
    now = datetime.now(UTC)
    by_rollout = ROLLOUT_ID.match(target) is not None
    if by_rollout:
        prefix = f"{HOST_TRACE_ROOT} "
        operations = await client.operations(PLANNER_SERVICE)
        hosts = [op.removeprefix(prefix) for op in operations if op.startswith(prefix)]
    else:
        hosts = [target]
    key = "pp.rollout_id" if by_rollout else "pp.host"
    found: dict[str, Trace] = {}
    for host in hosts:
        operation = f"{HOST_TRACE_ROOT} {host}"
        for trace in await client.find_traces(PLANNER_SERVICE, operation, now - since, now, limit):
            if any(s.attributes.get(key) == target for s in trace.spans):
                found[trace.trace_id] = trace
    return sorted(found.values(), key=lambda t: t.start_ns)


def render_tree(trace: Trace) -> list[str]:
    """The span tree of `trace`: one line per span with its service, duration and start offset
    from the trace's start; errors marked."""
    header = (
        f"trace {trace.trace_id}  host {trace.attribute('pp.host') or '-'}  "
        f"rollout {trace.attribute('pp.rollout_id') or '-'}  "
        f"{len(trace.spans)} spans, {trace.duration_ms:.1f} ms, "
        f"services: {', '.join(trace.services)}"
    )
    lines = [header]

    def walk(span: Span, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└── " if last else "├── ")
        offset_ms = (span.start_ns - trace.start_ns) / 1e6
        line = (
            f"{prefix}{branch}{span.name}  [{span.service}]  {span.duration_ms:.1f} ms  "
            f"+{offset_ms:.1f} ms"
        )
        if span.name.startswith("vm.pause "):
            line += "  (VM paused)"
        if span.error:
            line += f"  ERROR: {span.error}"
        lines.append(line)
        children = trace.children(span)
        inner = prefix if depth == 0 else prefix + ("    " if last else "│   ")
        for i, child in enumerate(children):
            walk(child, inner, i == len(children) - 1, depth + 1)

    for root in trace.roots():
        walk(root, "", True, 0)
    return lines
