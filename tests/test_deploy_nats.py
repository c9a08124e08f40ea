"""NATS least privilege: the deployment's server config (deploy/nats/nats.conf with the generated
users of deploy/nats/auth.conf) on a real nats-server. Every service, logged in as its own user,
still runs a whole rollout; a host-agent cannot publish maintenance or another host's events, and
a notifier cannot start maintenance."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import secrets
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import httpx
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from services.planner.main import clock_results_in_stream
from shared import subjects
from shared.client import EventWatcher, PlannerClient
from shared.contracts import (
    ClockSynced,
    HostInventory,
    MaintenanceApproved,
    MaintenanceStarted,
    PatchSpec,
    VMPaused,
)
from shared.devstack import REPO, LocalStack, free_port
from tests.support.fleet import wait_hosts, wait_stream

NATS_DIR = REPO / "deploy" / "nats"
NODES_DIR = REPO / "deploy" / "compose-nodes"
HOSTS = sorted(p.stem for p in NODES_DIR.glob("*.xml"))
SERVICE_USERS = ("planner", "notifier", "clock-sync", "operator")
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
PLACEMENT = "{urn:pausepatch:placement:1}placement"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def nats_auth() -> ModuleType:
    """deploy/nats/nats_auth.py, the generator of the users."""
    spec = importlib.util.spec_from_file_location("nats_auth", NATS_DIR / "nats_auth.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def node_vms(host: str) -> dict[str, str]:
    """VM name -> address of one simulated host's node file."""
    root = ET.parse(NODES_DIR / f"{host}.xml").getroot()
    found = {}
    for domain in root.iter("domain"):
        placement = domain.find(f"metadata/{PLACEMENT}")
        assert placement is not None
        found[domain.findtext("name", "")] = placement.get("ip", "")
    return found


class Secured:
    """A LocalStack whose nats-server runs the deployment's config, with a password per user."""

    def __init__(self, stack: LocalStack, passwords: dict[str, str]) -> None:
        self.stack = stack
        self.passwords = passwords

    def login(self, user: str) -> dict[str, str]:
        """Environment of a service process logged in as `user`."""
        return {"PP_NATS_USER": user, "PP_NATS_PASSWORD": self.passwords[user]}

    def url(self, user: str) -> str:
        """`nats://user:password@host:port`, as an operator passes it to the CLI."""
        host_port = self.stack.nats_url.removeprefix("nats://")
        return f"nats://{quote(user)}:{quote(self.passwords[user])}@{host_port}"

    async def connect(self, user: str, errors: list[str] | None = None) -> Client:
        """A connection as `user`; server errors (permission violations) go to `errors`."""

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        return await nats.connect(
            servers=[self.stack.nats_url],
            user=user,
            password=self.passwords[user],
            # As every pausepatch client does: replies under the user's own prefix.
            inbox_prefix=subjects.inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=3,
        )

    def healthcheck(self, service: str, user: str, **env: str) -> subprocess.CompletedProcess[str]:
        """The containers' health check of `service`, run with that service's login."""
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), service],
            env=self.stack.env(**self.login(user), **env),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def start_host_agent(self, host: str) -> None:
        """The agent of one compose host over its node file, as its own user."""
        self.stack.start_service(
            f"host-agent-{host}",
            "host_agent",
            ["--host", host, "--libvirt-uri", f"test://{NODES_DIR / f'{host}.xml'}"],
            **self.login(f"host-agent-{host}"),
        )


@pytest.fixture
def secured(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Secured]:
    """nats-server with deploy/nats/nats.conf and auth.conf; passwords in its environment."""
    auth = nats_auth()
    users = [*SERVICE_USERS, *(f"host-agent-{h}" for h in HOSTS)]
    # nats-server parses a variable's value as a config value: start passwords with a letter.
    passwords = {user: "pw" + secrets.token_hex(12) for user in users}
    for user, password in passwords.items():
        monkeypatch.setenv(auth.password_variable(user), password)
    shutil.copy(NATS_DIR / "auth.conf", workdir / "auth.conf")
    stack = LocalStack(workdir, extra_env={"PP_HEARTBEAT_S": "2"})
    stack.start_nats(config=(NATS_DIR / "nats.conf").read_text())
    yield Secured(stack, passwords)
    stack.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in stack.services.values():
            print(f"\n===== {proc.name} (log tail) =====\n{proc.log_tail(40)}")
        print(f"\n===== nats-server =====\n{stack.nats.log_tail(40) if stack.nats else ''}")


@pytest.fixture
async def operator(secured: Secured) -> AsyncIterator[Client]:
    """The operator's connection (what the CLI logs in as)."""
    nc = await secured.connect("operator")
    yield nc
    await nc.close()


async def approve_everything(base_url: str, vms: dict[str, str], stop: asyncio.Event) -> None:
    """Every VM approves every scheduled event that lists it, as an in-guest handler would."""
    params = {"api-version": "2020-07-01"}
    headers = {"Metadata": "true"}
    clients = {
        vm: httpx.AsyncClient(
            base_url=base_url, transport=httpx.AsyncHTTPTransport(local_address=ip), timeout=2
        )
        for vm, ip in vms.items()
    }
    approved: set[tuple[str, str]] = set()
    try:
        while not stop.is_set():
            for vm, http in clients.items():
                try:
                    doc = (
                        await http.get("/metadata/scheduledevents", params=params, headers=headers)
                    ).json()
                    for event in doc.get("Events", []):
                        key = (vm, event["EventId"])
                        wanted = event["EventStatus"] == "Scheduled" and vm in event["Resources"]
                        if wanted and key not in approved:
                            body = {"StartRequests": [{"EventId": event["EventId"]}]}
                            r = await http.post(
                                "/metadata/scheduledevents",
                                params=params,
                                headers=headers,
                                json=body,
                            )
                            if r.status_code == 200:
                                approved.add(key)
                except (httpx.TransportError, ValueError):
                    pass
            await asyncio.sleep(0.1)
    finally:
        for http in clients.values():
            await http.aclose()


async def wait_for_errors(errors: list[str], wanted: Callable[[list[str]], bool]) -> None:
    """Server errors arrive asynchronously: wait (bounded) until `wanted(errors)`."""
    for _ in range(50):
        if wanted(errors):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected permission violations, got {errors}")


def violated(errors: list[str], subject: str) -> bool:
    """The server reported a publish permission violation on `subject` (the client reports the
    server's error lowercased)."""
    return any(
        "permissions violation" in e.lower()
        and "publish" in e.lower()
        and f'"{subject.lower()}"' in e.lower()
        for e in errors
    )


async def refused_by_stream(nc: Client, subject: str, body: bytes) -> bool:
    """A JetStream publish the server drops gets no ack (it never reaches the stream)."""
    try:
        await nc.jetstream().publish(subject, body, timeout=0.5)
    except (TimeoutError, nats.errors.TimeoutError):
        return True
    return False


def test_auth_conf_is_what_the_generator_writes_for_the_compose_hosts() -> None:
    generated = subprocess.run(
        [sys.executable, str(NATS_DIR / "nats_auth.py"), *HOSTS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated == (NATS_DIR / "auth.conf").read_text(), (
        "deploy/nats/auth.conf is stale: python deploy/nats/nats_auth.py " + " ".join(HOSTS)
    )
    assert HOSTS == ["hv-01", "hv-02", "hv-03"]
    # Each user may read its own inbox and no other (no `_INBOX.>` anywhere).
    assert '"_INBOX.>"' not in generated
    for user in (*SERVICE_USERS, *(f"host-agent-{h}" for h in HOSTS)):
        assert generated.count(f'"{subjects.inbox_prefix(user)}.>"') == 1, user


def test_an_inbox_prefix_is_one_token_per_user_whatever_the_name() -> None:
    assert subjects.inbox_prefix(None) == "_INBOX"
    assert subjects.inbox_prefix("host-agent-hv-01") == "_INBOX.host-agent-hv-01"
    # A dot or a wildcard in a user name cannot widen or split the prefix.
    assert subjects.inbox_prefix("a.b*>c d") == "_INBOX.a_b__c_d"


def test_server_configs_are_valid_and_refuse_to_start_without_every_password(
    tmp_path: Path,
) -> None:
    auth = nats_auth()
    users = [*SERVICE_USERS, *(f"host-agent-{h}" for h in HOSTS)]
    env = {auth.password_variable(u): "secret" for u in users}
    for conf in ("nats.conf", "cluster.conf"):
        ok = subprocess.run(
            [NATS_SERVER, "-t", "-c", str(NATS_DIR / conf)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0, ok.stderr + ok.stdout
    del env["PP_NATS_PASSWORD_HOST_HV_02"]
    missing = subprocess.run(
        [NATS_SERVER, "-t", "-c", str(NATS_DIR / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "PP_NATS_PASSWORD_HOST_HV_02" in missing.stderr + missing.stdout


async def test_every_service_runs_a_whole_rollout_logged_in_as_its_own_user(
    secured: Secured, operator: Client
) -> None:
    stack = secured.stack
    stack.start_service("planner", "planner", (), **secured.login("planner"))
    port = free_port()
    stack.start_service(
        "notifier", "notifier", ["--listen", f"127.0.0.1:{port}"], **secured.login("notifier")
    )
    stack.start_service("clock-sync", "clock_sync", (), **secured.login("clock-sync"))
    for host in HOSTS:
        secured.start_host_agent(host)

    client = PlannerClient(operator)
    watcher = EventWatcher(operator)
    await wait_stream(operator)
    await watcher.start()
    await wait_hosts(client, HOSTS)
    vms = {vm: ip for host in HOSTS for vm, ip in node_vms(host).items()}
    await watcher.wait_for(
        lambda w: {e.host for e in w.events(HostInventory)} >= set(HOSTS), 10, "inventories"
    )

    # 15 minutes of notice: the rollout can only finish quickly because the VMs approve, which
    # goes through the notifier's user; it runs through the CLI as the operator.
    stop = asyncio.Event()
    approver = asyncio.create_task(approve_everything(f"http://127.0.0.1:{port}", vms, stop))
    cli = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "pausepatch"),
        "--nats-url",
        secured.url("operator"),
        "rollout",
        "submit",
        "hv-agent-2026.11",
        "--patch-duration",
        "0.2",
        "--pause-budget",
        "5",
        "--wait",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(cli.communicate(), 60)
    finally:
        stop.set()
        await approver
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
    text = output.decode(errors="replace")
    assert cli.returncode == 0, text
    assert "completed" in text

    # Every host's event was approved through the notifier's user, every VM paused by its own
    # host's agent, and every guest clock set by clock-sync through that agent.
    assert {e.host for e in watcher.events(MaintenanceApproved)} == set(HOSTS)
    synced = await watcher.wait_for(
        lambda w: len(w.events(ClockSynced)) >= len(vms) and w.events(ClockSynced), 20, "clocks"
    )
    # The test driver has no guest clock: the host-agent answered so (over request/reply).
    assert {e.vm for e in synced} == set(vms)
    assert all("did not answer" not in (e.error or "") for e in synced), synced
    for event in watcher.events(VMPaused):
        assert event.vm in node_vms(event.host)

    # The planner dead-letters what it cannot read, with its own user.
    dead: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        dead.append(json.loads(msg.data))

    garbage = await secured.connect("notifier")
    try:
        await garbage.jetstream().publish(subjects.host_approved("hv-01"), b"\xffnot json")
    finally:
        await garbage.close()
    sub = await operator.jetstream().subscribe(
        subjects.dead_letter("*"),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=collect,
    )
    for _ in range(100):
        if any(d["service"] == "planner" for d in dead):
            break
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert any(
        d["service"] == "planner" and d["subject"] == subjects.host_approved("hv-01") for d in dead
    ), dead
    await watcher.stop()

    # The planner's user may read a host's clock results from the stream (what the planner
    # does when their delivery is late).
    as_planner = await secured.connect("planner")
    try:
        hv01 = sorted(node_vms("hv-01"))
        found = await clock_results_in_stream(
            as_planner.jetstream(), str(synced[0].rollout_id), "hv-01", hv01
        )
    finally:
        await as_planner.close()
    assert sorted(found) == hv01

    # The containers' health checks pass with each service's own login, and fail for an agent
    # that stopped.
    checks = {
        "planner": secured.healthcheck("planner", "planner"),
        "clock-sync": secured.healthcheck("clock-sync", "clock-sync"),
        "notifier": secured.healthcheck("notifier", "notifier", PP_LISTEN=f"127.0.0.1:{port}"),
        "host-agent": secured.healthcheck("host-agent", "host-agent-hv-01", PP_HOST="hv-01"),
    }
    assert {name: c.returncode for name, c in checks.items()} == dict.fromkeys(checks, 0), checks
    stack.services["host-agent-hv-03"].stop()
    for _ in range(50):  # its last pull request expires within a second
        info = await operator.jetstream().consumer_info(
            subjects.STREAM_NAME, "host-agent-hv-03-started"
        )
        if not info.num_waiting:
            break
        await asyncio.sleep(0.1)
    stopped = secured.healthcheck("host-agent", "host-agent-hv-03", PP_HOST="hv-03")
    assert stopped.returncode == 1 and "not consuming" in stopped.stderr

    # Nothing any service did was refused by the server.
    assert stack.nats is not None
    refused = [line for line in stack.nats.log_path.read_text().splitlines() if "Violation" in line]
    assert refused == []


def _started(host: str) -> bytes:
    return json.dumps(
        MaintenanceStarted(
            host=host,
            rollout_id="r-forged",
            scheduled_event_id="00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
            patch=PatchSpec(command="rm -rf /"),
            pause_budget_s=30,
        ).to_json()
    ).encode()


async def _stored(operator: Client, subject: str) -> bool:
    try:
        await operator.jetstream().get_last_msg(subjects.STREAM_NAME, subject)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_a_host_agent_cannot_publish_maintenance_or_another_hosts_events(
    secured: Secured, operator: Client
) -> None:
    secured.stack.start_service("planner", "planner", (), **secured.login("planner"))
    await wait_stream(operator)
    errors: list[str] = []
    agent = await secured.connect("host-agent-hv-01", errors)
    try:
        # Its own inventory is stored: the connection works.
        own = HostInventory(host="hv-01")
        ack = await agent.jetstream().publish(own.subject(), json.dumps(own.to_json()).encode())
        assert ack.seq > 0

        forged = {
            subjects.host_started("hv-01"): _started("hv-01"),
            subjects.host_inventory("hv-02"): json.dumps(
                HostInventory(host="hv-02").to_json()
            ).encode(),
            subjects.vm_resumed("hv-02", "web-2"): b"{}",
            subjects.host_planned("hv-01"): b"{}",
            subjects.rollout_command("submit"): b"{}",
        }
        for subject, body in forged.items():
            assert await refused_by_stream(agent, subject, body), subject
        await wait_for_errors(errors, lambda e: all(violated(e, s) for s in forged))

        # Nor may it read the whole bus, another host's commands, or anyone's replies but its
        # own (the planner's answers, other agents' clock readings, JetStream's API replies).
        await agent.subscribe(subjects.EVENTS_ROOT)
        await agent.subscribe(subjects.host_clock_command("hv-02"))
        await agent.subscribe("_INBOX.>")
        await agent.subscribe(subjects.inbox_prefix("planner") + ".>")
        await agent.subscribe(subjects.inbox_prefix("host-agent-hv-02") + ".>")
        await wait_for_errors(
            errors,
            lambda e: sum("permissions violation for subscription" in x.lower() for x in e) >= 5,
        )
    finally:
        await agent.close()
    for subject in (subjects.host_started("hv-01"), subjects.host_inventory("hv-02")):
        assert not await _stored(operator, subject), subject


async def test_a_service_started_as_a_user_without_its_consumers_permission_exits_saying_so(
    secured: Secured, operator: Client
) -> None:
    # clock-sync logged in as the notifier: the server drops its consumer's look-up (no
    # permission), which so gets no answer, only a violation reported to the connection. The
    # service must fail its start naming the refusal, not wait for an answer as it does while a
    # server restarts, nor pass for running.
    secured.stack.start_service("planner", "planner", (), **secured.login("planner"))
    await wait_stream(operator)
    proc = secured.stack.start_service(
        "clock-sync", "clock_sync", (), PP_JS_API_TIMEOUT_S="1", **secured.login("notifier")
    )
    assert proc.proc is not None
    code = await asyncio.to_thread(proc.proc.wait, 60)
    log = proc.log_tail(60)
    assert code != 0, log
    assert "refused by the NATS server" in log, log
    assert "clock-sync-resumed" in log and "permissions violation" in log.lower(), log
    assert "asking again" not in log, log


async def test_a_notifier_cannot_start_maintenance_and_strangers_cannot_log_in(
    secured: Secured, operator: Client
) -> None:
    bucket = nats_auth().ROLLOUTS_BUCKET
    secured.stack.start_service("planner", "planner", (), **secured.login("planner"))
    await wait_stream(operator)
    errors: list[str] = []
    notifier = await secured.connect("notifier", errors)
    try:
        approval = MaintenanceApproved(
            host="hv-01",
            rollout_id="r1",
            scheduled_event_id="00000000-0000-0000-0000-000000000002",  # type: ignore[arg-type]
            vm="web-1",
        )
        ack = await notifier.jetstream().publish(
            approval.subject(), json.dumps(approval.to_json()).encode()
        )
        assert ack.seq > 0

        assert await refused_by_stream(notifier, subjects.host_started("hv-01"), _started("hv-01"))
        with pytest.raises((TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await notifier.request(
                subjects.rollout_command("submit"),
                json.dumps({"update_id": "u", "patch": {"duration_s": 1}}).encode(),
                timeout=0.5,
            )
        # Nor acknowledge (and so take away) a message of another consumer: its replay is an
        # ordered consumer, which acknowledges nothing.
        foreign_ack = f"$JS.ACK.{subjects.STREAM_NAME}.planner-approved.1.1.1.0.0"
        await notifier.publish(foreign_ack, b"+ACK")
        # Nor purge the planner's rollouts, which only the planner forgets (retention).
        purge = f"$JS.API.STREAM.PURGE.KV_{bucket}"
        await notifier.publish(purge, b"{}")
        await wait_for_errors(
            errors,
            lambda e: (
                violated(e, subjects.host_started("hv-01"))
                and violated(e, subjects.rollout_command("submit"))
                and violated(e, foreign_ack)
                and violated(e, purge)
            ),
        )
    finally:
        await notifier.close()
    planner_errors: list[str] = []
    planner = await secured.connect("planner", planner_errors)
    try:
        js = planner.jetstream()
        stream = f"KV_{bucket}"
        for _ in range(200):  # the planner creates its bucket once it holds its lease
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.stream_info(stream)
                break
            await asyncio.sleep(0.05)
        prefix = f"$KV.{bucket}."
        assert await js.purge_stream(stream, subject=prefix + "h.r-gone.>")
        assert planner_errors == []
    finally:
        await planner.close()
    assert not await _stored(operator, subjects.host_started("hv-01"))
    assert await PlannerClient(operator).rollouts() == []

    # The operator commands the planner but cannot publish events either.
    assert await refused_by_stream(operator, subjects.host_started("hv-01"), _started("hv-01"))

    for user, password in (("host-agent-hv-01", "wrong"), (None, None)):
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(
                servers=[secured.stack.nats_url],
                user=user,
                password=password,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
            )
