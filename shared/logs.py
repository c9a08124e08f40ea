"""Structured logs: JSON in containers, readable lines in a terminal; every line carries the
rollout, host and VM it is about (where known) and the current trace id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from shared.telemetry import trace_id_hex

_fields: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "pp_log_fields", default=None
)

FIELDS = ("rollout", "host", "vm")


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Attach rollout/host/vm to every log line emitted inside the block."""
    merged = {**(_fields.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _fields.set(merged)
    try:
        yield
    finally:
        _fields.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = _fields.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        record.trace_id = trace_id_hex()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in (*FIELDS, "trace_id"):
            value = getattr(record, name, None)
            if value:
                body[name] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


class TextFormatter(logging.Formatter):
    """`time level service [rollout host vm trace] message`, for a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        tags = " ".join(
            f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None)
        )
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            tags = f"{tags} trace={trace_id[:8]}".strip()
        line = f"{ts} {record.levelname[0]} {self.service} {record.getMessage()}"
        if tags:
            line = f"{line}  [{tags}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def setup_logging(service: str, log_format: str = "auto", level: str = "INFO") -> None:
    """Configure the root logger of a service process."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if use_json else TextFormatter(service))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # FastStream's own lines (start, stop, its task supervisor) are chatty at INFO.
    if level.upper() != "DEBUG":
        logging.getLogger("pausepatch.faststream").setLevel(logging.WARNING)
