"""CloudEvents delivery against a real HTTP receiver on loopback: pushing never waits on the
receiver, order is kept per URL, transient refusals are retried, permanent ones are not."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.notifier.document import Change, DeferPolicy, ScheduledEventsDocument
from services.notifier.webhooks import RetryPolicy, WebhookDispatcher
from tests.support.fleet import eventually
from tests.test_notifier_document import T0, inventory, planned, started


class ScriptedReceiver:
    """Answers each CloudEvent's attempts with the statuses scripted for its `type` suffix (200
    once the script is used up); holds every request while `gate` is closed."""

    def __init__(self, script: dict[str, list[int]]) -> None:
        self.script = script
        self.gate = threading.Event()
        self.gate.set()
        self.attempts: list[str] = []
        self.delivered: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = body["type"].rsplit(".", 1)[1]
                with receiver.lock:
                    receiver.attempts.append(kind)
                receiver.gate.wait(30)
                with receiver.lock:
                    statuses = receiver.script.get(kind, [])
                    status = statuses.pop(0) if statuses else 200
                    if status == 200:
                        receiver.delivered.append(body)
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[ScriptedReceiver]:
    scripted = ScriptedReceiver(getattr(request, "param", {}))
    yield scripted
    scripted.gate.set()
    scripted.server.shutdown()
    scripted.server.server_close()


def changes() -> list[Change]:
    """The document's changes for one event: scheduled, then started."""
    document = ScheduledEventsDocument()
    event_id = uuid.uuid4()
    found = []
    for event in (inventory("h1"), planned("h1", event_id), started("h1", event_id)):
        found += document.apply(event)
    return found


def dispatcher(url: str) -> WebhookDispatcher:
    retry = RetryPolicy(max_attempts=4, backoff_s=0.05, backoff_max_s=0.2, timeout_s=10)
    return WebhookDispatcher([url], DeferPolicy(), retry, queue_max=100)


async def test_push_never_waits_on_a_stuck_receiver_and_keeps_the_order(
    receiver: ScriptedReceiver,
) -> None:
    push = dispatcher(receiver.url)
    push.start()
    receiver.gate.clear()  # the receiver hangs on the first request
    scheduled, start = changes()
    push.push(scheduled)
    await eventually(lambda: receiver.attempts == ["scheduled"], "the first attempt", 20)
    for _ in range(20):
        push.push(start)  # returns at once: the delivery task is the one waiting
    assert len(push.targets[0].queue) == 20
    receiver.gate.set()
    await eventually(lambda: len(receiver.delivered) == 21, "21 deliveries", 20)
    assert [d["type"] for d in receiver.delivered[:2]] == [
        "io.pausepatch.scheduledevent.scheduled",
        "io.pausepatch.scheduledevent.started",
    ]
    first = receiver.delivered[0]
    assert first["specversion"] == "1.0" and first["subject"] == str(scheduled.event.event_id)
    assert first["time"] == T0.isoformat().replace("+00:00", "Z")
    # `data` is the event as it stood when pushed (here after both changes were applied).
    assert first["data"]["EventStatus"] == "Started"
    await push.stop()


@pytest.mark.parametrize(
    "receiver", [{"scheduled": [503, 429, 500], "started": [400]}], indirect=True
)
async def test_transient_refusals_are_retried_and_permanent_ones_dropped(
    receiver: ScriptedReceiver,
) -> None:
    push = dispatcher(receiver.url)
    push.start()
    for change in changes():
        push.push(change)
    # The receiver records an attempt before it answers; the dispatcher counts the outcome after
    # the answer arrives, so wait on the dispatcher's own counters.
    target = push.targets[0]
    await eventually(lambda: target.delivered + target.dropped == 2, "both events settled", 20)
    assert receiver.attempts == ["scheduled"] * 4 + ["started"]
    assert [d["type"].rsplit(".", 1)[1] for d in receiver.delivered] == ["scheduled"]
    assert target.delivered == 1 and target.dropped == 1
    await push.stop()
