"""The `pausepatch` command line against a running system: real processes, real bus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.client import EventWatcher, PlannerClient
from shared.devstack import LocalStack, free_port
from tests.support.fleet import ready, sim_vms, start_core

CLI = [sys.executable, "-c", "from shared.cli import main; main()"]


def cli(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--nats-url", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def test_operator_runs_a_rollout_and_reads_the_report(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False)
    stack.add_sim_host("h1", sim_vms([("a", "web", 0), ("b", None, None)]))
    await ready(stack, client, watcher, ["h1"])
    url = stack.nats_url

    hosts = cli(url, "hosts", "--json")
    assert hosts.returncode == 0, hosts.stderr
    assert [h["host"] for h in json.loads(hosts.stdout)] == ["h1"]

    submitted = cli(
        url, "rollout", "submit", "cli-update", "--patch-command", "true", "--notice", "0.2",
        "--pause-budget", "5", "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "completed" in submitted.stdout and "h1" in submitted.stdout

    rollout_id = (await client.rollouts())[0]["rollout_id"]
    report = json.loads(cli(url, "report", rollout_id, "--json").stdout)
    host = report["hosts"][0]
    assert host["state"] == "done" and set(host["vm_records"]) == {"a", "b"}
    assert all(r["paused_ms"] > 0 for r in host["vm_records"].values())

    listed = cli(url, "rollout", "list")
    assert listed.returncode == 0 and rollout_id in listed.stdout


async def test_errors_are_one_clear_line_and_a_non_zero_exit(
    stack: LocalStack, bus: tuple[PlannerClient, EventWatcher]
) -> None:
    client, watcher = bus
    start_core(stack, notifier=False, clock_sync=False)
    stack.add_sim_host("h1", sim_vms([("a", "web", 0)]))
    await ready(stack, client, watcher, ["h1"])

    missing = cli(stack.nats_url, "rollout", "status", "r-nope")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not-found" in missing.stderr

    too_long = cli(
        stack.nats_url, "rollout", "submit", "u", "--patch-duration", "1", "--pause-budget", "45"
    )
    assert too_long.returncode == 2 and "pause_budget_s" in too_long.stderr

    nobody = cli(f"nats://127.0.0.1:{free_port()}", "hosts", timeout=30)
    assert nobody.returncode == 3 and nobody.stderr.count("\n") == 1
    assert "cannot reach NATS" in nobody.stderr
