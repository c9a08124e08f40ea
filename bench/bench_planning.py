"""Wave-planning benchmark: `plan_waves` against the naive UD-by-UD plan, on generated fleets.

    .venv/bin/python bench/bench_planning.py [--quick]

Fleets of 1,000 and 10,000 hosts (only 1,000 with --quick), 20 VMs each, seeded, in two
placements (see `make_fleet`), each planned with 10 hosts in flight and with no limit (every
host at once, where the UD count is the bound). Prints a table and writes the figures to
bench/results/planning.json. Times are the median of 5 runs (3 with --quick), wall clock and
CPU time of this process, after one warm-up run; the load average is recorded (shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.planner.waves import Inventory, WavePlan, check_plan, naive_plan, plan_waves
from shared.contracts import VMInfo

Placement = Literal["random", "round-robin"]

RESULTS = Path(__file__).resolve().parent / "results" / "planning.json"
VMS_PER_HOST = 20
UD_GROUPS = 20
"""Azure's maximum of update domains per set; round-robin fleets have this many host groups."""
STANDALONE_SHARE = 0.05
"""Share of VMs in no availability set."""


def make_fleet(n_hosts: int, placement: Placement, seed: int = 0) -> dict[str, list[VMInfo]]:
    """A fleet of `n_hosts` hosts carrying exactly `VMS_PER_HOST` VMs each.

    Availability sets get 2-20 UDs and 2-3 FDs, and n_ud to 3 x n_ud VMs; VM j of a set is in
    UD j mod n_ud and FD j mod n_fd, as Azure assigns them. `STANDALONE_SHARE` of the VMs are in
    no set. Placement:

    - "random": VMs dealt to hosts at random. Some hosts get two UDs of one set (placement
      violations, reported and left out by the planner).
    - "round-robin": hosts form `UD_GROUPS` groups (host i in group i mod 20) and set number k
      puts its UD u on group (u + k) mod 20, dealing its VMs round-robin over that group's
      hosts: an allocator that spreads UDs over hardware groups, numbered differently in each
      set. A VM whose group is full is left out, so every host gets exactly 20.
    """
    rng = random.Random(seed)
    hosts = [f"host-{i:05d}" for i in range(n_hosts)]
    fleet: dict[str, list[VMInfo]] = {host: [] for host in hosts}
    made = 0

    def vm(availability_set: str | None, ud: int | None, fd: int | None) -> VMInfo:
        nonlocal made
        made += 1
        return VMInfo(
            vm=f"vm-{made:07d}",
            uuid=f"{made:032x}",
            availability_set=availability_set,
            update_domain=ud,
            fault_domain=fd,
            state="running",
        )

    def availability_set(number: int) -> tuple[str, int, int, int]:
        n_ud = rng.randint(2, 20)
        return f"as-{number:05d}", n_ud, rng.randint(2, 3), rng.randint(n_ud, 3 * n_ud)

    total = n_hosts * VMS_PER_HOST
    if placement == "random":
        vms: list[VMInfo] = []
        number = 0
        while len(vms) < total:
            if rng.random() < STANDALONE_SHARE:
                vms.append(vm(None, None, None))
                continue
            name, n_ud, n_fd, size = availability_set(number)
            number += 1
            vms += [vm(name, j % n_ud, j % n_fd) for j in range(size)]
        del vms[total:]
        rng.shuffle(vms)
        for i, host in enumerate(hosts):
            fleet[host] = vms[i * VMS_PER_HOST : (i + 1) * VMS_PER_HOST]
        return fleet
    groups = [hosts[g::UD_GROUPS] for g in range(UD_GROUPS)]
    dealt = [0] * UD_GROUPS

    def next_host(group: int) -> list[VMInfo] | None:
        """The VM list of the group's next host round-robin, None when the group is full."""
        members = groups[group]
        if dealt[group] == len(members) * VMS_PER_HOST:
            return None
        dealt[group] += 1
        return fleet[members[(dealt[group] - 1) % len(members)]]

    number = 0
    while sum(dealt) < total:
        if rng.random() < STANDALONE_SHARE:
            target = next_host(number % UD_GROUPS)
            if target is not None:
                target.append(vm(None, None, None))
            continue
        name, n_ud, n_fd, size = availability_set(number)
        for j in range(size):
            target = next_host((j % n_ud + number) % UD_GROUPS)
            if target is not None:
                target.append(vm(name, j % n_ud, j % n_fd))
        number += 1
    return fleet


def _timed(runs: int, plan: Callable[[], WavePlan]) -> tuple[WavePlan, float, float]:
    """The plan, and the median wall and CPU seconds of `runs` runs."""
    walls: list[float] = []
    cpus: list[float] = []
    result = plan()
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = plan()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)


def measure(fleet: Inventory, in_flight: int, runs: int) -> dict[str, Any]:
    """Both planners on one fleet: waves, lower bound, times, and whether the plans check out."""
    ours, wall, cpu = _timed(runs, lambda: plan_waves(fleet, max_hosts_in_flight=in_flight))
    naive, naive_wall, naive_cpu = _timed(
        runs, lambda: naive_plan(fleet, max_hosts_in_flight=in_flight)
    )
    check_start = time.perf_counter()
    problems = check_plan(fleet, ours)
    check_s = time.perf_counter() - check_start
    naive_problems = check_plan(fleet, naive)
    bound = ours.lower_bound
    return {
        "planned_hosts": len(ours.hosts),
        "violations": len({v.host for v in ours.violations}),
        "lower_bound": bound,
        "waves": len(ours.waves),
        "waves_over_bound": round(len(ours.waves) / bound, 3),
        "plan_s": round(wall, 4),
        "plan_cpu_s": round(cpu, 4),
        "check_s": round(check_s, 4),
        "problems": len(problems),
        "naive_waves": len(naive.waves),
        "naive_waves_over_bound": round(len(naive.waves) / bound, 3),
        "naive_s": round(naive_wall, 4),
        "naive_cpu_s": round(naive_cpu, 4),
        "naive_problems": len(naive_problems),
        "waves_vs_naive": round(len(ours.waves) / len(naive.waves), 3),
        "time_vs_naive": round(wall / naive_wall, 2),
    }


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 hosts only, 3 runs")
    args = parser.parse_args()
    sizes = (1_000,) if args.quick else (1_000, 10_000)
    runs = 3 if args.quick else 5
    placements: tuple[Placement, ...] = ("random", "round-robin")
    rows: list[dict[str, Any]] = []
    console = Console(width=max(Console().width, 160))
    load_before = os.getloadavg()[0]
    for n_hosts in sizes:
        for placement in placements:
            fleet = make_fleet(n_hosts, placement, seed=n_hosts)
            for in_flight in (10, n_hosts):
                row = {
                    "hosts": n_hosts,
                    "vms": sum(len(vms) for vms in fleet.values()),
                    "placement": placement,
                    "max_in_flight": in_flight,
                    **measure(fleet, in_flight, runs),
                }
                rows.append(row)
                console.log(f"{n_hosts} hosts, {placement}, {in_flight} in flight: done")
    console.print(_table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "runs": runs,
                "load_average": [load_before, os.getloadavg()[0]],
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    console.print(f"written to {RESULTS}")


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Wave planning: plan_waves vs naive (one UD index at a time)")
    table.add_column("hosts", justify="right")
    table.add_column("placement", no_wrap=True)
    for column in (
        "in flight",
        "planned",
        "bound",
        "waves",
        "÷ bound",
        "ms (cpu)",
        "naive waves",
        "÷ bound",
        "naive ms",
        "waves ÷ naive",
        "time ÷ naive",
        "check",
        "naive check",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['hosts']:,}",
            row["placement"],
            "all" if row["max_in_flight"] == row["hosts"] else str(row["max_in_flight"]),
            f"{row['planned_hosts']:,}",
            str(row["lower_bound"]),
            str(row["waves"]),
            f"{row['waves_over_bound']:.2f}",
            f"{row['plan_s'] * 1000:.0f} ({row['plan_cpu_s'] * 1000:.0f})",
            str(row["naive_waves"]),
            f"{row['naive_waves_over_bound']:.2f}",
            f"{row['naive_s'] * 1000:.0f}",
            f"{row['waves_vs_naive']:.2f}",
            f"{row['time_vs_naive']:.2f}",
            _check_cell(row["problems"]),
            _check_cell(row["naive_problems"]),
        )
    return table


def _check_cell(problems: int) -> str:
    return "ok" if problems == 0 else f"{problems} broken"


if __name__ == "__main__":
    main()
