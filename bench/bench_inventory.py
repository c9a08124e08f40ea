"""Heartbeats at fleet scale: what the inventories of many hosts cost the services that read them.

    .venv/bin/python bench/bench_inventory.py [--hosts 5000] [--vms 20] [--rounds 3] [--out F]

Every host-agent publishes its `HostInventory` every `PP_HEARTBEAT_S` (10 s): a fleet of 10,000
hosts is 1,000 inventories a second, each a few KB, read by the planner and by the notifier
(processes, on their own nats-server on a free loopback port). The bench publishes `--rounds`
rounds of one inventory per host (20 VMs each), as the agents would (JetStream, with their
`Nats-Msg-Id`), and measures the CPU each reader used per inventory, and how long after the last
round's publish the planner had read it all (its `hosts` answer shows each host's last
inventory).

The baseline, measured in the same run on the same server: a bare reader in a process of its own,
a nats-py push subscription on the same subjects that parses each inventory into the same model
and does nothing else. Figures: CPU per inventory for each reader, as a ratio against the bare
reader's, and the heartbeat load each could absorb with a whole core (hosts at a 10 s heartbeat).
Prints a table and writes bench/results/inventory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js.api import DeliverPolicy
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_soak import machine_speed, run_s, write_result

from shared import subjects
from shared.client import PlannerClient, connect
from shared.contracts import HostInventory, VMInfo
from shared.devstack import LocalStack, temp_workdir

RESULTS = Path(__file__).resolve().parent / "results" / "inventory.json"
HEARTBEAT_S = 10.0
"""The agents' default `PP_HEARTBEAT_S`."""


def host_name(i: int) -> str:
    """The i-th simulated host."""
    return f"hv-{i:05d}"


def inventory_body(i: int, vms: int) -> dict[str, Any]:
    """Host i's inventory, without its event id and time (set per publish)."""
    return HostInventory(
        host=host_name(i),
        vms=[
            VMInfo(
                vm=f"hv-{i:05d}-vm{j:02d}",
                uuid=str(uuid.UUID(int=i * 1000 + j)),
                availability_set=f"set-{(i + j) % 97}",
                update_domain=i % 5,
                fault_domain=i % 3,
                ip=f"10.{i // 250 % 250}.{i % 250}.{j + 1}",
                state="running",
            )
            for j in range(vms)
        ],
        hypervisor="QEMU",
    ).to_json()


def bare_reader(url: str, expected: int, conn: Any) -> None:
    """The baseline: parse every inventory into the model, nothing else; report own CPU."""
    asyncio.run(_bare(url, expected, conn))


async def _bare(url: str, expected: int, conn: Any) -> None:
    nc = await connect(url)
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def on_message(msg: Any) -> None:
        nonlocal count
        HostInventory.model_validate_json(msg.data)
        count += 1
        if count >= expected:
            done.set()

    await js.subscribe(
        subjects.host_inventory(),
        cb=on_message,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,  # what is published from now on
    )
    conn.send("ready")
    started = time.process_time()
    await asyncio.wait_for(done.wait(), 600)
    conn.send({"count": count, "cpu_s": time.process_time() - started})
    await nc.close()


async def publish_round(js: Any, bodies: list[dict[str, Any]], stamp: datetime) -> None:
    """One inventory per host, `stamp` as its time, 500 awaiting their acks at once."""
    for first in range(0, len(bodies), 500):
        chunk = []
        for body in bodies[first : first + 500]:
            event_id = str(uuid.uuid4())
            data = json.dumps(
                {**body, "event_id": event_id, "occurred_at": stamp.isoformat()}
            ).encode()
            subject = subjects.host_inventory(body["host"])
            chunk.append(js.publish(subject, data, headers={"Nats-Msg-Id": event_id}))
        await asyncio.gather(*chunk)


WAIT_S = 120.0
"""How long the bench waits for the planner (its stream, its catching up) before it fails."""


def planner_state(stack: LocalStack) -> str:
    """Whether the planner still runs, and its log's last lines (for a bench that gives up)."""
    planner = stack.services.get("planner")
    if planner is None:
        return "planner not started"
    state = "running" if planner.running else f"exited ({planner.proc and planner.proc.poll()})"
    return f"planner {state}; its log ends:\n{planner.log_tail(30)}"


async def planner_caught_up(
    client: PlannerClient, stamp: datetime, hosts: int, stack: LocalStack
) -> None:
    """Until the planner has read the round stamped `stamp`: its last host (by name, published
    last) shows it. The stream is read in order, so every earlier inventory was read too; one
    host asked for, so that asking costs the planner next to nothing. RuntimeError, with what
    the planner last showed and its state, past `WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    page: dict[str, Any] = {}
    while time.monotonic() < deadline:
        page = await client.call("hosts", {"offset": hosts - 1, "limit": 1})
        if page["total"] >= hosts and page["hosts"]:
            last = page["hosts"][0]
            seen = datetime.fromisoformat(last["occurred_at"].replace("Z", "+00:00"))
            if last["host"] == host_name(hosts - 1) and seen == stamp:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(
        f"the planner never read the round of {stamp.isoformat()} in {WAIT_S:.0f} s "
        f"(its last page: {page}); {planner_state(stack)}"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = [inventory_body(i, args.vms) for i in range(args.hosts)]
    size = len(json.dumps({**bodies[0], "event_id": str(uuid.uuid4()), "occurred_at": "x" * 27}))
    speed = machine_speed()
    with temp_workdir("pausepatch-inventory-") as workdir:
        stack = LocalStack(workdir, extra_env={"PP_LOG_LEVEL": "WARNING"})
        stack.start_nats()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        bare = None
        try:
            stack.start_service("planner", "planner")
            stack.start_service("notifier", "notifier", ["--listen", "127.0.0.1:0"])
            nc = await connect(stack.nats_url)
            client = PlannerClient(nc, timeout=60)
            js = nc.jetstream()
            # The stream exists once the planner is up; the first round makes every host known.
            deadline = time.monotonic() + WAIT_S
            while True:
                try:
                    await js.stream_info(subjects.STREAM_NAME)
                    break
                except Exception as exc:  # not declared yet (re-raised past the wait)
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the stream was never declared ({exc}); {planner_state(stack)}"
                        ) from exc
                    await asyncio.sleep(0.1)
            first = datetime.now(UTC)
            await publish_round(js, bodies, first)
            await planner_caught_up(client, first, args.hosts, stack)
            await asyncio.sleep(2)  # the notifier too, and both idle again

            bare = ctx.Process(
                target=bare_reader, args=(stack.nats_url, args.hosts * args.rounds, child)
            )
            bare.start()
            if not parent.poll(60) or parent.recv() != "ready":
                raise RuntimeError("the bare reader did not start")
            pids = {name: p.proc.pid for name, p in stack.services.items() if p.proc}
            assert stack.nats is not None and stack.nats.proc is not None
            pids["nats"] = stack.nats.proc.pid
            cpu_before = {name: run_s(pid) for name, pid in pids.items()}
            started = time.perf_counter()
            stamp = first
            for _ in range(args.rounds):
                stamp = datetime.now(UTC)
                await publish_round(js, bodies, stamp)
            published_s = time.perf_counter() - started
            await planner_caught_up(client, stamp, args.hosts, stack)
            planner_lag_s = time.perf_counter() - started - published_s
            if not parent.poll(WAIT_S):
                raise RuntimeError("the bare reader never read every inventory")
            bare_result = parent.recv()
            await asyncio.sleep(2)  # the notifier's tail
            cpu = {name: run_s(pid) - cpu_before[name] for name, pid in pids.items()}
            await nc.close()
        finally:
            if bare is not None:
                bare.join(10)
            stack.stop()
    count = args.hosts * args.rounds
    per_inventory_us = {name: cpu[name] / count * 1e6 for name in ("planner", "notifier", "nats")}
    per_inventory_us["bare reader"] = bare_result["cpu_s"] / bare_result["count"] * 1e6
    base = per_inventory_us["bare reader"]
    return {
        "hosts": args.hosts,
        "vms_per_host": args.vms,
        "rounds": args.rounds,
        "inventories": count,
        "bare_reader_read": bare_result["count"],
        "inventory_bytes": size,
        "published_per_s": round(count / published_s),
        "planner_lag_after_last_publish_s": round(planner_lag_s, 2),
        "cpu_s": {name: round(value, 2) for name, value in cpu.items()},
        "cpu_us_per_inventory": {k: round(v, 1) for k, v in per_inventory_us.items()},
        "vs_bare_reader": {k: round(v / base, 2) for k, v in per_inventory_us.items()},
        "hosts_per_core_at_10s_heartbeat": {
            k: round(HEARTBEAT_S / (v / 1e6)) for k, v in per_inventory_us.items() if k != "nats"
        },
        "machine_speed": speed,
    }


def table(result: dict[str, Any]) -> Table:
    t = Table(
        title=f"{result['inventories']:,} inventories ({result['hosts']:,} hosts x "
        f"{result['rounds']} rounds, {result['inventory_bytes']:,} B each)"
    )
    for col in ("reader", "CPU per inventory", "vs bare reader", "hosts per core (10 s beat)"):
        t.add_column(col, justify="right")
    for name, us in result["cpu_us_per_inventory"].items():
        t.add_row(
            name,
            f"{us:,.0f} µs",
            f"{result['vs_bare_reader'][name]:.2f}",
            f"{result['hosts_per_core_at_10s_heartbeat'].get(name, 0):,}" if name != "nats" else "",
        )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5000)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Console(width=140).print(table(result))
    print(
        f"published {result['published_per_s']:,}/s; the planner had read the last round "
        f"{result['planner_lag_after_last_publish_s']} s after it was published"
    )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
