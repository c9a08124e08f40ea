"""Soak: a fleet of simulated hosts (libvirt test driver) through one rollout, every service a
process on a real nats-server (or a 3-node cluster with `--cluster`).

Before the rollout, the same fleet goes through the same waves and the same schedule driven by a
plain libvirt loop (`direct`: worker processes like the agents, suspend every VM of a host, the
same patch, resume, no bus, no services): the baseline measured in the same run. What the rollout
takes beyond it is what the bus and the services add.

Reports the total time against that baseline, against the schedule's theoretical minimum
(waves x (notice + patch), each wave noticed after the one before it) and against the minimum of
the schedule as run (with `--notice-ahead-waves`, the request field, a wave's notice runs while
earlier waves are patched), events per second through the bus, the pause overhead under that
load (median, p99) against the direct loop's, each service's peak memory, and messages lost:
every VM must have its five events (planned, paused, patched, resumed, clock); and, to say where
a run stalled, each durable consumer's state at the end and any service that stopped during the
run. Prints a table, writes bench/results/soak.json.

Usage: .venv/bin/python bench/bench_soak.py [--hosts 1000] [--vms 20] [--agents 100] [--cluster]

The agents run their windows at real-time priority (`PP_RT_PRIORITY`, `--rt-priority`; 0: off),
and so do the direct loop's windows: the baseline gets what the agents get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import socket
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.host_agent.realtime import RealtimeWindows
from shared.client import PlannerClient, connect
from shared.contracts import VMResumed
from shared.devstack import LocalStack, ServiceProcess, SimVM, temp_workdir

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def write_result(result: dict[str, Any], out: Path) -> None:
    """Write a bench's result as JSON, with when and where it was measured (`meta`)."""
    result["meta"] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def ways_summary(
    cpu: dict[str, list[float]], rate: dict[str, list[float]], baseline: str, ratio: str
) -> dict[str, Any]:
    """Per way, from its rounds: CPU per event (median, worst), the median's ratio to the
    `baseline` way's (`ratio`), events per second (median)."""
    base = statistics.median(cpu[baseline])
    return {
        "cpu_us_per_event_median": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "cpu_us_per_event_worst": {k: round(max(v), 1) for k, v in cpu.items()},
        ratio: {k: round(statistics.median(v) / base, 2) for k, v in cpu.items()},
        "events_per_s_median": {k: round(statistics.median(v)) for k, v in rate.items()},
    }


def ways_table(result: dict[str, Any], title: str, what: str, ratio: str, label: str) -> Any:
    """A table of ways of doing one thing, measured against a baseline in the same run: CPU per
    event (median, worst round), its ratio to the baseline's (`result[ratio]`, headed `label`),
    events/s."""
    from rich.table import Table

    t = Table(title=title)
    for col in (what, "CPU per event (median)", "worst round", label, "events/s"):
        t.add_column(col, justify="right")
    for name, us in result["cpu_us_per_event_median"].items():
        t.add_row(
            name,
            f"{us:,.1f} µs",
            f"{result['cpu_us_per_event_worst'][name]:,.1f} µs",
            f"{result[ratio][name]:.2f}",
            f"{result['events_per_s_median'][name]:,}",
        )
    return t


def machine_speed() -> dict[str, float]:
    """How fast this machine is right now, at the two kinds of work the soak is made of (the
    soak's figures move with it from one hour to the next):

    - `compute_ms`: 2,000 VM events built, serialized and parsed back, in one process;
    - `loopback_ms`: 2,000 round trips of a 64-byte message over loopback TCP between two
      processes (a system call each way and a wake-up of the other process, as every message
      through the bus costs).

    Each the median of 7 rounds."""
    now = datetime.now(UTC)
    compute = []
    for _ in range(7):
        started = time.perf_counter()
        for i in range(2000):
            event = VMResumed(
                host=f"sim-{i:05d}",
                vm=f"sim-{i:05d}-v00",
                rollout_id="soak",
                paused_at=now,
                resumed_at=now,
                paused_ms=100.0,
                budget_ms=10_000.0,
            )
            VMResumed.model_validate_json(json.dumps(event.to_json()))
        compute.append((time.perf_counter() - started) * 1000)
    loopback = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)  # the echo process failing to start fails the probe, loudly
        echo = multiprocessing.get_context("spawn").Process(
            target=_echo, args=(server.getsockname()[1],), daemon=True
        )
        echo.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(60)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = b"x" * 64
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(2000):
                    conn.sendall(message)
                    received = 0
                    while received < len(message):
                        received += len(conn.recv(4096))
                loopback.append((time.perf_counter() - started) * 1000)
        echo.join(10)
    return {
        "compute_ms": round(statistics.median(compute), 1),
        "loopback_ms": round(statistics.median(loopback), 1),
    }


def _echo(port: int) -> None:
    """The other end of `machine_speed`'s round trips."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(4096):
            conn.sendall(data)


def fleet(hosts: int, vms: int, seed: int = 7) -> dict[str, list[SimVM]]:
    """Round-robin placement: availability sets of 5 UDs; each host carries one UD of a set."""
    rng = random.Random(seed)
    sets = max(1, hosts * vms // 100)
    result: dict[str, list[SimVM]] = {}
    for h in range(hosts):
        name = f"sim-{h:05d}"
        chosen = rng.sample(range(sets), min(vms, sets))
        result[name] = [SimVM(f"{name}-v{i:02d}", f"as-{s}", h % 5) for i, s in enumerate(chosen)]
    return result


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_s(pid: int, tid: int | None = None) -> float:
    """Time on a CPU so far (nanosecond precision, from the scheduler's own accounting) of one
    thread, or of every live thread of a process: `/proc/.../stat` counts 10 ms ticks, too
    coarse for a window's few milliseconds. The agent's and the direct loop's threads live as
    long as they do (pools), so nothing of the measured windows is lost with a thread."""
    tasks = [Path(f"/proc/{pid}/task/{tid}")] if tid else Path(f"/proc/{pid}/task").iterdir()
    total = 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def context_switches(pid: int) -> int:
    """Context switches (voluntary and not) of every live thread of a process so far: each is a
    wake-up or a preemption, the currency of a message-passing system on few cores."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def stack_pids(stack: LocalStack) -> dict[str, int]:
    """Every process of the stack: nats-server(s) and the services."""
    pids = {name: p.proc.pid for name, p in stack.services.items() if p.proc is not None}
    servers = stack.cluster.nodes if stack.cluster is not None else [stack.nats]
    for server in servers:
        if server is not None and server.proc is not None:
            pids[server.name] = server.proc.pid
    return pids


def peak_rss_mb(proc: ServiceProcess) -> float:
    """Peak resident memory of a service process (VmHWM), MiB."""
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_hosts_known(
    client: PlannerClient, count: int, timeout: float, stack: LocalStack | None = None
) -> None:
    """Until the planner's dry run covers every host (its inventory is complete). On timeout,
    says how many it saw and which of the stack's processes had stopped, with their logs."""
    deadline = time.monotonic() + timeout
    seen, last_error = 0, ""
    while time.monotonic() < deadline:
        try:
            plan = await client.plan({"update_id": "probe", "patch": {"duration_s": 0}})
            seen = sum(len(w) for w in plan["waves"])
            if seen >= count:
                return
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(1)
    stopped = [p for p in (stack.services.values() if stack else []) if not p.running]
    details = "".join(f"\n--- {p.name} (stopped) ---\n{p.log_tail(15)}" for p in stopped)
    raise TimeoutError(
        f"the planner saw {seen} of {count} hosts after {timeout:.0f} s"
        + (f" (last error: {last_error})" if last_error else "")
        + f"; {len(stopped)} process(es) stopped{details}"
    )


CONSUMERS_SETTLE_S = 5.0
"""How long `consumer_states` watches a consumer that holds events at the end for it to handle
what it held then (heartbeats keep arriving: a live consumer is rarely caught at exactly 0)."""


async def consumer_states(url: str, settle_s: float = CONSUMERS_SETTLE_S) -> dict[str, Any]:
    """What each durable consumer of the PAUSEPATCH stream holds at the end of the run: events
    not yet delivered (`pending`), delivered and not acknowledged (`ack_pending`), delivered
    more than once (`redelivered`), and pull requests waiting (`waiting`: a consumer whose
    service still asks for more). The agents' per-host consumers are summed. Each should be 0
    but `waiting`; anything else is an event a service has not handled, unless the consumer
    handles it within `settle_s`: a consumer found holding events is read again until its
    acknowledged floor passes what it held (its deliveries then, plus what was pending), and
    said `stalled` (true) if it does not; a stalled per-host consumer counts in the agents'
    `stalled`."""
    nc = await connect(url)
    try:
        js = nc.jetstream(timeout=30)
        infos = await read_consumers(js)
        holding = await stalled(js, infos, settle_s)
        states: dict[str, Any] = {}
        agents = {"consumers": 0, "pending": 0, "ack_pending": 0, "redelivered": 0, "stalled": 0}
        for info in infos:
            name = info.name or ""
            state = {
                "pending": info.num_pending or 0,
                "ack_pending": info.num_ack_pending or 0,
                "redelivered": info.num_redelivered or 0,
                "waiting": info.num_waiting or 0,
            }
            if state["pending"] or state["ack_pending"]:
                state["stalled"] = name in holding
            if name.startswith("host-agent-"):
                agents["consumers"] += 1
                for key in ("pending", "ack_pending", "redelivered"):
                    agents[key] += state[key]
                agents["stalled"] += name in holding
            elif info.config.durable_name:
                states[name] = state
        return {**dict(sorted(states.items())), "host-agents": agents}
    finally:
        await nc.close()


async def read_consumers(js: Any) -> list[Any]:
    """The info of every consumer of the PAUSEPATCH stream, page by page (256 a page)."""
    infos: list[Any] = []
    while page := await js.consumers_info("PAUSEPATCH", offset=len(infos)):
        infos += page
    return infos


async def stalled(js: Any, infos: list[Any], settle_s: float) -> set[str]:
    """The consumers of `infos` that held events and have not handled them `settle_s` later:
    each is read again until its acknowledged floor passes what it held (its deliveries then,
    plus what was pending then) or it holds nothing."""
    holding = {
        info.name: (info.delivered.consumer_seq or 0) + (info.num_pending or 0)
        for info in infos
        if info.name and (info.num_pending or info.num_ack_pending)
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while holding and loop.time() < deadline:
        await asyncio.sleep(0.25)  # bounded by settle_s: a consumer's progress, polled
        for name, floor in list(holding.items()):
            info = await js.consumer_info("PAUSEPATCH", name)
            if (info.ack_floor.consumer_seq or 0) >= floor or not (
                info.num_pending or info.num_ack_pending
            ):
                del holding[name]
    return set(holding)


def unhandled(consumers: dict[str, Any]) -> dict[str, Any]:
    """The consumers of `consumer_states` left with events not handled (stalled)."""
    return {name: state for name, state in consumers.items() if state.get("stalled")}


async def read_stream(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the run, straight from the stream."""
    nc = await connect(url)
    js = nc.jetstream()
    info = await js.stream_info("PAUSEPATCH")
    total = info.state.messages
    sub = await js.pull_subscribe("pp.evt.>", durable=None)
    out: list[tuple[str, dict[str, Any]]] = []
    while len(out) < total:
        try:
            msgs = await sub.fetch(1000, timeout=2)
        except TimeoutError:
            break
        for m in msgs:
            body = json.loads(m.data)
            body["_stored_at"] = m.metadata.timestamp.isoformat()
            out.append((m.subject, body))
            await m.ack()
    await nc.close()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    hosts = fleet(args.hosts, args.vms)
    speed = machine_speed()  # before anything else runs
    with temp_workdir("pausepatch-soak-") as workdir:
        stack = LocalStack(
            workdir,
            extra_env={
                "PP_HEARTBEAT_S": "30",
                "PP_LOG_LEVEL": "WARNING",
                "PP_RT_PRIORITY": str(args.rt_priority),
            },
        )
        if args.cluster:
            stack.start_nats_cluster(3)
        else:
            stack.start_nats()
        try:
            stack.start_service("planner", "planner")
            stack.start_service("notifier", "notifier", ["--listen", "127.0.0.1:0"])
            stack.start_service("clock-sync", "clock_sync")
            stack.start_service("clock-sync-2", "clock_sync")
            names = sorted(hosts)
            for i, chunk in enumerate(split_hosts(names, args.agents)):
                stack.add_sim_fleet(f"agents-{i}", {h: hosts[h] for h in chunk})
            nc = await connect(stack.nats_url)
            client = PlannerClient(nc, timeout=60)
            await wait_hosts_known(client, len(hosts), 300, stack)
            request = {
                "update_id": "soak",
                "patch": {"duration_s": args.patch_s},
                "notice_s": args.notice_s,
                "pause_budget_s": 10,
                "max_hosts_in_flight": args.in_flight,
                "notice_ahead_waves": args.notice_ahead_waves,
            }
            # The baseline, same run: the planner's own waves (a dry run of the same request),
            # driven by a plain libvirt loop over the same node files while the services idle.
            planned = await client.plan(request)
            nodes = {h: str(stack.workdir / "nodes" / f"{h}.xml") for h in names}
            pids = stack_pids(stack)
            idle_from = ({name: cpu_s(pid) for name, pid in pids.items()}, time.monotonic())
            direct = await asyncio.to_thread(
                direct_rollout,
                nodes,
                planned["waves"],
                args.agents,
                args.notice_s,
                args.patch_s,
                args.notice_ahead_waves,
                args.rt_priority,
            )
            cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
            idle_cores = {
                name: (cpu_before[name] - idle_from[0][name]) / (time.monotonic() - idle_from[1])
                for name in pids
            }
            switches_before = {name: context_switches(pid) for name, pid in pids.items()}
            started, submitted_at = time.monotonic(), time.time()
            summary = await client.submit(request)
            waves = len(summary["waves"])
            rid = summary["rollout_id"]
            while True:
                state = await client.call("get", {"rollout_id": rid, "summary": True})
                if state["state"] not in ("running", "planned"):
                    break
                await asyncio.sleep(0.5)
            total_s = time.monotonic() - started
            cpu = {name: round(cpu_s(pid) - cpu_before[name], 2) for name, pid in pids.items()}
            switches = {
                name: context_switches(pid) - switches_before[name] for name, pid in pids.items()
            }
            await asyncio.sleep(3)  # the last clock results
            stopped = {p.name: p.log_tail(15) for p in stack.services.values() if not p.running}
            memory = {name: round(peak_rss_mb(p), 1) for name, p in stack.services.items()}
            consumers = await consumer_states(stack.nats_url)
            await nc.close()
            events = await read_stream(stack.nats_url)
            if args.dump_events:
                with args.dump_events.open("w") as out:
                    for subject, body in events:
                        out.write(json.dumps({"subject": subject, **body}) + "\n")
        finally:
            stack.stop()

    per_vm: dict[str, set[str]] = defaultdict(set)
    overheads: list[float] = []
    host_patched: set[str] = set()
    for _, body in events:
        kind = body.get("type")
        if body.get("rollout_id") not in (rid, None):
            continue
        if kind == "MaintenancePlanned" and body["rollout_id"] == rid:
            for vm in body["vms"]:
                per_vm[vm].add("planned")
        elif kind in ("VMPaused", "VMResumed", "ClockSynced") and body.get("rollout_id") == rid:
            per_vm[body["vm"]].add(kind)
        elif kind == "HostPatched" and body.get("rollout_id") == rid:
            host_patched.add(body["host"])
        elif kind == "MaintenanceCompleted" and body.get("rollout_id") == rid:
            overheads.append(body["overhead_ms"])
    phases = wave_phases(events, rid)
    split = window_split(events, rid)
    timeline = host_timeline(events, rid)
    for host, vms in hosts.items():
        if host in host_patched:
            for vm in vms:
                per_vm[vm.name].add("patched")
    expected = {"planned", "VMPaused", "patched", "VMResumed", "ClockSynced"}
    all_vms = [vm.name for vms in hosts.values() for vm in vms]
    lost = sum(len(expected - per_vm.get(vm, set())) for vm in all_vms)
    minimum_s = waves * (args.notice_s + args.patch_s)
    schedule_s = schedule_minimum(waves, args.notice_s, args.patch_s, args.notice_ahead_waves)
    # The end as the planner stamped it (the status is polled every 0.5 s).
    ends = [
        datetime.fromisoformat(body["occurred_at"]).timestamp()
        for _, body in events
        if body.get("type") == "RolloutStatus"
        and body.get("rollout_id") == rid
        and body.get("state") == state["state"]
    ]
    if ends:
        total_s = min(total_s, min(ends) - submitted_at)
    bus_s = total_s - direct["total_s"]
    return {
        "hosts": args.hosts,
        "vms": len(all_vms),
        "agents": args.agents,
        "rt_priority": args.rt_priority,
        "cluster": args.cluster,
        "waves": waves,
        "final_state": state["state"],
        "hosts_ok": state["hosts_ok"],
        "total_s": round(total_s, 2),
        "theoretical_min_s": round(minimum_s, 2),
        "overhead_vs_min": round(total_s / minimum_s - 1, 4),
        "notice_ahead_waves": args.notice_ahead_waves,
        "schedule_min_s": round(schedule_s, 2),
        "overhead_vs_schedule_min": round(total_s / schedule_s - 1, 4),
        "events": len(events),
        "events_per_s": round(len(events) / total_s, 1),
        "direct_total_s": direct["total_s"],
        "total_vs_direct": round(total_s / direct["total_s"], 3),
        # What the bus, the planner and the other services add to the direct loop's time, as
        # a share of the theoretical minimum (the target: <= 5 %).
        "bus_and_services_s": round(bus_s, 2),
        "bus_and_services_vs_min": round(bus_s / minimum_s, 4),
        "pause_overhead_median_ms": round(statistics.median(overheads), 3) if overheads else None,
        "pause_overhead_p99_ms": round(pct(overheads, 0.99), 3) if overheads else None,
        "direct_pause_overhead_median_ms": direct["overhead_median_ms"],
        "direct_pause_overhead_p99_ms": direct["overhead_p99_ms"],
        "pause_overhead_p99_vs_direct": (
            round(pct(overheads, 0.99) / direct["overhead_p99_ms"], 2) if overheads else None
        ),
        "wave_phases_median_ms": phases,
        # Waves after the first that started when their notice ended, not when the one before
        # them was done (with notice ahead, none should).
        "notice_bound_waves": notice_bound_waves(events, rid),
        "window_split_ms": split,
        "host_timeline_ms": timeline,
        "cpu_s_during_rollout": cpu,
        "cpu_s_total": round(sum(cpu.values()), 1),
        # What the whole stack costs doing nothing (cores), measured while the direct loop ran.
        "idle_cores": {
            "total": round(sum(idle_cores.values()), 3),
            "agents": round(sum(v for k, v in idle_cores.items() if k.startswith("agents")), 3),
            **{k: round(v, 4) for k, v in idle_cores.items() if not k.startswith("agents")},
        },
        "context_switches_during_rollout": switches,
        "context_switches_total": sum(switches.values()),
        "memory_peak_mb": memory,
        "machine_speed": speed,
        "messages_lost": lost,
        # Every service process still running at the end (a stopped one: its last log lines).
        "services_stopped": stopped,
        "consumers_at_end": consumers,
        "consumers_unhandled": unhandled(consumers),
    }


def _direct_worker(conn: Any, nodes: dict[str, str], patch_s: float, rt_priority: int) -> None:
    """One worker of the direct loop: a libvirt connection per host it owns; for each wave, every
    one of its hosts at once (a thread each): suspend every VM, the patch, resume every VM, at the
    agents' real-time priority. Answers each host's overhead (window minus patch, ms)."""
    realtime = RealtimeWindows(rt_priority)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    domains = {}
    for host, path in nodes.items():
        hv = libvirt.open(f"test://{path}")
        domains[host] = [d for d in hv.listAllDomains() if d.isActive()]

    def window(host: str) -> float:
        with realtime.window():
            opened = time.perf_counter()
            for dom in domains[host]:
                dom.suspend()
            patch_from = time.perf_counter()
            time.sleep(patch_s)
            patch_to = time.perf_counter()
            for dom in domains[host]:
                dom.resume()
            closed = time.perf_counter()
        return ((closed - opened) - (patch_to - patch_from)) * 1000

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        conn.send("ready")
        while (wave := conn.recv()) is not None:
            conn.send(list(pool.map(window, wave)))


def direct_rollout(
    nodes: dict[str, str],
    waves: list[list[str]],
    workers: int,
    notice_s: float,
    patch_s: float,
    ahead: int,
    rt_priority: int = 0,
) -> dict[str, float]:
    """The baseline: the same waves on the same schedule as `schedule_minimum` (a wave starts once
    the one before it finished and its own notice passed), each host's window a plain libvirt
    loop, hosts split over `workers` processes as over the agent processes. Measured, not
    computed: the libvirt calls, the threads and the processes cost what they cost here."""
    ctx = multiprocessing.get_context("spawn")
    owner: dict[str, int] = {}
    pipes, procs = [], []
    for chunk in split_hosts(sorted(nodes), workers):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=_direct_worker,
            args=(theirs, {h: nodes[h] for h in chunk}, patch_s, rt_priority),
        )
        proc.start()
        pipes.append(ours)
        procs.append(proc)
        owner.update({h: len(pipes) - 1 for h in chunk})
    try:
        for pipe in pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a direct-loop worker did not start")
        overheads: list[float] = []
        current_from: list[float] = []
        end = 0.0
        started = time.perf_counter()
        for i, wave in enumerate(waves):
            current_from.append(end)
            delay = wave_start(current_from, i, end, notice_s, ahead) - (
                time.perf_counter() - started
            )
            if delay > 0:
                time.sleep(delay)
            mine: dict[int, list[str]] = defaultdict(list)
            for host in wave:
                mine[owner[host]].append(host)
            for w, hosts in mine.items():
                pipes[w].send(hosts)
            for w in mine:
                overheads += pipes[w].recv()
            end = time.perf_counter() - started
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(10)
    return {
        "total_s": round(end, 3),
        "windows": len(overheads),
        "overhead_median_ms": round(statistics.median(overheads), 3),
        "overhead_p99_ms": round(pct(overheads, 0.99), 3),
    }


def schedule_minimum(waves: int, notice_s: float, patch_s: float, ahead: int) -> float:
    """The shortest this rollout can take with nothing but notice and patch: a wave starts once
    the wave before it finished and its own notice passed, and its notice starts when the wave
    `ahead` waves before it becomes the current one (at once for the first `ahead` + 1)."""
    current_from: list[float] = []  # when each wave becomes the current one
    end = 0.0
    for i in range(waves):
        current_from.append(end)
        end = wave_start(current_from, i, end, notice_s, ahead) + patch_s
    return end


def wave_start(
    current_from: list[float], i: int, previous_end: float, notice_s: float, ahead: int
) -> float:
    """When wave `i` may start: the wave before it finished (`previous_end`) and its own notice
    passed, given from when the wave `ahead` waves before it became the current one."""
    noticed = current_from[i - ahead] if i >= ahead else 0.0
    return max(previous_end, noticed + notice_s)


def ts(value: str) -> float:
    """An event's ISO 8601 stamp in epoch milliseconds."""
    return datetime.fromisoformat(value).timestamp() * 1000


def split_hosts(names: list[str], parts: int) -> list[list[str]]:
    """`names` in at most `parts` consecutive chunks of equal size (the last one shorter): the
    hosts of each agent process, and of each worker of the direct loop."""
    per = -(-len(names) // parts)
    return [names[i : i + per] for i in range(0, len(names), per)]


def window_split(events: list[tuple[str, dict[str, Any]]], rid: str) -> dict[str, float]:
    """Where a window's overhead goes, per host (median / p99, ms): `stop` from the first
    suspend issued to the patch's start, `start` from the patch's end to the last resume
    returned (host clock, from the events' own timestamps)."""

    first_pause: dict[str, float] = {}
    last_resume: dict[str, float] = {}
    patch: dict[str, tuple[float, float]] = {}
    for _, body in events:
        if body.get("rollout_id") != rid:
            continue
        kind, host = body.get("type"), str(body.get("host"))
        if kind == "VMPaused":
            first_pause[host] = min(first_pause.get(host, 1e18), ts(body["paused_at"]))
        elif kind == "VMResumed":
            last_resume[host] = max(last_resume.get(host, 0.0), ts(body["resumed_at"]))
        elif kind == "HostPatched":
            patch[host] = (ts(body["patch_started_at"]), ts(body["patch_finished_at"]))
    stop = [patch[h][0] - first_pause[h] for h in patch if h in first_pause]
    start = [last_resume[h] - patch[h][1] for h in patch if h in last_resume]
    result: dict[str, float] = {}
    for name, values in (("stop", stop), ("start", start)):
        if values:
            result[f"{name}_median"] = round(statistics.median(values), 2)
            result[f"{name}_p99"] = round(pct(values, 0.99), 2)
    return result


def wave_phases(events: list[tuple[str, dict[str, Any]]], rid: str) -> dict[str, float]:
    """Where each wave's time goes (medians over waves, ms): notice (first planned to first
    start; with notice ahead, it ran while earlier waves were patched), window (first start to
    last completion), clock tail (last completion to last clock result), transition (last clock
    result to the next wave's first start)."""

    wave_of_host: dict[str, int] = {}
    marks: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _, body in events:
        if body.get("rollout_id") != rid:
            continue
        kind = body.get("type")
        if kind == "MaintenancePlanned":
            wave_of_host[body["host"]] = body["wave"]
            marks[body["wave"]]["planned"].append(ts(body["occurred_at"]))
        elif kind in ("MaintenanceStarted", "MaintenanceCompleted", "ClockSynced"):
            wave = wave_of_host.get(body["host"])
            if wave is not None:
                marks[wave][kind].append(ts(body["occurred_at"]))
    rows: dict[str, list[float]] = defaultdict(list)
    waves = sorted(marks)
    for i, wave in enumerate(waves):
        m = marks[wave]
        if not (m["planned"] and m["MaintenanceStarted"] and m["MaintenanceCompleted"]):
            continue
        rows["notice"].append(min(m["MaintenanceStarted"]) - min(m["planned"]))
        rows["window"].append(max(m["MaintenanceCompleted"]) - min(m["MaintenanceStarted"]))
        last = max(m["ClockSynced"] or m["MaintenanceCompleted"])
        rows["clock_tail"].append(last - max(m["MaintenanceCompleted"]))
        if i + 1 < len(waves) and marks[waves[i + 1]]["MaintenanceStarted"]:
            rows["transition"].append(min(marks[waves[i + 1]]["MaintenanceStarted"]) - last)
    return {k: round(statistics.median(v), 1) for k, v in rows.items() if v}


HOST_STEPS = ("start_to_pause", "resumed_to_completed", "completed_to_clock")
"""A host's way through its wave, after its start (`host_timeline`)."""


def host_timeline(events: list[tuple[str, dict[str, Any]]], rid: str) -> dict[str, float]:
    """Where one host's time goes once the planner started it (ms), from the events' own
    stamps: `start_to_pause` (its `MaintenanceStarted` to its first VM stopped: the start
    reaching the agent and the window opening), `resumed_to_completed` (its last VM running
    again to its `MaintenanceCompleted`: the window's report), `completed_to_clock` (that to its
    `HostClockSynced`: every guest clock of the host set). Each as the median and p99 over
    hosts, and as the median over waves of each wave's slowest host (`*_wave_max`: what the
    next wave waits for)."""

    wave_of: dict[str, int] = {}
    marks: dict[str, dict[str, float]] = defaultdict(dict)
    for _, body in events:
        if body.get("rollout_id") != rid:
            continue
        kind, host = body.get("type"), str(body.get("host"))
        mark = marks[host]
        if kind == "MaintenancePlanned":
            wave_of[host] = body["wave"]
        elif kind == "MaintenanceStarted":
            mark["started"] = ts(body["occurred_at"])
        elif kind == "VMPaused":
            mark["paused"] = min(mark.get("paused", math.inf), ts(body["paused_at"]))
        elif kind == "VMResumed":
            mark["resumed"] = max(mark.get("resumed", -math.inf), ts(body["resumed_at"]))
        elif kind == "MaintenanceCompleted":
            mark["completed"] = ts(body["occurred_at"])
        elif kind == "HostClockSynced":
            mark["clock"] = max(mark.get("clock", -math.inf), ts(body["occurred_at"]))
    steps = {
        "start_to_pause": ("started", "paused"),
        "resumed_to_completed": ("resumed", "completed"),
        "completed_to_clock": ("completed", "clock"),
    }
    result: dict[str, float] = {}
    for name in HOST_STEPS:
        since, until = steps[name]
        per_host = {
            host: mark[until] - mark[since]
            for host, mark in marks.items()
            if since in mark and until in mark and host in wave_of
        }
        if not per_host:
            continue
        slowest: dict[int, float] = {}
        for host, value in per_host.items():
            slowest[wave_of[host]] = max(slowest.get(wave_of[host], -math.inf), value)
        result[f"{name}_median"] = round(statistics.median(per_host.values()), 1)
        result[f"{name}_p99"] = round(pct(list(per_host.values()), 0.99), 1)
        result[f"{name}_wave_max"] = round(statistics.median(slowest.values()), 1)
    return result


NOTICE_BOUND_S = 0.01
"""A wave whose first start came within this of its notice's end waited for its notice."""


def notice_bound_waves(events: list[tuple[str, dict[str, Any]]], rid: str) -> int:
    """How many waves after the first waited for their notice to end (their first start within
    `NOTICE_BOUND_S` of their hosts' last `not_before`) rather than for the wave before them:
    with notice ahead, a wave that does spent the rest of its notice with nothing to do."""
    wave_of_host: dict[str, int] = {}
    not_before: dict[int, float] = {}
    first_start: dict[int, float] = {}
    for _, body in events:
        if body.get("rollout_id") != rid:
            continue
        kind = body.get("type")
        if kind == "MaintenancePlanned":
            wave = wave_of_host[body["host"]] = body["wave"]
            end = datetime.fromisoformat(body["not_before"]).timestamp()
            not_before[wave] = max(not_before.get(wave, end), end)
        elif kind == "MaintenanceStarted" and body["host"] in wave_of_host:
            wave = wave_of_host[body["host"]]
            at = datetime.fromisoformat(body["occurred_at"]).timestamp()
            first_start[wave] = min(first_start.get(wave, at), at)
    return sum(
        1
        for wave, start in first_start.items()
        if wave > 0 and wave in not_before and start - not_before[wave] < NOTICE_BOUND_S
    )


PER_PROCESS = ("cpu_s_during_rollout", "context_switches_during_rollout", "memory_peak_mb")
"""Figures with one entry per process: the agents' many are shown summed and as a range."""

OVERHEAD_TARGET = 0.05
"""The issue's target: the bus and the planner add at most 5 % to the theoretical minimum."""
PAUSE_P99_TARGET_MS = 10.0
"""The issue's target for the pause overhead's p99 under load."""


def per_process(figures: dict[str, float], summed: bool) -> dict[str, Any]:
    """`figures` with the agent processes' entries folded into one: their sum (`summed`) or
    their largest, and each one's range."""
    agents = [v for k, v in figures.items() if k.startswith("agents-")]
    shown: dict[str, Any] = {k: v for k, v in figures.items() if not k.startswith("agents-")}
    if agents:
        low, high = min(agents), max(agents)
        shown[f"agents ({len(agents)})"] = (
            f"{round(sum(agents), 2) if summed else high} ({low}-{high} each)"
        )
    return shown


def verdict(figure: str, met: bool, target: str, baseline: str) -> str:
    """One target's line: the figure, the target, met or not, and the same-run baseline."""
    return f"{figure} (target {target}): {'met' if met else 'NOT met'}; {baseline}"


def verdicts(result: dict[str, Any]) -> list[str]:
    """The issue's two targets against this run's figures, with the same-run baseline beside."""
    lines = []
    overhead = result.get("overhead_vs_min")
    if overhead is not None:
        lines.append(
            verdict(
                f"total vs the issue's minimum: +{overhead * 100:.1f} % "
                f"({result['total_s']} s for {result['theoretical_min_s']} s)",
                overhead <= OVERHEAD_TARGET,
                f"<= {OVERHEAD_TARGET * 100:.0f} %",
                f"the direct loop took {result['direct_total_s']} s in the same run",
            )
        )
    p99 = result.get("pause_overhead_p99_ms")
    if p99 is not None:
        lines.append(
            verdict(
                f"pause overhead p99: {p99} ms",
                p99 <= PAUSE_P99_TARGET_MS,
                f"<= {PAUSE_P99_TARGET_MS:.0f} ms",
                f"the direct loop's {result['direct_pause_overhead_p99_ms']} ms in the same run",
            )
        )
    cpu = result.get("cpu_s_during_rollout")
    if cpu and result.get("total_s"):
        agents = sum(v for k, v in cpu.items() if k.startswith("agents-"))
        total = sum(cpu.values())
        cores = os.cpu_count() or 1
        # The floor the CPU puts under the total, however the work is scheduled, beside what
        # the total's target allows: a run that needs more CPU than that cannot meet it.
        floor = ""
        if result.get("theoretical_min_s"):
            allowed_s = result["theoretical_min_s"] * (1 + OVERHEAD_TARGET)
            floor = (
                f", so at least {total / cores:.1f} s however scheduled (the total's target, "
                f"{allowed_s:.2f} s, allows {allowed_s * cores:.1f} CPU-seconds)"
            )
        lines.append(
            f"CPU: {total:.1f} CPU-seconds in {result['total_s']} s on {cores} cores "
            f"({total / result['total_s'] / cores:.0%} busy){floor}; the simulated hosts' agents "
            f"{agents:.1f} of them, the control plane and nats-server {total - agents:.1f}"
        )
    lines.append(f"messages lost: {result.get('messages_lost')}")
    stopped = result.get("services_stopped")
    if stopped:
        lines.append(f"STOPPED during the run: {', '.join(stopped)}")
        lines += [f"--- {name} ---\n{tail}" for name, tail in stopped.items()]
    left = result.get("consumers_unhandled")
    if left:
        lines.append(f"events NOT handled at the end (consumer: state): {left}")
    return lines


def printable(result: dict[str, Any]) -> str:
    """The result as a table of one figure per line (the agents folded), then the verdicts."""
    shown = {
        key: per_process(value, summed=key != "memory_peak_mb") if key in PER_PROCESS else value
        for key, value in result.items()
    }
    width = max(len(k) for k in shown)
    rows = [f"{key:<{width}}  {value}" for key, value in shown.items()]
    return "\n".join([*rows, "", *verdicts(result)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument(
        "--agents",
        type=int,
        default=100,
        help="host-agent processes (10 hosts each: a real host has its own, and windows of one "
        "process share its GIL)",
    )
    parser.add_argument(
        "--rt-priority",
        type=int,
        default=10,
        help="PP_RT_PRIORITY of the agents and of the direct loop's windows (0: off)",
    )
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--notice-s", type=float, default=1.0)
    parser.add_argument("--patch-s", type=float, default=0.1)
    parser.add_argument(
        "--notice-ahead-waves", type=int, default=1, help="the request field (0: one at a time)"
    )
    parser.add_argument("--cluster", action="store_true", help="3-node NATS cluster, R3")
    parser.add_argument("--dump-events", type=Path, help="write every stream event (JSON lines)")
    parser.add_argument(
        "--out", type=Path, help="JSON result (default bench/results/soak[-cluster].json)"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(printable(result))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / ("soak-cluster.json" if args.cluster else "soak.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
