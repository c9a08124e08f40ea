"""What one host's maintenance costs its host-agent in CPU, against a plain libvirt loop.

    .venv/bin/python bench/bench_agent_cpu.py [--hosts 10] [--vms 20] [--rounds 10] [--repeat 3]

In the 1,000-host soak the agents use about half of all the CPU (bench_soak.py's
`cpu_s_during_rollout`), and on two cores every CPU-second of theirs stretches the control
plane's critical path. This bench isolates it: one host-agent process serving `--hosts`
simulated hosts (libvirt test driver, `--vms` VMs each, real-time windows as in the soak), on its
own nats-server (a free loopback port) with the planner declaring the stream and nothing else
running. The bench itself plays planner and clock-sync: for `--rounds` rounds, each host in turn
gets a `MaintenanceStarted` (patch `--patch-s`) and the bench waits for its
`MaintenanceCompleted`; then, as clock-sync does after the resumes, one clock request for every
VM of the host. Nothing overlaps, so the agent's CPU per window and per clock request is its
own, read from `/proc` (the main thread, where the bus and the events are handled, apart).
Before the windows, the agent's CPU at rest is measured too (per process, and per host served).

The baseline, measured in the same run: the soak's direct loop (`bench_soak._direct_worker`, a
process with a libvirt connection per host) runs the same windows, one host at a time: suspend
every VM, the same patch, resume every VM, at the same real-time priority. Figures: the agent's
CPU per window as a ratio against the direct loop's (median and p99 of the rounds' per-window
means), what a clock request and rest cost it, and the events it stored per window. Prints
a table and writes bench/results/agent-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_soak import _direct_worker, cpu_s, machine_speed, pct, run_s, write_result

from shared import subjects
from shared.bus import stream_declared
from shared.contracts import ClockAction, MaintenanceStarted, PatchSpec
from shared.devstack import LocalStack, SimVM, sim_node_xml, temp_workdir

RESULTS = Path(__file__).resolve().parent / "results" / "agent-cpu.json"


def vm_names(host: str, vms: int) -> list[str]:
    return [f"{host}-vm{j:02d}" for j in range(vms)]


async def drive(url: str, agent_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """Play planner and clock-sync for the agent; measure its CPU at rest, per window, per clock
    request."""
    hosts = [f"h{i:03d}" for i in range(args.hosts)]
    nc = await nats.connect(url)
    js = nc.jetstream()
    completed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_completed(msg: Any) -> None:
        completed.put_nowait(json.loads(msg.data))

    await nc.subscribe(subjects.host_completed(), cb=on_completed)
    # The planner declares the stream as it starts.
    await asyncio.wait_for(stream_declared(js), 120)

    async def window(host: str, timeout: float = 30) -> dict[str, Any]:
        start = MaintenanceStarted(
            host=host,
            rollout_id="bench-agent-cpu",
            scheduled_event_id=uuid.uuid4(),
            patch=PatchSpec(duration_s=args.patch_s),
            pause_budget_s=10,
        )
        await js.publish(
            start.subject(),
            start.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(start.event_id)},
        )
        done = await asyncio.wait_for(completed.get(), timeout)
        if done["host"] != host or not done["ok"]:
            raise RuntimeError(f"window of {host} did not complete as expected: {done}")
        return done

    async def clock(host: str) -> None:
        body = json.dumps(ClockAction(vms=vm_names(host, args.vms), action="sync").to_json())
        reply = await nc.request(subjects.host_clock_command(host), body.encode(), timeout=10)
        readings = json.loads(reply.data)["readings"]
        if len(readings) != args.vms:
            raise RuntimeError(f"{len(readings)} clock readings for {args.vms} VMs of {host}")

    # Every host once, unmeasured: first windows warm caches and threads up (the first waits in
    # the stream until the agent, still starting, has its consumer).
    for host in hosts:
        await window(host, timeout=180)
        await clock(host)
    await asyncio.sleep(0.5)  # the last window's inventory

    # At rest.
    before, started = run_s(agent_pid), time.perf_counter()
    await asyncio.sleep(args.idle_s)
    idle_ms_per_s = (run_s(agent_pid) - before) * 1000 / (time.perf_counter() - started)

    per_window: list[float] = []
    per_clock: list[float] = []
    main_thread = in_windows = 0.0
    windows = 0
    ticks_from = cpu_s(agent_pid)
    stored_from = (await js.stream_info(subjects.STREAM_NAME)).state.messages
    for _ in range(args.rounds):
        before, before_main = run_s(agent_pid), run_s(agent_pid, agent_pid)
        for _ in range(args.repeat):
            for host in hosts:
                await window(host)
        # Each window's inventory goes out 0.1 s after it closes: counted with its window.
        await asyncio.sleep(0.3)
        after_windows = run_s(agent_pid)
        main_thread += run_s(agent_pid, agent_pid) - before_main
        in_windows += after_windows - before
        for _ in range(args.repeat):
            for host in hosts:
                await clock(host)
        n = len(hosts) * args.repeat
        per_window.append((after_windows - before) * 1000 / n)
        per_clock.append((run_s(agent_pid) - after_windows) * 1000 / n)
        windows += n
    ticks = cpu_s(agent_pid) - ticks_from
    # What the agent stored per window: the stream's growth, less the starts sent.
    stored = (await js.stream_info(subjects.STREAM_NAME)).state.messages - stored_from - windows
    measured = sum(per_window + per_clock) * len(hosts) * args.repeat / 1000
    await nc.close()
    return {
        "windows": windows,
        "events_stored_per_window": round(stored / windows, 2),
        "agent_cpu_ms_per_window": per_window,
        "agent_cpu_ms_per_clock_request": per_clock,
        "agent_main_thread_share": round(main_thread / max(1e-9, in_windows), 3),
        "agent_idle_ms_per_s": round(idle_ms_per_s, 3),
        # Cross-check against the kernel's ticks for the whole process (threads that ended
        # included): the two agree within the ticks' resolution.
        "agent_cpu_s_measured": round(measured, 3),
        "agent_cpu_s_ticks": round(ticks, 3),
    }


def direct_windows(
    nodes: dict[str, str], rounds: int, repeat: int, patch_s: float, rt: int
) -> list[float]:
    """The baseline's CPU per window (ms), one mean per round: the soak's direct worker, one
    host at a time."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_direct_worker, args=(theirs, nodes, patch_s, rt))
    proc.start()
    try:
        if not ours.poll(120) or ours.recv() != "ready":
            raise RuntimeError("the direct loop did not start")
        assert proc.pid is not None
        for host in nodes:  # warm-up, as for the agent
            ours.send([host])
            ours.recv()
        per_window = []
        for _ in range(rounds):
            before = run_s(proc.pid)
            for _ in range(repeat):
                for host in nodes:
                    ours.send([host])
                    ours.recv()
            per_window.append((run_s(proc.pid) - before) * 1000 / (len(nodes) * repeat))
        return per_window
    finally:
        ours.send(None)
        proc.join(10)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    speed = machine_speed()
    hosts = {f"h{i:03d}": vm_names(f"h{i:03d}", args.vms) for i in range(args.hosts)}
    with temp_workdir("pausepatch-agent-cpu-") as workdir:
        nodes = {}
        for host, names in hosts.items():
            node = workdir / "direct" / f"{host}.xml"
            node.parent.mkdir(parents=True, exist_ok=True)
            node.write_text(sim_node_xml([SimVM(n) for n in names]))
            nodes[host] = str(node)
        direct = direct_windows(nodes, args.rounds, args.repeat, args.patch_s, args.rt_priority)

        stack = LocalStack(
            workdir,
            extra_env={
                # Heartbeats out of the measured rounds: an unchanged inventory is not sent
                # anyway, and listing the VMs is counted in the rest.
                "PP_HEARTBEAT_S": "3600",
                "PP_LOG_LEVEL": "WARNING",
                "PP_RT_PRIORITY": str(args.rt_priority),
            },
        )
        stack.start_nats()
        try:
            stack.start_service("planner", "planner")
            agent = stack.add_sim_fleet(
                "agents", {h: [SimVM(n) for n in names] for h, names in hosts.items()}
            )
            assert agent.proc is not None
            measured = await asyncio.wait_for(drive(stack.nats_url, agent.proc.pid, args), 900)
        finally:
            stack.stop()

    per_window = measured["agent_cpu_ms_per_window"]
    per_clock = measured["agent_cpu_ms_per_clock_request"]
    ratios = [a / d for a, d in zip(per_window, direct, strict=True) if d > 0]
    result: dict[str, Any] = {
        "hosts": args.hosts,
        "vms": args.vms,
        "rounds": args.rounds,
        "patch_s": args.patch_s,
        "rt_priority": args.rt_priority,
        "windows": measured["windows"],
        "repeat": args.repeat,
        "events_stored_per_window": measured["events_stored_per_window"],
        "agent_cpu_ms_per_window_median": round(statistics.median(per_window), 3),
        "agent_cpu_ms_per_window_p99": round(pct(per_window, 0.99), 3),
        "direct_cpu_ms_per_window_median": round(statistics.median(direct), 3),
        "direct_cpu_ms_per_window_p99": round(pct(direct, 0.99), 3),
        "agent_vs_direct_median": round(statistics.median(ratios), 2) if ratios else None,
        "agent_vs_direct_p99": round(pct(ratios, 0.99), 2) if ratios else None,
        "agent_main_thread_share": measured["agent_main_thread_share"],
        "agent_cpu_ms_per_clock_request_median": round(statistics.median(per_clock), 3),
        "agent_cpu_ms_per_clock_request_p99": round(pct(per_clock, 0.99), 3),
        "agent_idle_ms_per_s": measured["agent_idle_ms_per_s"],
        "agent_idle_ms_per_s_per_host": round(measured["agent_idle_ms_per_s"] / args.hosts, 4),
        "agent_cpu_s_measured": measured["agent_cpu_s_measured"],
        "agent_cpu_s_ticks": measured["agent_cpu_s_ticks"],
        "machine_speed": speed,
    }
    if args.out is not None:
        write_result(result, args.out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="windows per host per round")
    parser.add_argument("--patch-s", type=float, default=0.02)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--rt-priority", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    table = Table(title="host-agent CPU per window (ms), against a plain libvirt loop")
    table.add_column("what")
    table.add_column("median", justify="right")
    table.add_column("p99", justify="right")
    table.add_row(
        "agent, per window",
        str(result["agent_cpu_ms_per_window_median"]),
        str(result["agent_cpu_ms_per_window_p99"]),
    )
    table.add_row(
        "direct loop, per window",
        str(result["direct_cpu_ms_per_window_median"]),
        str(result["direct_cpu_ms_per_window_p99"]),
    )
    table.add_row(
        "agent / direct", str(result["agent_vs_direct_median"]), str(result["agent_vs_direct_p99"])
    )
    table.add_row(
        "agent, per clock request",
        str(result["agent_cpu_ms_per_clock_request_median"]),
        str(result["agent_cpu_ms_per_clock_request_p99"]),
    )
    Console().print(table)
    for key in (
        "agent_main_thread_share",
        "agent_idle_ms_per_s",
        "agent_idle_ms_per_s_per_host",
        "agent_cpu_s_measured",
        "agent_cpu_s_ticks",
    ):
        print(f"{key:<32} {result[key]}")


if __name__ == "__main__":
    main()
