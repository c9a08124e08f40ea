"""What a resumed VM's clock costs clock-sync in CPU, against a bare nats-py loop doing the same.

    .venv/bin/python bench/bench_clock_sync.py [--hosts 50] [--vms 20] [--rounds 10]

In the 1,000-host soak clock-sync's two replicas use about as much CPU as the planner and the
notifier, and all of it on the path from one wave to the next (the clock tail: a wave ends with
its last clock result). This bench isolates it: one clock-sync process on its own nats-server (a
free loopback port), the planner declaring the stream and nothing else running. The bench plays
the host-agents: each round, every host's `--vms` `VMResumed` are stored at once, as an agent
stores them when its window closes, and each host's clock request is answered at once (every
clock set, as the test driver's agent answers). A round ends when every VM's result is in its
host's `HostClockSynced`. clock-sync's CPU per VM is read from the scheduler's accounting.

The baseline, measured in the same run once clock-sync is stopped: a bare nats-py loop in a
process of its own doing what each resume needs and nothing else (a durable pull consumer
fetched 256 at a time, each resume parsed into its model, one request per host, each VM's
`ClockSynced` and one `HostClockSynced` per host published and their acks awaited, each resume
acknowledged). No de-duplication, no retries, no trace context, no dead letters: what clock-sync
adds to that is what its reliability costs. Figures: CPU per VM (ms), median and p99 of the
rounds, and their ratio. Prints a table and writes bench/results/clock-sync-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent_cpu import run_s
from bench_soak import machine_speed, pct, write_result

from shared import subjects
from shared.bus import stream_declared
from shared.contracts import (
    ClockAction,
    ClockReading,
    ClockReadings,
    ClockSynced,
    HostClockSynced,
    VMClock,
    VMResumed,
    utcnow,
)
from shared.devstack import LocalStack, temp_workdir

RESULTS = Path(__file__).resolve().parent / "results" / "clock-sync-cpu.json"


class Fleet:
    """The bench's side: the agents' resumes and clock answers, and the results counted."""

    def __init__(self, nc: Any, hosts: int, vms: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.hosts = [f"h{i:03d}" for i in range(hosts)]
        self.vms = vms
        self.synced = 0
        self.changed = asyncio.Event()

    async def start(self) -> None:
        async def answer(msg: Any) -> None:
            action = ClockAction.model_validate_json(msg.data)
            readings = ClockReadings(
                readings=[
                    ClockReading(
                        vm=vm, ok=True, method="host-time", skew_before_ms=-120.0, skew_after_ms=0.1
                    )
                    for vm in action.vms
                ]
            )
            await msg.respond(readings.model_dump_json().encode())

        async def counted(msg: Any) -> None:
            self.synced += len(json.loads(msg.data)["clocks"])
            self.changed.set()

        await self.nc.subscribe(subjects.host_clock_command(), cb=answer)
        await self.nc.subscribe(subjects.host_clock(), cb=counted)

    async def round(self, timeout: float = 60) -> None:
        """Every host's VMs resumed at once; until every VM has its clock result."""
        target = self.synced + len(self.hosts) * self.vms
        acks = []
        now = utcnow()
        for host in self.hosts:
            # One window's trace context (unrecorded), shared by its VMs' events.
            traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00"
            for j in range(self.vms):
                event = VMResumed(
                    host=host,
                    vm=f"{host}-vm{j:02d}",
                    rollout_id="bench-clock-sync",
                    paused_at=now,
                    resumed_at=now,
                    paused_ms=100.0,
                    budget_ms=30_000.0,
                )
                acks.append(
                    await self.js.publish_async(
                        event.subject(),
                        event.model_dump_json().encode(),
                        headers={"Nats-Msg-Id": str(event.event_id), "traceparent": traceparent},
                    )
                )
        await asyncio.gather(*acks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.synced < target:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - loop.time()))


async def measure(fleet: Fleet, pid: int, rounds: int) -> list[float]:
    """CPU per VM (ms) of process `pid`, one figure per round, after one round unmeasured."""
    await fleet.round(timeout=180)  # warm-up: consumers created, caches filled
    per_vm = []
    for _ in range(rounds):
        before = run_s(pid)
        await fleet.round()
        per_vm.append((run_s(pid) - before) * 1000 / (len(fleet.hosts) * fleet.vms))
    return per_vm


def _bare_worker(url: str, conn: Connection) -> None:
    asyncio.run(_bare(url, conn))


async def _bare(url: str, conn: Connection) -> None:
    """The baseline: each resume's minimum, in nats-py, until told to stop."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subjects.vm_resumed(),
        durable="bench-bare-resumed",
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1
        ),
    )
    conn.send("ready")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(conn.fileno(), stop.set)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(256, timeout=0.05)
        except nats.errors.TimeoutError:
            continue
        hosts: dict[str, list[tuple[VMResumed, Any]]] = {}
        for msg in msgs:
            event = VMResumed.model_validate_json(msg.data)
            hosts.setdefault(event.host, []).append((event, msg))
        for host, group in hosts.items():
            action = ClockAction(vms=[e.vm for e, _ in group], action="sync")
            reply = await nc.request(
                subjects.host_clock_command(host), action.model_dump_json().encode(), timeout=10
            )
            readings = ClockReadings.model_validate_json(reply.data).readings
            results = [
                ClockSynced(
                    host=e.host,
                    vm=e.vm,
                    rollout_id=e.rollout_id,
                    ok=r.ok,
                    skew_before_ms=r.skew_before_ms,
                    skew_after_ms=r.skew_after_ms,
                    method=r.method,
                    attempts=1,
                )
                for (e, _), r in zip(group, readings, strict=True)
            ]
            host_result = HostClockSynced(
                host=host,
                rollout_id=group[0][0].rollout_id,
                clocks={s.vm: VMClock.of(s) for s in results},
            )
            acks = [
                await js.publish_async(
                    e.subject(),
                    e.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": str(e.event_id)},
                )
                for e in (*results, host_result)
            ]
            await asyncio.gather(*acks)
            for _, msg in group:
                await msg.ack()
    await nc.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    speed = machine_speed()
    with temp_workdir("pausepatch-clock-sync-cpu-") as workdir:
        stack = LocalStack(workdir, extra_env={"PP_LOG_LEVEL": "WARNING"})
        stack.start_nats()
        try:
            stack.start_service("planner", "planner")
            nc = await nats.connect(stack.nats_url)
            await asyncio.wait_for(stream_declared(nc.jetstream()), 120)
            fleet = Fleet(nc, args.hosts, args.vms)
            await fleet.start()

            service = stack.start_service("clock-sync", "clock_sync")
            assert service.proc is not None
            ours = await measure(fleet, service.proc.pid, args.rounds)
            service.stop()

            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            bare = ctx.Process(target=_bare_worker, args=(stack.nats_url, child))
            bare.start()
            try:
                if not parent.poll(60) or parent.recv() != "ready":
                    raise RuntimeError("the bare loop did not start")
                assert bare.pid is not None
                baseline = await measure(fleet, bare.pid, args.rounds)
            finally:
                parent.send("stop")
                bare.join(10)
            synced = fleet.synced
            await nc.close()
        finally:
            stack.stop()

    ratios = [a / b for a, b in zip(ours, baseline, strict=True) if b > 0]
    result: dict[str, Any] = {
        "hosts": args.hosts,
        "vms": args.vms,
        "rounds": args.rounds,
        "clock_sync_cpu_ms_per_vm_median": round(statistics.median(ours), 4),
        "clock_sync_cpu_ms_per_vm_p99": round(pct(ours, 0.99), 4),
        "bare_cpu_ms_per_vm_median": round(statistics.median(baseline), 4),
        "bare_cpu_ms_per_vm_p99": round(pct(baseline, 0.99), 4),
        "clock_sync_vs_bare_median": round(statistics.median(ratios), 2),
        "clock_sync_vs_bare_p99": round(pct(ratios, 0.99), 2),
        "vms_synced": synced,
        "clock_sync_cpu_ms_per_vm": [round(v, 4) for v in ours],
        "bare_cpu_ms_per_vm": [round(v, 4) for v in baseline],
        "machine_speed": speed,
    }
    if args.out is not None:
        write_result(result, args.out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    table = Table(title="clock-sync CPU per resumed VM (ms), against a bare nats-py loop")
    for column in ("what", "median", "p99"):
        table.add_column(column, justify="right" if column != "what" else "left")
    table.add_row(
        "clock-sync",
        f"{result['clock_sync_cpu_ms_per_vm_median']:.4f}",
        f"{result['clock_sync_cpu_ms_per_vm_p99']:.4f}",
    )
    table.add_row(
        "bare nats-py loop",
        f"{result['bare_cpu_ms_per_vm_median']:.4f}",
        f"{result['bare_cpu_ms_per_vm_p99']:.4f}",
    )
    table.add_row(
        "clock-sync / bare",
        f"{result['clock_sync_vs_bare_median']:.2f}",
        f"{result['clock_sync_vs_bare_p99']:.2f}",
    )
    Console().print(table)
    if args.out is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
