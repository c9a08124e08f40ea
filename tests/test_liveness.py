"""A replica's own liveness (`shared/liveness.py`): its batch loops' turns on a real nats-server,
the file clock-sync writes, and what the containers' health check reads from it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from faststream.nats import JStream, NatsBroker, PullSub

from shared import liveness, subjects
from shared.client import EventWatcher, PlannerClient
from shared.devstack import REPO, LocalStack, NatsServer
from tests.support.fleet import eventually, ready, start_core

HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


def batches(broker: NatsBroker, durable: str, subject: str) -> Any:
    """A batch pull subscriber, as the services make theirs."""
    return broker.subscriber(
        subject,
        stream=JStream(subjects.STREAM_NAME, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=256, timeout=0.05, batch=True),
    )


async def test_a_loop_stuck_in_its_handler_is_named_and_an_idle_one_is_not(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(liveness, "LOOP_STALL_S", 0.5)
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(name=subjects.STREAM_NAME, subjects=[subjects.EVENTS_ROOT])
    broker = NatsBroker(nats_server.url)
    entered, release = asyncio.Event(), asyncio.Event()

    @batches(broker, "stuck", subjects.vm_resumed())
    async def on_resumed(body: list[Any]) -> None:
        entered.set()
        await release.wait()  # a handler that does not return, until the test says so

    @batches(broker, "idle", subjects.vm_clock())
    async def on_clock(body: list[Any]) -> None:
        raise AssertionError("nothing is published there")

    await broker.start()
    try:
        await eventually(lambda: {"stuck", "idle"} <= set(liveness._turns), "both loops turn", 10)
        await nc.jetstream().publish(subjects.vm_resumed("h1", "vm0"), b"{}")
        await asyncio.wait_for(entered.wait(), 10)
        await eventually(lambda: liveness.stalled() == ["stuck"], "the stuck loop is named", 10)
        liveness.write(tmp_path, "clock-sync")
        (problem,) = liveness.problems(tmp_path, "clock-sync")
        assert "consumer stuck has not turned" in problem, problem
        release.set()
        await eventually(lambda: liveness.stalled() == [], "the loop turns again", 10)
        liveness.write(tmp_path, "clock-sync")
        assert liveness.problems(tmp_path, "clock-sync") == []
    finally:
        release.set()
        await broker.stop()
        await nc.close()
    assert not {"stuck", "idle"} & set(liveness._turns)  # stopped loops are forgotten


def test_a_file_not_written_lately_or_unreadable_is_a_problem_and_a_dead_process_file_is_not(
    tmp_path: Path,
) -> None:
    path = liveness.write(tmp_path, "clock-sync")
    assert liveness.problems(tmp_path, "clock-sync") == []
    later = time.time() + liveness.FILE_STALE_S + 5
    (problem,) = liveness.problems(tmp_path, "clock-sync", now=later)
    assert "not written for" in problem, problem
    path.write_text("{not json")
    (problem,) = liveness.problems(tmp_path, "clock-sync")
    assert "unreadable" in problem, problem
    # A file left by a process that is gone (a pid no process has) is passed over.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path.unlink()
    stale = liveness.path_for(tmp_path, "clock-sync", pid=gone.pid)
    stale.write_text(json.dumps({"written_at": 0, "stalled": ["x"]}))
    assert liveness.problems(tmp_path, "clock-sync") == []
    # Another service's file is not this one's.
    assert liveness.problems(tmp_path, "planner") == []


async def test_clock_sync_writes_its_liveness_and_its_health_check_reads_it(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    await ready(stack, client, watcher, [])
    proc = stack.services["clock-sync"]
    assert proc.proc is not None
    state_dir = Path(stack.env()["PP_STATE_DIR"])
    path = state_dir / f"clock-sync-{socket.gethostname()}-{proc.proc.pid}.alive"

    def written() -> bool:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return "clock-sync-resumed" in body["loops"] and body["stalled"] == []

    await eventually(written, "clock-sync's liveness file", 30)
    assert liveness.problems(state_dir, "clock-sync") == []

    def health_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), "clock-sync"],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    check = health_check()
    assert check.returncode == 0, check.stderr
    # Another live replica of the same container (here: this test's own process) whose loop
    # is stuck: unhealthy, named, although the shared consumer is being pulled from.
    other = liveness.path_for(state_dir, "clock-sync", pid=os.getpid())
    other.write_text(json.dumps({"written_at": time.time(), "stalled": ["clock-sync-resumed"]}))
    try:
        check = health_check()
    finally:
        other.unlink()
    assert check.returncode == 1, check.stderr
    assert "consumer clock-sync-resumed has not turned" in check.stderr, check.stderr
    assert proc.stop() == 0
    assert not path.exists()  # removed by a replica that stops
