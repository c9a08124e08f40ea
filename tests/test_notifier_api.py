"""The HTTP API in process (a unit test of the handlers: the bus is a recorder here; the system
tests in test_notifier_system.py run it against a real nats-server and planner)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from services.notifier.api import PATH, build_api
from services.notifier.document import API_VERSIONS, DeferPolicy, ScheduledEventsDocument
from services.notifier.service import ScheduledEventsService
from shared.contracts import Event, MaintenanceApproved, MaintenanceDeferred
from tests.test_notifier_document import inventory, planned, started

HEADERS = {"Metadata": "true"}
V = {"api-version": "2020-07-01"}


class Stack:
    """A document with h1's and h2's VMs and one event on h1, behind the API."""

    def __init__(self, **policy: Any) -> None:
        self.published: list[Event] = []
        self.event_id = uuid.uuid4()
        self.document = ScheduledEventsDocument(DeferPolicy(**policy))
        self.service = ScheduledEventsService(self.document, self._publish)
        self.seq = 0
        for event in (inventory("h1"), inventory("h2"), planned("h1", self.event_id)):
            self.apply(event)
        self.api = build_api(self.service, long_poll_max_s=5)

    async def _publish(self, event: Event) -> None:
        self.published.append(event)

    def apply(self, event: Event) -> None:
        self.seq += 1
        self.service.apply(event, self.seq)

    @asynccontextmanager
    async def client(self, source: str) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client whose requests come from `source`."""
        transport = httpx.ASGITransport(app=self.api, client=(source, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://imds") as http:
            yield http


@pytest.fixture
def stack() -> Stack:
    return Stack(max_defers=1, max_defer_s=300)


async def test_refuses_without_metadata_header_or_through_a_proxy(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        for headers in ({}, {"Metadata": "false"}, {**HEADERS, "X-Forwarded-For": "10.0.0.9"}):
            for method in ("GET", "POST"):
                r = await http.request(method, PATH, params=V, headers=headers, json={})
                assert r.status_code == 400 and r.json()["error"].startswith("Bad request")


async def test_unknown_or_missing_api_version_lists_the_supported_ones(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        for params in ({}, {"api-version": "latest"}, {"api-version": "2021-01-01"}):
            r = await http.get(PATH, params=params, headers=HEADERS)
            assert r.status_code == 400
            assert r.json()["newest-versions"] == list(reversed(API_VERSIONS))
        for version in API_VERSIONS:
            r = await http.get(PATH, params={"api-version": version}, headers=HEADERS)
            assert r.status_code == 200 and r.json()["Events"][0]["EventStatus"] == "Scheduled"


async def test_etag_gives_304_until_the_document_changes(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        first = await http.get(PATH, params=V, headers=HEADERS)
        etag = first.headers["ETag"]
        again = await http.get(PATH, params=V, headers={**HEADERS, "If-None-Match": etag})
        assert again.status_code == 304 and again.headers["ETag"] == etag and not again.content
        stack.apply(started("h1", stack.event_id))
        changed = await http.get(PATH, params=V, headers={**HEADERS, "If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["ETag"] != etag
        assert changed.json()["DocumentIncarnation"] == first.json()["DocumentIncarnation"] + 1


async def test_approval_publishes_once_per_vm_and_is_200_even_when_already_approved(
    stack: Stack,
) -> None:
    body = {"StartRequests": [{"EventId": str(stack.event_id)}]}
    async with stack.client("10.0.0.1") as web1, stack.client("10.0.0.4") as web2:
        assert (await web1.post(PATH, params=V, headers=HEADERS, json=body)).status_code == 200
        (approved,) = stack.published
        assert isinstance(approved, MaintenanceApproved)
        assert (approved.host, approved.vm, approved.scheduled_event_id) == (
            "h1",
            "web-1",
            stack.event_id,
        )
        stack.apply(approved)
        assert (await web1.post(PATH, params=V, headers=HEADERS, json=body)).status_code == 200
        assert (await web2.post(PATH, params=V, headers=HEADERS, json=body)).status_code == 200
    assert [e.vm for e in stack.published] == ["web-1", "web-2"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"StartRequests": []}',
        b'{"StartRequests": [{}]}',
        b'{"StartRequests": "x"}',
        b'{"StartRequests": [{"EventId": 5}]}',
    ],
)
async def test_malformed_bodies_are_400_with_a_message(stack: Stack, body: bytes) -> None:
    async with stack.client("10.0.0.1") as http:
        r = await http.post(
            PATH,
            params=V,
            headers={**HEADERS, "Content-Type": "application/json"},
            content=body,
        )
    assert r.status_code == 400 and r.json()["error"]
    assert stack.published == []


async def test_no_caller_approves_or_sees_what_is_not_its_own(stack: Stack) -> None:
    body = {"StartRequests": [{"EventId": str(stack.event_id)}]}
    # `other` is standalone on h2; 10.9.9.9 is no VM at all.
    for source in ("10.0.0.6", "10.9.9.9"):
        async with stack.client(source) as http:
            doc = (await http.get(PATH, params=V, headers=HEADERS)).json()
            assert doc["Events"] == []
            r = await http.post(PATH, params=V, headers=HEADERS, json=body)
            assert r.status_code == 400 and str(stack.event_id) in r.json()["error"]
    async with stack.client("10.0.0.1") as http:
        bogus = {"StartRequests": [{"EventId": str(uuid.uuid4())}]}
        assert (await http.post(PATH, params=V, headers=HEADERS, json=bogus)).status_code == 400
    assert stack.published == []


async def test_extended_view_is_opt_in(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        strict = (await http.get(PATH, params=V, headers=HEADERS)).json()
        extended = (await http.get(PATH, params={**V, "extended": "true"}, headers=HEADERS)).json()
    assert "Extended" not in strict and "Measurements" not in strict["Events"][0]
    assert extended["Extended"] is True and extended["Events"][0]["DefersRemaining"] == 1


async def test_defer_is_bounded_by_the_same_limits_as_the_planner(stack: Stack) -> None:
    def defer(seconds: float) -> dict[str, Any]:
        return {"DeferRequests": [{"EventId": str(stack.event_id), "DeferSeconds": seconds}]}

    ext = {**V, "extended": "true"}
    async with stack.client("10.0.0.2") as http:
        strict = await http.post(PATH, params=V, headers=HEADERS, json=defer(60))
        assert strict.status_code == 400 and "extended" in strict.json()["error"]
        too_long = await http.post(PATH, params=ext, headers=HEADERS, json=defer(301))
        assert too_long.status_code == 400 and too_long.json()["MaxDeferSeconds"] == 300
        ok = await http.post(PATH, params=ext, headers=HEADERS, json=defer(120))
        assert ok.status_code == 200
        assert ok.json()["DeferRequests"][0]["DefersRemaining"] == 0
        (deferred,) = stack.published
        assert isinstance(deferred, MaintenanceDeferred)
        assert (deferred.vm, deferred.defer_s) == ("db-1", 120)
        # Over the limit at once, before the stream even echoed the first one back ...
        again = await http.post(PATH, params=ext, headers=HEADERS, json=defer(60))
        assert again.status_code == 409 and again.json()["DefersRemaining"] == 0
        # ... and after, from any VM of the event.
        stack.apply(deferred)
    async with stack.client("10.0.0.1") as http:
        again = await http.post(PATH, params=ext, headers=HEADERS, json=defer(60))
        assert again.status_code == 409
        stack.apply(started("h1", stack.event_id))
        late = await http.post(PATH, params=ext, headers=HEADERS, json=defer(60))
        assert late.status_code == 409 and "started" in late.json()["error"]
    assert len(stack.published) == 1


async def test_long_poll_answers_on_change_or_at_its_timeout(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        etag = (await http.get(PATH, params=V, headers=HEADERS)).headers["ETag"]
        poll = {**V, "wait_for_change": "true", "timeout_sec": "0.3"}
        unchanged = await http.get(PATH, params=poll, headers={**HEADERS, "If-None-Match": etag})
        assert unchanged.status_code == 304
        waiting = asyncio.create_task(
            http.get(
                PATH,
                params={**poll, "timeout_sec": "5", "last_etag": etag},
                headers=HEADERS,
            )
        )
        await asyncio.sleep(0.05)  # let it park: the change below must wake it
        assert not waiting.done()
        stack.apply(started("h1", stack.event_id))
        changed = await asyncio.wait_for(waiting, 4)
        assert changed.status_code == 200 and changed.headers["ETag"] != etag
        assert changed.json()["Events"][0]["EventStatus"] == "Started"
        too_long = await http.get(PATH, params={**poll, "timeout_sec": "3600"}, headers=HEADERS)
        assert too_long.status_code == 400 and too_long.json()["error"]


async def test_errors_are_json_4xx_everywhere(stack: Stack) -> None:
    async with stack.client("10.0.0.1") as http:
        assert (await http.get("/nope")).status_code == 404
        assert (await http.put(PATH, params=V, headers=HEADERS)).status_code == 405
        big = await http.post(PATH, params=V, headers=HEADERS, content=b"x" * 70_000)
        assert big.status_code == 413
        for r in (await http.get("/nope"), big):
            assert r.json()["error"]


def test_a_change_re_renders_only_the_scopes_it_touches(stack: Stack) -> None:
    service, document = stack.service, stack.document
    solo, other = document.caller("10.0.0.3"), document.caller("10.0.0.6")
    assert solo is not None and other is not None
    before = {c: service.render(c, "2020-07-01", False) for c in (solo, other)}
    assert service.render(solo, "2020-07-01", False) is before[solo]  # cached
    stack.apply(started("h1", stack.event_id))  # the event's scopes: h1's VMs only
    after = {c: service.render(c, "2020-07-01", False) for c in (solo, other)}
    assert after[other] is before[other]  # h2's standalone VM: untouched, still cached
    assert after[solo] is not before[solo]
    assert after[solo].incarnation == before[solo].incarnation + 1
    assert b'"EventStatus":"Started"' in after[solo].body
