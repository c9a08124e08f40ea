"""Every message handler, decoder and parser the services give FastStream runs on the event loop.

FastStream (through fast_depends) runs a plain function handler, decoder or parser in a worker
thread: one thread hop, two wake-ups, per message. On the notifier's replay of every event that
was a hop per event (eight times its context switches in the 1,000-host soak, and a third more
memory). Each service's app is built in a process of its own, as `faststream run` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.devstack import REPO

APPS = {
    "planner": "services.planner.main",
    "notifier": "services.notifier.main",
    "clock-sync": "services.clock_sync.main",
    "host-agent": "services.host_agent.main",
}

PROBE = """
import inspect, json, sys
app = __import__(sys.argv[1], fromlist=["app"]).app
found = []
for sub in app.broker.subscribers:
    options = sub._call_options
    for call in sub.calls:
        for role, func in (
            ("handler", call.handler._original_call),
            ("decoder", options.decoder if options else None),
            ("parser", options.parser if options else None),
        ):
            if func is not None:
                found.append(
                    [str(sub.subject), role, getattr(func, "__name__", repr(func)),
                     inspect.iscoroutinefunction(func)]
                )
print(json.dumps(found))
"""


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_handler_decoder_and_parser_is_a_coroutine_function(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PP_", "OTEL_"))} | {
        "PP_HOST": "HOST",
        "PP_NATS_URL": "nats://127.0.0.1:1",  # built, never connected
        "PP_LOG_FORMAT": "text",
        "OTEL_SDK_DISABLED": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE, APPS[service]],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    # The notifier's one consumer, its replay, reads with nats-py itself (no FastStream handler).
    assert any(role == "handler" for _, role, _, _ in found) == (service != "notifier"), found
    on_a_thread = [(subject, role, name) for subject, role, name, is_async in found if not is_async]
    assert on_a_thread == [], f"run in a worker thread per message: {on_a_thread}"
