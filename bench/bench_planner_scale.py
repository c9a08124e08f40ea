"""The planner's own cost per host at fleet scale, against the writes it cannot avoid.

    .venv/bin/python bench/bench_planner_scale.py [--sizes 200 1000 5000] [--runs 3] [--out F]

For each fleet size, a rollout engine over a real JetStream KV bucket (its own `nats-server
-js` on a free loopback port, a fresh bucket per run) plans a rollout of that many hosts
(`bench_planning.make_fleet`, round-robin placement, 20 VMs a host, 100 hosts in flight, no
notice, no patch) and takes every host through it: each wave's starts, then every host's
`MaintenanceCompleted` handled 16 at a time, as the planner's completion consumer does. The
engine's messages are kept in a list: the bus's publishing is the soak's business
(`bench_soak.py`), this bench is the planner's state and bookkeeping alone.

The baseline, measured in the same run against the same server: the KV writes no planner can
do without, one create per host record at submit and one update per host at its completion
(a record of the same size), 16 at a time, and each wave's records written twice (notice and
start), all of the wave at once. Figures: submit time, per-completion time (median and p99,
and the mean over the rollout), time per wave transition, each as a ratio against its baseline;
KV writes, and the size of the rollout's own record at the end (the plan is not in it). Prints
a table and writes bench/results/planner-scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_planning import make_fleet
from opentelemetry.sdk.trace import TracerProvider

from services.planner.engine import RolloutEngine
from services.planner.state import HostRun, RolloutStore
from services.planner.waves import plan_waves
from shared.client import connect
from shared.contracts import (
    Event,
    HostInventory,
    MaintenanceCompleted,
    MaintenanceStarted,
    PatchSpec,
    RolloutSubmit,
    utcnow,
)
from shared.devstack import NatsServer

RESULTS = Path(__file__).resolve().parent / "results" / "planner-scale.json"
IN_FLIGHT = 100
WORKERS = 16
"""Completions handled at once: the planner's completion consumer's `max_workers`."""


class Clock:
    """The engine's time, moved by the bench between waves (no notice to wait for)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _bounded(jobs: list[Any], workers: int) -> list[float]:
    """Run the coroutine factories `jobs`, `workers` at a time; each one's time in ms."""
    gate = asyncio.Semaphore(workers)
    times: list[float] = []

    async def one(job: Any) -> None:
        async with gate:
            t0 = time.perf_counter()
            await job()
            times.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(one(job) for job in jobs))
    return times


async def baseline(js: Any, bucket: str, waves: list[list[str]]) -> dict[str, Any]:
    """The floor: one create per host record, 16 at a time; each wave's records written twice,
    all of the wave at once; one update per host, 16 at a time."""
    hosts = [h for wave in waves for h in wave]
    kv = await js.create_key_value(bucket=bucket, history=1)
    record = HostRun(
        rollout_id="r-baseline", host=hosts[0], wave=0, vms=[f"vm-{i:02d}" for i in range(20)]
    )
    revisions: dict[str, int] = {}

    def create(host: str) -> Any:
        async def job() -> None:
            data = record.model_copy(update={"host": host}).model_dump_json().encode()
            revisions[host] = await kv.create(f"h.r-baseline.{host}", data)

        return job

    def update(host: str) -> Any:
        async def job() -> None:
            done = record.model_copy(update={"host": host, "state": "done", "ok": True})
            data = done.model_dump_json().encode()
            revisions[host] = await kv.update(f"h.r-baseline.{host}", data, last=revisions[host])

        return job

    t0 = time.perf_counter()
    await _bounded([create(h) for h in hosts], WORKERS)
    submit_ms = (time.perf_counter() - t0) * 1000
    # A wave's transition: its hosts' records written twice (notice, start), each round at once.
    t0 = time.perf_counter()
    for wave in waves:
        for _ in ("notice", "start"):
            await _bounded([update(h) for h in wave], len(wave))
    waves_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    completion_ms = await _bounded([update(h) for h in hosts], WORKERS)
    completions_total_ms = (time.perf_counter() - t0) * 1000
    await js.delete_key_value(bucket)
    return {
        "submit_ms": submit_ms,
        "advance_ms": waves_ms,
        "completion_ms_median": statistics.median(completion_ms),
        "completion_ms_p99": pct(completion_ms, 0.99),
        "completions_total_ms": completions_total_ms,
    }


async def engine_run(js: Any, bucket: str, fleet: dict[str, list[Any]]) -> dict[str, Any]:
    """A whole rollout of `fleet` through a real engine and store; what each part cost."""
    kv = await js.create_key_value(bucket=bucket, history=1)
    published: list[Event] = []

    async def publish(event: Event) -> None:
        published.append(event)

    clock = Clock()
    store = RolloutStore(kv, js, bucket)
    engine = RolloutEngine(store, publish, TracerProvider().get_tracer("bench"), now=clock)
    for host, vms in fleet.items():
        engine.on_inventory(HostInventory(host=host, vms=vms, occurred_at=clock.now))
    request = RolloutSubmit(
        update_id="bench",
        patch=PatchSpec(duration_s=0),
        notice_s=0,
        max_hosts_in_flight=IN_FLIGHT,
    )
    t0 = time.perf_counter()
    rollout = await engine.submit(request)
    submit_ms = (time.perf_counter() - t0) * 1000

    def complete(started: MaintenanceStarted) -> Any:
        async def job() -> None:
            await engine.on_completed(
                MaintenanceCompleted(
                    host=started.host,
                    rollout_id=started.rollout_id,
                    scheduled_event_id=started.scheduled_event_id,
                    ok=True,
                    window_ms=1,
                    patch_ms=0,
                    overhead_ms=0,
                )
            )

        return job

    completion_ms: list[float] = []
    completions_total_ms = advance_ms = 0.0
    seen = 0
    while rollout.state == "running":
        clock.now += timedelta(seconds=1)
        t0 = time.perf_counter()
        await engine.advance()
        advance_ms += (time.perf_counter() - t0) * 1000
        started = [e for e in published[seen:] if isinstance(e, MaintenanceStarted)]
        seen = len(published)
        t0 = time.perf_counter()
        completion_ms += await _bounded([complete(s) for s in started], WORKERS)
        completions_total_ms += (time.perf_counter() - t0) * 1000
    if rollout.state != "completed" or len(completion_ms) != len(fleet):
        raise RuntimeError(
            f"rollout ended {rollout.state} with {len(completion_ms)} of {len(fleet)} hosts"
        )
    await store.flush()
    record = await kv.get(store.rollout_key(rollout.rollout_id))
    await js.delete_key_value(bucket)
    return {
        "rollout_record_bytes": len(record.value or b""),
        "waves": len(rollout.waves),
        "submit_ms": submit_ms,
        "completion_ms_median": statistics.median(completion_ms),
        "completion_ms_p99": pct(completion_ms, 0.99),
        "completions_total_ms": completions_total_ms,
        "advance_ms": advance_ms,
        "kv_writes": store.writes,
    }


async def measure(url: str, sizes: list[int], runs: int) -> list[dict[str, Any]]:
    """Every size, `runs` times each, baseline and engine alternating."""
    nc = await connect(url)
    js = nc.jetstream()
    rows = []
    try:
        for n in sizes:
            fleet = make_fleet(n, "round-robin")
            waves = plan_waves(fleet, max_hosts_in_flight=IN_FLIGHT).waves  # the engine's own
            base_runs, engine_runs = [], []
            for i in range(runs):
                base_runs.append(await baseline(js, f"bench_base_{n}_{i}", waves))
                engine_runs.append(await engine_run(js, f"bench_engine_{n}_{i}", fleet))
            base = _medians(base_runs)
            eng = _medians(engine_runs)
            per_host_eng = eng["completions_total_ms"] / n
            per_host_base = base["completions_total_ms"] / n
            rows.append(
                {
                    "hosts": n,
                    "vms": n * 20,
                    "waves": engine_runs[0]["waves"],
                    "runs": runs,
                    "engine": eng,
                    "baseline": base,
                    "submit_vs_baseline": eng["submit_ms"] / base["submit_ms"],
                    "completion_per_host_ms": per_host_eng,
                    "baseline_per_host_ms": per_host_base,
                    "completion_vs_baseline": per_host_eng / per_host_base,
                    "completion_p99_vs_baseline": eng["completion_ms_p99"]
                    / base["completion_ms_p99"],
                    "advance_per_wave_ms": eng["advance_ms"] / eng["waves"],
                    "baseline_per_wave_ms": base["advance_ms"] / len(waves),
                    "advance_vs_baseline": eng["advance_ms"] / base["advance_ms"],
                }
            )
            print(f"{n} hosts done", file=sys.stderr)
    finally:
        await nc.close()
    return rows


def _medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="planner cost per host (engine + real KV) vs the KV writes alone, same run")
    for col in (
        "hosts",
        "waves",
        "submit",
        "baseline",
        "ratio",
        "per completion",
        "baseline",
        "ratio",
        "p99",
        "baseline p99",
        "per wave",
        "baseline",
        "ratio",
        "KV writes",
        "rollout record",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        e, b = r["engine"], r["baseline"]
        t.add_row(
            f"{r['hosts']:,}",
            str(r["waves"]),
            f"{e['submit_ms']:.0f} ms",
            f"{b['submit_ms']:.0f} ms",
            f"{r['submit_vs_baseline']:.2f}",
            f"{r['completion_per_host_ms']:.2f} ms",
            f"{r['baseline_per_host_ms']:.2f} ms",
            f"{r['completion_vs_baseline']:.2f}",
            f"{e['completion_ms_p99']:.1f} ms",
            f"{b['completion_ms_p99']:.1f} ms",
            f"{r['advance_per_wave_ms']:.1f} ms",
            f"{r['baseline_per_wave_ms']:.1f} ms",
            f"{r['advance_vs_baseline']:.2f}",
            f"{e['kv_writes']:,.0f}",
            f"{e['rollout_record_bytes'] / 1024:.1f} KiB",
        )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pp-bench-planner-") as tmp:
        server = NatsServer(Path(tmp)).start()
        try:
            rows = asyncio.run(measure(server.url, args.sizes, args.runs))
        finally:
            server.stop()
    Console(width=160).print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": utcnow().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "in_flight": IN_FLIGHT,
        "workers": WORKERS,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
