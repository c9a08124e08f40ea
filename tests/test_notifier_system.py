"""The notifier in the real system: its own nats-server, the planner, host-agents, clock-sync and
the notifier as processes; VMs call from loopback addresses of their own (127.0.1.x)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError

from services.notifier.snapshots import KEY as SNAPSHOT_KEY
from services.notifier.snapshots import Manifest, decode
from shared import subjects
from shared.bus import read_bucket
from shared.client import EventWatcher, PlannerClient
from shared.contracts import (
    ClockSynced,
    HostInventory,
    MaintenanceApproved,
    MaintenanceDeferred,
    MaintenancePlanned,
    MaintenanceStarted,
    RolloutStatus,
    VMInfo,
    VMPaused,
    VMResumed,
)
from shared.devstack import LocalStack, free_port
from tests.support.fleet import (
    planner_on_small_messages,
    ready,
    sim_vms,
    start_core,
    wait_hosts,
    wait_http,
    wait_stream,
)

PATH = "/metadata/scheduledevents"
V = {"api-version": "2020-07-01"}
HEADERS = {"Metadata": "true"}

# h1: web-1, db-1 (sets web and db); h2: app-1 (set app) and lone (standalone).
H1 = sim_vms([("web-1", "web", 0), ("db-1", "db", 0)], first_ip=1)
H2 = sim_vms([("app-1", "app", 0), ("lone", None, None)], first_ip=11)
STRANGER = "127.0.1.99"


def ip(vms: list[Any], name: str) -> str:
    return next(v.ip for v in vms if v.name == name)


class VMView:
    """The Scheduled Events API as one VM (one source address) calls it."""

    def __init__(self, base_url: str, source: str) -> None:
        self.source = source
        self.http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(local_address=source),
            base_url=base_url,
            timeout=30,
        )

    async def get(self, **params: str) -> httpx.Response:
        return await self.http.get(PATH, params={**V, **params}, headers=HEADERS)

    async def document(self, **params: str) -> dict[str, Any]:
        r = await self.get(**params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def post(self, body: dict[str, Any], **params: str) -> httpx.Response:
        return await self.http.post(PATH, params={**V, **params}, headers=HEADERS, json=body)

    async def wait(
        self, predicate: Callable[[dict[str, Any]], Any], timeout: float, **params: str
    ) -> dict[str, Any]:
        """Long-poll until `predicate(document)` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        r = await self.get(**params)
        while True:
            if r.status_code == 200 and predicate(r.json()):
                return r.json()  # type: ignore[no-any-return]
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"document never satisfied the condition: {r.text}")
            r = await self.get(
                wait_for_change="true",
                timeout_sec=f"{min(left, 5):.2f}",
                last_etag=r.headers.get("ETag", ""),
                **params,
            )

    async def record(self, seen: list[dict[str, Any]], stop: asyncio.Event) -> None:
        """Every version of the document, by long polling."""
        etag = ""
        while not stop.is_set():
            r = await self.get(wait_for_change="true", timeout_sec="1", last_etag=etag)
            if r.status_code == 200 and r.headers["ETag"] != etag:
                etag = r.headers["ETag"]
                seen.append(r.json())

    async def close(self) -> None:
        await self.http.aclose()


def statuses(doc: dict[str, Any]) -> list[str]:
    return [e["EventStatus"] for e in doc["Events"]]


async def fleet(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher], **env: str
) -> tuple[str, PlannerClient, EventWatcher]:
    client, watcher = bus
    url = start_core(stack, True, True, **env)
    stack.add_sim_host("h1", H1)
    stack.add_sim_host("h2", H2)
    await ready(stack, client, watcher, ["h1", "h2"])
    await watcher.wait_for(
        lambda w: w.events(HostInventory, host="h1") and w.events(HostInventory, host="h2"), 20
    )
    await wait_http(url)
    return url, client, watcher


async def test_an_approval_starts_the_host_early_and_the_document_follows_azure_rules(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    url, client, watcher = await fleet(stack, bus)
    web1, app1, lone = (VMView(url, ip(H1, "web-1")), VMView(url, ip(H2, "app-1")), None)
    lone = VMView(url, ip(H2, "lone"))
    stranger = VMView(url, STRANGER)
    seen: list[dict[str, Any]] = []
    stop = asyncio.Event()
    recorder = asyncio.create_task(web1.record(seen, stop))
    await web1.wait(lambda d: True, 10)
    while not seen:  # the recorder holds the document from before the rollout
        await asyncio.sleep(0.02)
    rollout = await client.submit(
        {
            "update_id": "early",
            "hosts": ["h1"],
            "patch": {"duration_s": 0.5},
            "notice_s": 600,
            "expected_pause_s": 2,
            "pause_budget_s": 10,
        }
    )
    rid = rollout["rollout_id"]
    doc = await web1.wait(lambda d: statuses(d) == ["Scheduled"], 30)
    (event,) = doc["Events"]
    # db-1 shares the host but not the set: not shown to web-1.
    assert event["EventType"] == "Freeze" and event["Resources"] == ["web-1"]
    assert event["DurationInSeconds"] == 2 and event["EventSource"] == "Platform"
    not_before = parsedate_to_datetime(event["NotBefore"])
    assert not_before > datetime.now(UTC) + timedelta(minutes=9)

    # Other sets, standalone VMs of other hosts and strangers see nothing, approve nothing.
    for other in (app1, lone, stranger):
        assert (await other.document())["Events"] == []
        refused = await other.post({"StartRequests": [{"EventId": event["EventId"]}]})
        assert refused.status_code == 400 and refused.json()["error"]

    approved = await web1.post({"StartRequests": [{"EventId": event["EventId"]}]})
    assert approved.status_code == 200
    (approval,) = await watcher.wait_for(
        lambda w: w.events(MaintenanceApproved, rollout_id=rid), 20, "the approval"
    )
    assert approval.vm == "web-1" and str(approval.scheduled_event_id) == event["EventId"]
    (start,) = await watcher.wait_for(lambda w: w.events(MaintenanceStarted, rollout_id=rid), 30)
    assert start.occurred_at < not_before - timedelta(minutes=9)  # early, because approved
    done = await watcher.wait_for(
        lambda w: [e for e in w.events(RolloutStatus, rollout_id=rid) if e.state == "completed"],
        60,
        "the rollout",
    )
    assert done[0].hosts_ok == 1
    await web1.wait(lambda d: d["Events"] == [], 30)
    stop.set()
    await recorder

    assert [statuses(d) for d in seen] == [[], ["Scheduled"], ["Started"], []]
    assert [d["DocumentIncarnation"] for d in seen] == [0, 1, 2, 3]
    started_event = seen[2]["Events"][0]
    assert started_event["EventId"] == event["EventId"] and started_event["NotBefore"] == ""
    for view in (web1, app1, lone, stranger):
        await view.close()


async def test_a_bounded_defer_moves_not_before_and_an_abort_removes_the_event(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    url, client, watcher = await fleet(stack, bus, PP_MAX_DEFERS="1", PP_MAX_DEFER_S="120")
    db1, web1 = VMView(url, ip(H1, "db-1")), VMView(url, ip(H1, "web-1"))
    rollout = await client.submit(
        {"update_id": "defer", "hosts": ["h1"], "patch": {"duration_s": 0.1}, "notice_s": 300}
    )
    rid = rollout["rollout_id"]
    doc = await db1.wait(lambda d: statuses(d) == ["Scheduled"], 30)
    (event,) = doc["Events"]
    first_not_before = parsedate_to_datetime(event["NotBefore"])
    ext = {"extended": "true"}

    def defer(seconds: float) -> dict[str, Any]:
        return {"DeferRequests": [{"EventId": event["EventId"], "DeferSeconds": seconds}]}

    too_long = await db1.post(defer(121), **ext)
    assert too_long.status_code == 400 and "120" in too_long.json()["error"]
    ok = await db1.post(defer(90), **ext)
    assert ok.status_code == 200 and ok.json()["DeferRequests"][0]["DefersRemaining"] == 0
    (deferred,) = await watcher.wait_for(
        lambda w: w.events(MaintenanceDeferred, rollout_id=rid), 20, "the defer on the bus"
    )
    assert deferred.vm == "db-1" and deferred.defer_s == 90
    moved = await web1.wait(
        lambda d: d["Events"] and d["Events"][0]["NotBefore"] != event["NotBefore"], 30
    )
    new_not_before = parsedate_to_datetime(moved["Events"][0]["NotBefore"])
    assert new_not_before == first_not_before + timedelta(seconds=90)
    assert moved["DocumentIncarnation"] == doc["DocumentIncarnation"] + 1
    assert moved["Events"][0]["EventId"] == event["EventId"]
    announcements = watcher.events(MaintenancePlanned, rollout_id=rid)
    assert announcements[-1].not_before.replace(microsecond=0) == new_not_before
    over = await web1.post(defer(30), **ext)
    assert over.status_code == 409 and over.json()["error"]
    # Who deferred is shown to the deferring VM's own set only.
    extended = await db1.document(**ext)
    assert extended["Events"][0]["Deferrals"] == [{"Resource": "db-1", "DeferSeconds": 90.0}]
    assert (await web1.document(**ext))["Events"][0]["Deferrals"] == []

    await client.abort(rid, "test")
    await web1.wait(lambda d: d["Events"] == [], 30)
    after = await web1.document()
    assert after["DocumentIncarnation"] == moved["DocumentIncarnation"] + 1
    canceled = await web1.document(**ext)
    assert statuses(canceled) == ["Canceled"]
    await db1.close()
    await web1.close()


class FlakyReceiver:
    """A CloudEvents webhook on loopback that fails the first `failures` attempts of each event."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}
        self.accepted: list[tuple[dict[str, Any], str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    n = receiver.attempts[body["id"]] = receiver.attempts.get(body["id"], 0) + 1
                    ok = n > receiver.failures
                    if ok:
                        receiver.accepted.append((body, self.headers["Content-Type"]))
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def types(self) -> list[str]:
        with self.lock:
            return [body["type"].rsplit(".", 1)[1] for body, _ in self.accepted]


@pytest.fixture
def receiver() -> Iterator[FlakyReceiver]:
    flaky = FlakyReceiver(failures=2)
    yield flaky
    flaky.server.shutdown()
    flaky.server.server_close()


async def test_webhooks_get_every_change_as_cloudevents_despite_failures_without_holding_the_bus(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher], receiver: FlakyReceiver
) -> None:
    url, client, watcher = await fleet(
        stack, bus, PP_WEBHOOKS=receiver.url, PP_WEBHOOK_BACKOFF_S="0.8"
    )
    web1 = VMView(url, ip(H1, "web-1"))
    rollout = await client.submit(
        {"update_id": "push", "hosts": ["h1"], "patch": {"duration_s": 0.3}, "notice_s": 0.5}
    )
    rid = rollout["rollout_id"]
    await watcher.wait_for(
        lambda w: len(w.events(ClockSynced, rollout_id=rid)) == 2, 60, "clock results"
    )
    # The documents followed the bus while every delivery was still being retried.
    extended = await web1.wait(
        lambda d: (
            statuses(d) == ["Completed"]
            and all(m["ClockSynced"] is not None for m in d["Events"][0]["Measurements"])
        ),
        30,
        extended="true",
    )
    assert "completed" not in receiver.types()

    # The measured pause and clock result per VM, as the bus reported them.
    (event,) = extended["Events"]
    assert event["Outcome"] == "Succeeded" and event["EndedAt"].endswith("GMT")
    resumed = {e.vm: e for e in watcher.events(VMResumed, rollout_id=rid)}
    clock = {e.vm: e for e in watcher.events(ClockSynced, rollout_id=rid)}
    # web-1 gets the figures of its own set's VMs (db-1 shares the host, not the set).
    assert {m["Resource"] for m in event["Measurements"]} == {"web-1"}
    for m in event["Measurements"]:
        assert m["ActualPauseMs"] == resumed[m["Resource"]].paused_ms >= 300
        assert m["ClockSynced"] == clock[m["Resource"]].ok
        assert m["ClockSkewMs"] == clock[m["Resource"]].skew_after_ms

    # scheduled, started, then 2 resumed, completed and 2 clock results (clock-sync and the
    # host-agent race for the last ones): each delivered after 2 refusals.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while len(receiver.types()) < 7 and loop.time() < deadline:
        await asyncio.sleep(0.1)
    kinds = receiver.types()
    assert kinds[:2] == ["scheduled", "started"], kinds
    assert sorted(kinds[2:]) == ["completed", "measured", "measured", "measured", "measured"]
    assert all(n == 3 for n in receiver.attempts.values()) and len(receiver.attempts) == 7
    for body, content_type in receiver.accepted:
        assert content_type.startswith("application/cloudevents+json")
        assert body["specversion"] == "1.0" and body["source"] == "/pausepatch/hosts/h1"
        assert body["subject"] == event["EventId"] and body["data"]["RolloutId"] == rid
    await web1.close()


async def host_and_rollout_events(client: PlannerClient, up_to: int) -> int:
    """How many events of hosts and rollouts the stream holds up to sequence `up_to`."""
    seqs: list[int] = []
    reached = asyncio.Event()

    async def count(msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= up_to:
            seqs.append(seq)
        if seq >= up_to:
            reached.set()

    sub = await client.nc.jetstream().subscribe(
        subjects.HOST_AND_ROLLOUT_EVENTS,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=count,
    )
    await asyncio.wait_for(reached.wait(), 20)
    await sub.unsubscribe()
    return len(seqs)


async def test_a_notifier_opens_once_it_replayed_the_last_host_event_though_vm_events_follow(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """The replay reads the events of hosts and rollouts only, so it never receives the stream's
    last event when that is a VM's (as it is during a rollout): its API opens once it replayed
    the last event it does read, not after `PP_CATCH_UP_TIMEOUT_S`. What no reader could read on
    a VM's subject is dead-lettered."""
    client, _ = bus
    stack.start_service("planner", "planner", ())
    await wait_stream(client.nc)
    js = client.nc.jetstream()
    event_id = uuid.uuid4()
    vms = [vm.name for vm in H1]
    documents_events = [
        HostInventory(
            host="h1",
            vms=[
                VMInfo(
                    vm=vm.name,
                    uuid=str(uuid.uuid4()),
                    availability_set=vm.availability_set,
                    update_domain=vm.update_domain,
                    ip=vm.ip,
                    state="running",
                )
                for vm in H1
            ],
        ),
        MaintenancePlanned(
            host="h1",
            rollout_id="r1",
            update_id="u1",
            scheduled_event_id=event_id,
            wave=0,
            event_type="Freeze",
            not_before=datetime.now(UTC) + timedelta(minutes=10),
            expected_pause_s=1,
            pause_budget_s=10,
            vms=vms,
        ),
    ]
    now = datetime.now(UTC)
    vm_events = [VMPaused(host="h1", vm=vm, rollout_id="r1", paused_at=now) for vm in vms]
    for event in (*documents_events, *vm_events):
        await js.publish(event.subject(), event.model_dump_json().encode())
    await js.publish(subjects.vm_paused("h1", "web-1"), b"\x00not json")
    last = (await js.stream_info(subjects.STREAM_NAME)).state.last_seq

    port = free_port()
    stack.start_service(
        "notifier", "notifier", ["--listen", f"127.0.0.1:{port}"], PP_CATCH_UP_TIMEOUT_S="600"
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(url, timeout=60)
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{url}/healthz")).json()
    # Caught up with the planned event, short of the stream's end (the VM events after it).
    assert health["seq"] == last - len(vm_events) - 1
    view = VMView(url, ip(H1, "web-1"))
    document = await view.document()
    assert [(e["EventId"], e["EventStatus"]) for e in document["Events"]] == [
        (str(event_id), "Scheduled")
    ]
    await view.close()

    dead = await dead_letters(client, 1)
    assert dead[0]["service"] == "notifier" and dead[0]["subject"] == subjects.vm_paused(
        "h1", "web-1"
    )
    assert "not JSON" in dead[0]["reason"]


async def dead_letters(client: PlannerClient, count: int) -> list[dict[str, Any]]:
    """The first `count` dead letters of the bus."""
    found: list[dict[str, Any]] = []
    enough = asyncio.Event()

    async def collect(msg: Any) -> None:
        found.append(json.loads(msg.data))
        if len(found) >= count:
            enough.set()

    sub = await client.nc.jetstream().subscribe(
        "pp.dlq.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=collect
    )
    await asyncio.wait_for(enough.wait(), 30)
    await sub.unsubscribe()
    return found


async def test_replicas_serve_one_document_and_a_restarted_one_the_same_incarnation(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    stack.add_sim_host("h1", H1)
    stack.add_sim_host("h2", H2)
    await ready(stack, client, watcher, ["h1", "h2"])
    ports = {name: free_port() for name in ("notifier-a", "notifier-b", "notifier-c")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}

    def start(name: str, **env: str) -> None:
        stack.start_service(
            name, "notifier", ["--listen", f"127.0.0.1:{ports[name]}"], PP_SNAPSHOT_EVERY="3", **env
        )

    start("notifier-a")
    start("notifier-b")
    for name in ("notifier-a", "notifier-b"):
        await wait_http(urls[name])
    views = {name: VMView(urls[name], ip(H1, "web-1")) for name in ("notifier-a", "notifier-b")}

    async def agree(replicas: list[VMView], **params: str) -> dict[str, Any]:
        """The replicas' documents once they agree (each may lag the stream a moment)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        docs = [await v.document(**params) for v in replicas]
        while any(d != docs[0] for d in docs) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            docs = [await v.document(**params) for v in replicas]
        assert all(d == docs[0] for d in docs), docs
        return docs[0]

    async def same(predicate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        for view in views.values():
            await view.wait(predicate, 30)
        return await agree(list(views.values()))

    first = await client.submit(
        {"update_id": "one", "hosts": ["h1"], "patch": {"duration_s": 0.1}, "notice_s": 0.3}
    )
    await watcher.wait_for(
        lambda w: [
            e
            for e in w.events(RolloutStatus, rollout_id=first["rollout_id"])
            if e.state == "completed"
        ],
        60,
    )
    await same(lambda d: d["DocumentIncarnation"] == 3 and d["Events"] == [])
    second = await client.submit(
        {"update_id": "two", "hosts": ["h1"], "patch": {"duration_s": 0.1}, "notice_s": 600}
    )
    before = await same(lambda d: statuses(d) == ["Scheduled"])
    assert before["DocumentIncarnation"] == 4

    # Restart replica b mid-rollout (from the snapshot), and start c from nothing: the stream alone.
    stack.services["notifier-b"].kill()
    start("notifier-b")
    start("notifier-c", PP_SNAPSHOT_BUCKET="pp_notifier_empty")
    for name in ("notifier-b", "notifier-c"):
        await wait_http(urls[name])
    for name in ("notifier-b", "notifier-c"):
        view = VMView(urls[name], ip(H1, "web-1"))
        assert await view.document() == before
        await agree([view, views["notifier-a"]], extended="true")
        await view.close()
    assert "loaded from the snapshot" in stack.services["notifier-b"].log_tail(200)
    # b replayed the stream's tail only; c, without a snapshot, all of it: every event of a
    # host or a rollout (the replay reads no VM's own events).
    async with httpx.AsyncClient() as http:
        b, c = [(await http.get(f"{urls[n]}/healthz")).json() for n in ("notifier-b", "notifier-c")]
    assert c["handled"] == await host_and_rollout_events(client, c["seq"])
    assert b["handled"] < c["handled"] // 2

    # The rollout goes on; both still agree.
    (event,) = before["Events"]
    approved = await views["notifier-b"].post({"StartRequests": [{"EventId": event["EventId"]}]})
    assert approved.status_code == 200
    await watcher.wait_for(
        lambda w: [
            e
            for e in w.events(RolloutStatus, rollout_id=second["rollout_id"])
            if e.state == "completed"
        ],
        60,
    )
    final = await same(lambda d: d["Events"] == [] and d["DocumentIncarnation"] == 6)
    assert final == {"DocumentIncarnation": 6, "Events": []}
    for view in views.values():
        await view.close()


async def test_the_documents_stay_current_when_the_server_loses_the_replay_or_restarts(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    """The notifier reads the stream through an ordered consumer held in the server's memory.
    If the server loses it (a node fails, someone deletes it), the missing heartbeats must make
    the notifier create it again from the next event, or its documents stop changing for good;
    a restarted server must not stop them either."""
    url, client, _ = await fleet(stack, bus, PP_REPLAY_HEARTBEAT_S="0.5")
    web1 = VMView(url, ip(H1, "web-1"))
    assert (await web1.document())["Events"] == []
    js = client.nc.jetstream()
    replays = [
        c.name
        for c in await js.consumers_info(subjects.STREAM_NAME)
        if c.config.deliver_subject
        and c.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE
        and c.config.filter_subject == subjects.HOST_AND_ROLLOUT_EVENTS
    ]
    assert len(replays) == 1, replays  # the notifier's (the test's watcher reads from the start)
    await js.delete_consumer(subjects.STREAM_NAME, replays[0])
    rollout = await client.submit(
        {
            "update_id": "replay-lost",
            "hosts": ["h1"],
            "patch": {"duration_s": 0.1},
            "notice_s": 600,
            "pause_budget_s": 10,
        }
    )
    doc = await web1.wait(lambda d: statuses(d) == ["Scheduled"], 30)
    assert doc["Events"][0]["Resources"] == ["web-1"]

    assert stack.nats is not None
    stack.nats.stop(signal.SIGKILL)  # the stream is on disk
    stack.nats.start()
    await wait_hosts(client, ["h1", "h2"])  # the planner answers again
    await client.abort(rollout["rollout_id"])
    await web1.wait(lambda d: d["Events"] == [], 30)  # the abort, after the restart
    await web1.close()


async def test_a_snapshot_larger_than_one_message_is_written_in_parts_and_a_restart_loads_it(
    workdir: Path,
) -> None:
    """A server that carries 64 KiB per message, and a fleet whose documents' snapshot is larger
    than that compressed (3,000 VMs of distinct UUIDs and addresses): the notifier writes it in
    parts, and a notifier started after it loads it instead of replaying the stream."""
    async with planner_on_small_messages(workdir) as (stack, nc):
        js = nc.jetstream()
        hosts = [f"rack-{i:03d}" for i in range(150)]
        inventories = [
            HostInventory(
                host=host,
                vms=[
                    VMInfo(
                        vm=f"{host}-vm-{v:02d}",
                        uuid=uuid.uuid4().hex,
                        availability_set=f"set-{v % 7}",
                        update_domain=h % 5,
                        ip=f"127.1.{h}.{v + 1}",
                        state="running",
                    )
                    for v in range(20)
                ],
            )
            for h, host in enumerate(hosts)
        ]

        async def publish(inventory: HostInventory) -> None:
            await js.publish(
                inventory.subject(),
                inventory.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(inventory.event_id)},
            )

        for inventory in inventories:
            await publish(inventory)
        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def start() -> None:
            stack.start_service(
                "notifier",
                "notifier",
                ["--listen", f"127.0.0.1:{port}"],
                PP_SNAPSHOT_INTERVAL_S="1",
            )

        start()
        await wait_http(url)
        kv = await js.key_value("pp_notifier")

        async def stored_in_parts() -> Manifest:
            # A snapshot is due a second after the last one while events come: the first host's
            # heartbeat, twice a second, as the fleet's heartbeats would.
            while True:
                await publish(inventories[0].model_copy(update={"event_id": uuid.uuid4()}))
                with contextlib.suppress(KeyNotFoundError):
                    stored = decode((await kv.get(SNAPSHOT_KEY)).value or b"")
                    manifest = Manifest.of(stored)
                    if manifest is not None:
                        return manifest
                await asyncio.sleep(0.5)  # the next heartbeat; the wait is bounded

        manifest = await asyncio.wait_for(stored_in_parts(), 30)
        assert manifest.parts >= 2, manifest
        # The manifest and its parts as one read of the bucket sees them (a later snapshot may
        # replace the manifest and purge the parts it named meanwhile). Not `kv.keys()`: it can
        # answer before the bucket's values have arrived (see `read_bucket`).
        stored = await read_bucket(kv)
        current = Manifest.of(decode(stored[SNAPSHOT_KEY].value))
        assert current is not None and current.parts >= 2, current
        assert set(current.part_keys()) <= set(stored), (current, sorted(stored))
        async with httpx.AsyncClient(base_url=url) as http:
            before = (await http.get("/healthz")).json()
        assert before["handled"] >= len(hosts)

        stack.services["notifier"].kill()
        start()
        await wait_http(url)
        log = stack.services["notifier"].log_tail(200)
        assert "documents loaded from the snapshot" in log, log
        async with httpx.AsyncClient(base_url=url) as http:
            after = (await http.get("/healthz")).json()
        # The restart replayed the heartbeats after the snapshot, not the fleet's inventories.
        last = await js.get_last_msg(subjects.STREAM_NAME, subjects.HOST_AND_ROLLOUT_EVENTS)
        assert after["seq"] == last.seq and after["handled"] < len(hosts) // 2, (before, after)
