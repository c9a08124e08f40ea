"""Fixtures for real components: our own nats-server per test, a real OTLP receiver, the services
as separate processes, and a bus client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.client import EventWatcher, PlannerClient, connect
from shared.devstack import LocalStack, NatsServer
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
