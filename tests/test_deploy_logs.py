"""Structured logs as deployed: JSON lines in containers (PP_LOG_FORMAT=json, set by the images),
readable lines in a terminal; every line about a rollout, host or VM says which, with the trace id
of the host maintenance, so a log line leads to its trace in Jaeger."""

from __future__ import annotations

import json
import re
from typing import Any

from shared.client import EventWatcher, PlannerClient, connect
from shared.contracts import ClockSynced, RolloutStatus
from shared.devstack import LocalStack, ServiceProcess, wait_until
from tests.support.fleet import ready, sim_vms, start_core


def json_lines(proc: ServiceProcess) -> list[dict[str, Any]]:
    """The service's own log records (JSON objects) from its output."""
    records = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


async def test_json_log_lines_carry_rollout_host_vm_and_the_trace_id(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, PP_LOG_FORMAT="json")
    agent = stack.add_sim_host(
        "h1", sim_vms([("web-1", "web", 0), ("web-2", "web", 0)]), PP_LOG_FORMAT="json"
    )
    await ready(stack, client, watcher, ["h1"])
    rollout = await client.submit(
        {"update_id": "kernel-2026.11", "patch": {"duration_s": 0.1}, "notice_s": 0.5}
    )
    rollout_id = rollout["rollout_id"]
    await watcher.wait_for(
        lambda w: [
            e for e in w.events(RolloutStatus, rollout_id=rollout_id) if e.state == "completed"
        ],
        30,
        "the rollout",
    )
    await watcher.wait_for(lambda w: len(w.events(ClockSynced, rollout_id=rollout_id)) == 2, 10)
    report = await client.get(rollout_id)
    trace_id = report["hosts"][0]["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)

    # The host-agent's window line: which rollout, which host, and the host maintenance's trace.
    def window_line() -> dict[str, Any] | None:
        return next((r for r in json_lines(agent) if r["msg"].startswith("window closed")), None)

    wait_until(lambda: window_line() is not None, 5, "the host-agent's window log line")
    window = window_line()
    assert window is not None
    assert window["service"] == "host-agent" and window["level"] == "info"
    assert (window["rollout"], window["host"], window["trace_id"]) == (rollout_id, "h1", trace_id)
    assert "vm" not in window  # a host-level line names no VM

    # clock-sync's per-VM lines name the VM too, in the same trace (written after the event).
    def clock_lines() -> list[dict[str, Any]]:
        return [r for r in json_lines(stack.services["clock-sync"]) if r.get("vm")]

    wait_until(lambda: len(clock_lines()) >= 2, 5, "clock-sync's log lines")
    clock = clock_lines()
    assert {r["vm"] for r in clock} == {"web-1", "web-2"}
    for record in clock:
        assert (record["rollout"], record["host"], record["trace_id"]) == (
            rollout_id,
            "h1",
            trace_id,
        )


async def test_terminal_log_lines_are_readable_with_the_same_fields(stack: LocalStack) -> None:
    # LocalStack runs services with PP_LOG_FORMAT=text, as a terminal does (auto).
    start_core(stack, notifier=False, clock_sync=False)
    agent = stack.add_sim_host("h1", sim_vms([("web-1", "web", 0)]), PP_HEARTBEAT_S="60")
    nc = await connect(stack.nats_url)
    try:
        client, watcher = PlannerClient(nc), EventWatcher(nc)
        await ready(stack, client, watcher, ["h1"])
        rollout = await client.submit(
            {"update_id": "u", "patch": {"duration_s": 0.05}, "notice_s": 0.2}
        )
        wait_until(lambda: "window closed" in agent.log_path.read_text(), 20, "the window line")
        await watcher.stop()
    finally:
        await nc.close()
    line = next(x for x in agent.log_path.read_text().splitlines() if "window closed" in x)
    # `12:00:00.123 I host-agent window closed: ...  [rollout=... host=h1 trace=0123abcd]`
    pattern = (
        r"^\d\d:\d\d:\d\d\.\d{3} I host-agent window closed: .*"
        rf"\[rollout={rollout['rollout_id']} host=h1 trace=[0-9a-f]{{8}}\]$"
    )
    assert re.match(pattern, line), line


def test_every_line_a_container_writes_is_json(stack: LocalStack) -> None:
    planner = stack.start_service("planner", "planner", (), PP_LOG_FORMAT="json")
    wait_until(lambda: "lease acquired" in planner.log_path.read_text(), 20, "the planner")
    planner.stop()
    lines = [x for x in planner.log_path.read_text().splitlines() if x.strip()]
    not_json = [x for x in lines if not x.startswith("{")]
    assert not_json == []
