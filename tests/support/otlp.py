"""A real OTLP/HTTP receiver (the protocol Jaeger ingests), decoding what the services export with
`opentelemetry-proto`, so tests can assert on the traces. It also answers the part of Jaeger's
`/api/v3` query API that `pausepatch trace` uses, in Jaeger v2's format, with what it received."""

from __future__ import annotations

import gzip
import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from shared.jaeger import Span

ReceivedSpan = Span
"""A span as received: the same shape as the one Jaeger's query API gives."""


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """`POST /v1/traces` (protobuf) on a free loopback port; `/v1/metrics` and `/v1/logs` are
    accepted and dropped."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._raw: list[tuple[ResourceSpans, ScopeSpans, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = receiver._jaeger_query(self.path)
                reply = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._ingest(body)
                    reply = ExportTraceServiceResponse().SerializeToString()
                else:
                    reply = b""
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The value for `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _ingest(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        raw = [
            (rs, ss, s) for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            service=service,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(spans)
            self._raw.extend(raw)

    def snapshot(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self.spans)

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[ReceivedSpan]:
        """Wait until `predicate(spans)` is true; return the spans."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans never satisfied the condition ({len(spans)} received)")
            time.sleep(0.1)

    # ------------------------------------------------------------ Jaeger's /api/v3

    def _jaeger_query(self, path: str) -> tuple[int, dict[str, Any]]:
        """`GET /api/v3/traces`, `/api/v3/traces/{id}` and `/api/v3/operations` as Jaeger v2
        answers them (including its 400 and 404 bodies)."""
        url = urlsplit(path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            raw = list(self._raw)
        if url.path == "/api/v3/operations":
            names = {s.name for rs, _, s in raw if _service(rs) == query.get("service") and s.name}
            return 200, {"operations": [{"name": n, "spanKind": ""} for n in sorted(names)]}
        if url.path.startswith("/api/v3/traces/"):
            wanted = {url.path.rsplit("/", 1)[1].lower()}
        elif url.path == "/api/v3/traces":
            try:
                wanted = _find(raw, query)
            except ValueError as exc:
                return 400, _jaeger_error(400, str(exc))
        else:
            return 404, _jaeger_error(404, "404 page not found")
        if not wanted:
            return 404, _jaeger_error(404, "No traces found")
        picked = [(rs, ss, s) for rs, ss, s in raw if s.trace_id.hex() in wanted]
        if not picked:
            return 404, _jaeger_error(404, "trace not found")
        return 200, {"result": {"resourceSpans": _otlp_json(picked)}}


def _service(resource_spans: ResourceSpans) -> str:
    attrs = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
    return str(attrs.get("service.name", ""))


def _jaeger_error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"httpCode": code, "message": message}}


def _find(raw: list[tuple[ResourceSpans, ScopeSpans, Any]], query: dict[str, str]) -> set[str]:
    """Trace ids with a span of the service (and operation) starting in the time window, the
    most recent `query.num_traces` of them."""
    for required in ("query.start_time_min", "query.start_time_max"):
        if required not in query:
            raise ValueError("query.start_time_min and query.start_time_max are required")
    low = datetime.fromisoformat(query["query.start_time_min"].replace("Z", "+00:00"))
    high = datetime.fromisoformat(query["query.start_time_max"].replace("Z", "+00:00"))
    low_ns, high_ns = int(low.timestamp() * 1e9), int(high.timestamp() * 1e9)
    starts: dict[str, int] = {}
    for rs, _, span in raw:
        if _service(rs) != query.get("query.service_name"):
            continue
        if query.get("query.operation_name") not in (None, "", span.name):
            continue
        if low_ns <= span.start_time_unix_nano <= high_ns:
            trace_id = span.trace_id.hex()
            starts[trace_id] = max(starts.get(trace_id, 0), span.start_time_unix_nano)
    limit = int(query.get("query.num_traces", "20"))
    return set(sorted(starts, key=starts.__getitem__, reverse=True)[:limit])


def _otlp_json(picked: list[tuple[ResourceSpans, ScopeSpans, Any]]) -> list[dict[str, Any]]:
    """OTLP JSON as Jaeger writes it: one resourceSpans entry per trace and resource, hex ids,
    enums as numbers, 64-bit integers as strings."""
    groups: dict[tuple[str, bytes, bytes], list[Any]] = {}
    scopes: dict[tuple[str, bytes, bytes], tuple[ResourceSpans, ScopeSpans]] = {}
    for rs, ss, span in picked:
        key = (span.trace_id.hex(), rs.resource.SerializeToString(), ss.scope.SerializeToString())
        groups.setdefault(key, []).append(span)
        scopes[key] = (rs, ss)
    out = []
    for key, spans in groups.items():
        rs, ss = scopes[key]
        out.append(
            {
                "resource": MessageToDict(rs.resource, use_integers_for_enums=True),
                "scopeSpans": [
                    {
                        "scope": MessageToDict(ss.scope, use_integers_for_enums=True),
                        "spans": [_span_json(s) for s in spans],
                    }
                ],
            }
        )
    return out


def _span_json(span: Any) -> dict[str, Any]:
    body = MessageToDict(span, use_integers_for_enums=True)
    body["traceId"] = span.trace_id.hex()
    body["spanId"] = span.span_id.hex()
    body["parentSpanId"] = span.parent_span_id.hex()
    for link, raw_link in zip(body.get("links", []), span.links, strict=True):
        link["traceId"] = raw_link.trace_id.hex()
        link["spanId"] = raw_link.span_id.hex()
    return body
