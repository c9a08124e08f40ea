"""Pause-window overhead: host-agent against the plain ways to do the same job, in one run.

For each hypervisor (libvirt test driver with 32 VMs; real QEMU with 3 guests when `--qemu`):
- agent: a real host-agent process on a real nats-server runs N windows (`MaintenanceStarted`
  published straight to it); window and patch times come from its `MaintenanceCompleted`;
- baseline: a plain script calling libvirt directly: suspend all, run the same patch, resume all;
- virsh: what an operator's shell script does: `virsh suspend` per VM, the patch, `virsh resume`.
Overhead = window - patch. Prints a table, writes bench/results/pause.json.

Usage: .venv/bin/python bench/bench_pause.py [--windows 50] [--qemu] [--patch-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.client import EventWatcher, connect
from shared.contracts import MaintenanceCompleted, MaintenanceStarted, PatchSpec
from shared.devstack import LocalStack, SimVM, sim_node_xml, temp_workdir
from shared.placement import Placement

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(windows: list[float], patches: list[float]) -> dict[str, float]:
    """Medians and p99 of window, patch and overhead (ms)."""
    overhead = [w - p for w, p in zip(windows, patches, strict=True)]
    return {
        "n": len(windows),
        "window_median_ms": statistics.median(windows),
        "window_p99_ms": pct(windows, 0.99),
        "patch_median_ms": statistics.median(patches),
        "overhead_median_ms": statistics.median(overhead),
        "overhead_p99_ms": pct(overhead, 0.99),
    }


def run_patch(command: str) -> float:
    """Run the patch like the agent does (shell, own session); its duration in ms."""
    t0 = time.monotonic()
    subprocess.run(command, shell=True, check=True, start_new_session=True)
    return (time.monotonic() - t0) * 1000


def direct_loop(uri: str, vms: list[str], command: str, n: int) -> dict[str, float]:
    """The baseline: libvirt-python, suspend all, patch, resume all."""
    conn = libvirt.open(uri)
    domains = [conn.lookupByName(v) for v in vms]
    windows, patches = [], []
    for _ in range(n):
        t0 = time.monotonic()
        for d in domains:
            d.suspend()
        patches.append(run_patch(command))
        for d in domains:
            d.resume()
        windows.append((time.monotonic() - t0) * 1000)
    conn.close()
    return summary(windows, patches)


def virsh_loop(uri: str, vms: list[str], command: str, n: int) -> dict[str, float]:
    """An operator's shell script: one `virsh` process per VM and action."""
    windows, patches = [], []

    def virsh(action: str, vm: str) -> None:
        subprocess.run(["virsh", "-q", "-c", uri, action, vm], check=True, capture_output=True)

    for _ in range(n):
        t0 = time.monotonic()
        for vm in vms:
            virsh("suspend", vm)
        patches.append(run_patch(command))
        for vm in vms:
            virsh("resume", vm)
        windows.append((time.monotonic() - t0) * 1000)
    return summary(windows, patches)


async def agent_loop(
    stack: LocalStack, host: str, command: str, n: int, budget_s: float = 10.0
) -> dict[str, float]:
    """Windows run by the real host-agent process, told through the bus."""
    nc = await connect(stack.nats_url)
    js = nc.jetstream()
    watcher = await EventWatcher(nc).start()
    windows, patches = [], []
    try:
        for _ in range(n):
            started = MaintenanceStarted(
                host=host,
                rollout_id="bench",
                scheduled_event_id=uuid.uuid4(),
                patch=PatchSpec(command=command),
                pause_budget_s=budget_s,
            )
            await js.publish(started.subject(), json.dumps(started.to_json()).encode())
            sid = started.scheduled_event_id
            done: list[MaintenanceCompleted] = await watcher.wait_for(
                lambda w: w.events(MaintenanceCompleted, scheduled_event_id=sid),  # noqa: B023
                60,
                "a window",
            )
            assert done[0].ok, done[0].error
            windows.append(done[0].window_ms)
            patches.append(done[0].patch_ms)
    finally:
        await watcher.stop()
        await nc.close()
    return summary(windows, patches)


async def ensure_stream(url: str) -> None:
    """Declare the stream as the planner would (the bench runs no planner)."""
    from nats.js.api import StorageType, StreamConfig

    nc = await connect(url)
    await nc.jetstream().add_stream(
        StreamConfig(
            name="PAUSEPATCH", subjects=["pp.evt.>"], storage=StorageType.FILE, duplicate_window=120
        )
    )
    await nc.close()


def bench_hypervisor(
    name: str,
    uri: str,
    vms: list[str],
    command: str,
    n: int,
    start_agent: Callable[[LocalStack], None],
    workdir: Path,
) -> dict[str, Any]:
    """All three ways on one hypervisor."""
    stack = LocalStack(workdir / name)
    try:
        stack.start_nats()
        asyncio.run(ensure_stream(stack.nats_url))
        start_agent(stack)
        time.sleep(1.0)  # agent start-up; the first window waits on its consumer anyway
        agent = asyncio.run(agent_loop(stack, "bench", command, n))
    finally:
        stack.stop()
    direct = direct_loop(uri, vms, command, n)
    row: dict[str, Any] = {"hypervisor": name, "vms": len(vms), "agent": agent, "direct": direct}
    if not uri.startswith("test:"):
        # The test driver keeps state per process: a VM that one `virsh` paused is running
        # again for the next one, so the shell-script comparison only means something on QEMU.
        row["virsh"] = virsh_loop(uri, vms, command, max(5, n // 5))
    return row


def agent_starter(uri: str) -> Callable[[LocalStack], None]:
    """Starts the host-agent process of the bench host on `uri`."""

    def start(stack: LocalStack) -> None:
        stack.start_service("host-agent", "host_agent", ["--host", "bench", "--libvirt-uri", uri])

    return start


def print_table(rows: list[dict[str, Any]]) -> None:
    """The results, with ratios against the direct loop of the same run."""
    header = (
        f"{'hypervisor':<12}{'method':<9}{'n':>4}{'window med':>12}{'window p99':>12}"
        f"{'patch med':>11}{'overhead med':>14}{'overhead p99':>14}{'window/direct':>15}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row["direct"]["window_median_ms"]
        for method in ("agent", "direct", "virsh"):
            if method not in row:
                continue
            s = row[method]
            print(
                f"{row['hypervisor'] + ' x' + str(row['vms']):<12}{method:<9}{s['n']:>4}"
                f"{s['window_median_ms']:>12.2f}{s['window_p99_ms']:>12.2f}"
                f"{s['patch_median_ms']:>11.2f}{s['overhead_median_ms']:>14.3f}"
                f"{s['overhead_p99_ms']:>14.3f}{s['window_median_ms'] / base:>15.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=50)
    parser.add_argument("--patch-ms", type=float, default=100.0)
    parser.add_argument("--qemu", action="store_true", help="also bench 3 real QEMU guests")
    args = parser.parse_args()
    command = f"sleep {args.patch_ms / 1000:.3f}"
    rows = []
    with temp_workdir("pausepatch-bench-") as workdir:
        vms = [SimVM(f"vm-{i:02d}", f"set-{i % 4}", 0) for i in range(32)]
        node = workdir / "node.xml"
        node.write_text(sim_node_xml(vms))
        uri = f"test://{node}"
        rows.append(
            bench_hypervisor(
                "test",
                uri,
                [v.name for v in vms],
                command,
                args.windows,
                agent_starter(uri),
                workdir,
            )
        )
        if args.qemu:
            from tests.support.qemu import running_guests

            guests: dict[str, Placement] = {
                f"pp-bench-{i}": {"availability_set": "bench", "update_domain": 0} for i in range(3)
            }
            with running_guests(guests) as (qemu_uri, names):
                rows.append(
                    bench_hypervisor(
                        "qemu",
                        qemu_uri,
                        names,
                        command,
                        args.windows,
                        agent_starter(qemu_uri),
                        workdir,
                    )
                )
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "pause.json"
    out.write_text(
        json.dumps({"patch_ms": args.patch_ms, "windows": args.windows, "results": rows}, indent=2)
    )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
