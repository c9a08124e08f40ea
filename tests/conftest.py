"""Fixtures for real components: our own nats-server per test, a real OTLP receiver, the services
as separate processes, and a bus client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from shared.client import EventWatcher, PlannerClient, connect
from shared.devstack import LocalStack, NatsServer
from tests.support import qemu
from tests.support.otlp import OtlpReceiver


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def nats_server(workdir: Path) -> Iterator[NatsServer]:
    """A real `nats-server -js` of this test's own, on a free loopback port."""
    server = NatsServer(workdir).start()
    yield server
    server.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver on a free loopback port."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def stack(
    workdir: Path, otlp: OtlpReceiver, request: pytest.FixtureRequest
) -> Iterator[LocalStack]:
    """nats-server plus services started by the test as OS processes, exporting traces to `otlp`.

    On failure, the tail of every service's log is printed.
    """
    local = LocalStack(
        workdir,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "PP_HEARTBEAT_S": "2",
        },
    )
    local.start_nats()
    yield local
    failed = getattr(request.node, "rep_call", None)
    local.stop()
    if failed is not None and failed.failed:
        for proc in local.services.values():
            print(f"\n===== {proc.name} (log tail) =====\n{proc.log_tail(60)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


@pytest.fixture
async def bus(stack: LocalStack) -> AsyncIterator[tuple[PlannerClient, EventWatcher]]:
    """A planner client and a watcher of every event, on the stack's server."""
    nc = await connect(stack.nats_url)
    watcher = EventWatcher(nc)
    yield PlannerClient(nc), watcher
    await watcher.stop()
    await nc.close()


@dataclass(frozen=True)
class QemuHost:
    """Real QEMU guests under libvirtd, booted once for the session."""

    uri: str
    guests: list[str]
    """Guests whose qemu-guest-agent answers."""
    no_agent: str
    """A guest defined without a guest-agent channel."""

    def domain(self, name: str) -> libvirt.virDomain:
        """A fresh handle on one guest."""
        return libvirt.open(self.uri).lookupByName(name)

    def states(self) -> dict[str, int]:
        """libvirt state of every guest."""
        conn = libvirt.open(self.uri)
        try:
            return {n: conn.lookupByName(n).state()[0] for n in [*self.guests, self.no_agent]}
        finally:
            conn.close()


QEMU_GUESTS: dict[str, qemu.Placement] = {
    "pp-qt-1": {"availability_set": "web", "update_domain": 0, "ip": "127.0.2.1"},
    "pp-qt-2": {"availability_set": "web", "update_domain": 0, "ip": "127.0.2.2"},
    "pp-qt-3": {"availability_set": "db", "update_domain": 1, "ip": "127.0.2.3"},
}
QEMU_NO_AGENT = "pp-qt-noagent"


@pytest.fixture(scope="session")
def qemu_session() -> Iterator[QemuHost]:
    """libvirtd started (never silently skipped: it fails and says why), the tiny guest built,
    three guests with qemu-guest-agent and one without booted."""
    uri = qemu.ensure_libvirtd()
    kernel, initrd = qemu.build_guest()
    qemu.destroy_guests(uri, "pp-qt-")
    placements: dict[str, qemu.Placement] = {**QEMU_GUESTS, QEMU_NO_AGENT: {"ip": "127.0.2.9"}}
    qemu.boot_guests(uri, placements, kernel, initrd, without_agent={QEMU_NO_AGENT})
    try:
        for name in QEMU_GUESTS:
            qemu.wait_guest_agent(uri, name)
        yield QemuHost(uri, list(QEMU_GUESTS), QEMU_NO_AGENT)
    finally:
        qemu.destroy_guests(uri, "pp-qt-")


@pytest.fixture
def qemu_host(qemu_session: QemuHost) -> Iterator[QemuHost]:
    """The session's guests, every one running at the start."""
    conn = libvirt.open(qemu_session.uri)
    try:
        for name in [*qemu_session.guests, qemu_session.no_agent]:
            dom = conn.lookupByName(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
    finally:
        conn.close()
    yield qemu_session
