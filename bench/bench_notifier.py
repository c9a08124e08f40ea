"""Scheduled Events GET latency and throughput on loopback: the real notifier process (its own
nats-server, 1,000 VMs known from inventories, events scheduled) against a bare FastAPI endpoint
returning the same document as a constant, measured in the same run, same uvicorn settings.

The load generator is a separate process: 50 keep-alive pollers, each a distinct VM (its own
127.0.x.y source address, so the notifier identifies every request's caller). Two phases per
target: "saturated" (each poller sends its next request as soon as the answer is in: the
throughput) and "paced" (the 50 pollers together at a fixed rate, latency measured from the
scheduled send time so that a stall is not hidden: the latency a fleet polling at that rate sees).

    .venv/bin/python bench/bench_notifier.py [--seconds 5] [--rate 2000] [--repeats 3]

Each phase runs `--repeats` times, interleaved across the targets so all see the same background
load; the table shows medians, the JSON every run. Prints a table and writes
bench/results/notifier.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared import subjects  # noqa: E402
from shared.client import connect  # noqa: E402
from shared.contracts import HostInventory, MaintenancePlanned, VMInfo, utcnow  # noqa: E402
from shared.devstack import LocalStack, free_port, temp_workdir, wait_until  # noqa: E402

PATH = "/metadata/scheduledevents?api-version=2020-07-01"
HOSTS, VMS_PER_HOST, SETS, SCHEDULED_HOSTS = 100, 10, 50, 10
POLLERS = 50
RESULTS = REPO / "bench" / "results" / "notifier.json"


def vm_ip(index: int) -> str:
    """VM `index`'s loopback address: 127.0.2.1 onwards."""
    return f"127.0.{2 + index // 250}.{1 + index % 250}"


# ---------------------------------------------------------------- the fleet


async def publish_fleet(nats_url: str) -> int:
    """1,000 VMs on 100 hosts in 50 sets; 10 hosts with a scheduled Freeze. Returns the stream's
    last sequence."""
    nc = await connect(nats_url)
    js = nc.jetstream()
    for _ in range(200):
        try:
            await js.stream_info(subjects.STREAM_NAME)
            break
        except Exception:  # noqa: BLE001 - the planner declares it
            await asyncio.sleep(0.1)
    seq = 0
    for h in range(HOSTS):
        host = f"h{h:03d}"
        vms = []
        for v in range(VMS_PER_HOST):
            i = h * VMS_PER_HOST + v
            vms.append(
                VMInfo(
                    vm=f"vm{i:04d}",
                    uuid=str(uuid.uuid4()),
                    availability_set=f"set{i % SETS:02d}",
                    update_domain=h % 5,
                    fault_domain=h % 3,
                    ip=vm_ip(i),
                    state="running",
                )
            )
        events: list[Any] = [HostInventory(host=host, vms=vms)]
        if h < SCHEDULED_HOSTS:
            events.append(
                MaintenancePlanned(
                    host=host,
                    rollout_id="bench",
                    update_id="bench",
                    scheduled_event_id=uuid.uuid4(),
                    wave=0,
                    event_type="Freeze",
                    not_before=utcnow() + timedelta(hours=1),
                    expected_pause_s=2,
                    pause_budget_s=10,
                    vms=[vm.vm for vm in vms],
                )
            )
        for event in events:
            ack = await js.publish(
                event.subject(),
                json.dumps(event.to_json()).encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
            seq = ack.seq
    await nc.close()
    return seq


def http_get(url: str, source: str | None = None) -> tuple[int, bytes]:
    """One GET (urllib cannot bind a source address: use a raw socket for that)."""
    if source is None:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    import http.client

    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5, source_address=(source, 0))
    conn.request("GET", PATH, headers={"Metadata": "true"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


# ---------------------------------------------------------------- the baseline server


def serve_baseline(port: int, document: bytes) -> None:
    """A bare FastAPI endpoint returning the document as a constant (dict, FastAPI's default
    serialisation), under the same uvicorn settings as the notifier."""
    import uvicorn
    import uvloop
    from fastapi import FastAPI

    constant = json.loads(document)
    app = FastAPI()

    @app.get("/metadata/scheduledevents")
    async def scheduled_events() -> dict[str, Any]:
        return constant  # type: ignore[no-any-return]

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        backlog=4096,
    )
    uvloop.run(uvicorn.Server(config).serve())


# ---------------------------------------------------------------- the load generator


async def poller(
    port: int,
    source: str,
    request: bytes,
    conditional: bool,
    interval: float | None,
    start: float,
    end: float,
    latencies: list[tuple[float, float]],
    statuses: dict[int, int],
) -> None:
    """One keep-alive connection from `source`; saturated when `interval` is None."""
    clock = time.perf_counter  # uvloop's loop.time() has a resolution of 1 ms only
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if conditional:
        # Its own document's ETag first: from then on the poller is answered 304.
        writer.write(request + b"\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        await reader.readexactly(int(fields[b"content-length"]))
        request += b"If-None-Match: " + fields[b"etag"] + b"\r\n"
    request += b"\r\n"
    scheduled = start
    while True:
        if interval is not None:
            now = clock()
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
        sent = clock()
        if sent >= end:
            break
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await reader.readexactly(length)
        done = clock()
        # Paced: from the scheduled send time, so a stalled server is not hidden.
        # (from the scheduled time, from the actual send): the second leaves out the load
        # generator's own lag, the first is what a fleet polling at that rate would see.
        latencies.append((done - (scheduled if interval is not None else sent), done - sent))
        statuses[status] = statuses.get(status, 0) + 1
        if interval is not None:
            scheduled += interval
    writer.close()


def run_load(port: int, seconds: float, rate: float | None, conditional: bool) -> dict[str, Any]:
    """One phase in this (separate) process; returns throughput and latency figures."""
    import uvloop

    request = f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n".encode()

    async def main() -> dict[str, Any]:
        latencies: list[tuple[float, float]] = []
        statuses: dict[int, int] = {}
        warm = time.perf_counter() + 1.0
        interval = POLLERS / rate if rate else None
        # Warm-up second (connections, caches), then the measured window.
        await asyncio.gather(
            *(
                poller(
                    port,
                    vm_ip(i * 17),
                    request,
                    conditional,
                    interval,
                    time.perf_counter(),
                    warm,
                    [],
                    {},
                )
                for i in range(POLLERS)
            )
        )
        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(
            *(
                poller(
                    port,
                    vm_ip(i * 17),
                    request,
                    conditional,
                    interval,
                    start + (interval or 0) * i / POLLERS,
                    end,
                    latencies,
                    statuses,
                )
                for i in range(POLLERS)
            )
        )
        elapsed = time.perf_counter() - start
        ordered = sorted(lat for lat, _ in latencies)
        served = sorted(lat for _, lat in latencies)
        return {
            "requests": len(ordered),
            "rps": len(ordered) / elapsed,
            "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
            "max_ms": ordered[-1] * 1000,
            "p50_from_send_ms": statistics.median(served) * 1000,
            "p99_from_send_ms": served[int(len(served) * 0.99) - 1] * 1000,
            "statuses": {str(k): v for k, v in statuses.items()},
        }

    return uvloop.run(main())


def phase(
    port: int, seconds: float, rate: float | None, conditional: bool = False
) -> dict[str, Any]:
    """Run one phase in a child process (the load generator never shares the server's core)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            str(port),
            "--seconds",
            str(seconds),
            "--rate",
            str(rate or 0),
            *(["--conditional"] if conditional else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the run


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats, and every run as measured."""
    figures = ("rps", "p50_ms", "p99_ms", "max_ms", "p50_from_send_ms", "p99_from_send_ms")
    return {
        **{key: statistics.median(run[key] for run in runs) for key in figures},
        "runs": runs,
    }


def measure(seconds: float, rate: float, repeats: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    with temp_workdir("pp-bench-notifier-") as workdir:
        stack = LocalStack(workdir, extra_env={"OTEL_SDK_DISABLED": "true"})
        stack.start_nats()
        notifier_port, baseline_port = free_port(), free_port()
        baseline: subprocess.Popen[bytes] | None = None
        try:
            stack.start_service("planner", "planner", (), PP_LOG_LEVEL="WARNING")
            last_seq = asyncio.run(publish_fleet(stack.nats_url))
            stack.start_service(
                "notifier",
                "notifier",
                ["--listen", f"127.0.0.1:{notifier_port}"],
                PP_LOG_LEVEL="WARNING",
            )

            def ready() -> bool:
                try:
                    status, body = http_get(f"http://127.0.0.1:{notifier_port}/healthz")
                    return status == 200 and json.loads(body)["seq"] >= last_seq
                except OSError:
                    return False

            wait_until(ready, 60, "the notifier to apply the fleet")
            status, document = http_get(f"http://127.0.0.1:{notifier_port}{PATH}", vm_ip(0))
            assert status == 200 and json.loads(document)["Events"], document
            baseline = subprocess.Popen(
                [sys.executable, __file__, "--serve-baseline", str(baseline_port)],
                stdin=subprocess.PIPE,
            )
            assert baseline.stdin is not None
            baseline.stdin.write(document)
            baseline.stdin.close()
            wait_until(
                lambda: _answers(f"http://127.0.0.1:{baseline_port}{PATH}"), 30, "the baseline"
            )
            targets = {
                "notifier_200": (notifier_port, False),
                "notifier_304": (notifier_port, True),
                "baseline": (baseline_port, False),
            }
            # Interleaved repeats, so that every target sees the same background load.
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                name: {"saturated": [], "paced": []} for name in targets
            }
            for _ in range(repeats):
                for name, (port, conditional) in targets.items():
                    runs[name]["saturated"].append(phase(port, seconds, None, conditional))
                    runs[name]["paced"].append(phase(port, seconds, rate, conditional))
            results = {
                name: {mode: _median_run(r) for mode, r in by_mode.items()}
                for name, by_mode in runs.items()
            }
        finally:
            if baseline is not None:
                baseline.terminate()
                baseline.wait(10)
            stack.stop()
    return {
        "vms_known": HOSTS * VMS_PER_HOST,
        "pollers": POLLERS,
        "paced_rate_rps": rate,
        "seconds_per_phase": seconds,
        "repeats": repeats,
        "document_bytes": len(document),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": results,
        "ratios_vs_baseline": {
            name: {
                "saturated_rps": results[name]["saturated"]["rps"]
                / results["baseline"]["saturated"]["rps"],
                "paced_p50": results[name]["paced"]["p50_ms"]
                / results["baseline"]["paced"]["p50_ms"],
                "paced_p99": results[name]["paced"]["p99_ms"]
                / results["baseline"]["paced"]["p99_ms"],
            }
            for name in ("notifier_200", "notifier_304")
        },
    }


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def table(report: dict[str, Any]) -> str:
    """The results as a text table (medians; ratios against the baseline)."""
    rate = format(report["paced_rate_rps"], "g")
    rows = [
        f"GET /metadata/scheduledevents, {report['vms_known']} VMs known, "
        f"{report['pollers']} pollers, {report['seconds_per_phase']:g} s per phase, "
        f"medians of {report['repeats']} runs (load average before: "
        f"{report['machine']['load_average_before'][0]:.1f})",
        f"{'':<14}{'--- saturated ---':^27}{'--- paced at ' + rate + ' req/s ---':^36}"
        f"{'--- vs baseline ---':^22}",
        f"{'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p99 send':>10}{'max ms':>8}{'req/s':>11}{'paced p99':>11}",
    ]
    for name, r in report["results"].items():
        ratio = report["ratios_vs_baseline"].get(name, {"saturated_rps": 1.0, "paced_p99": 1.0})
        sat, paced = r["saturated"], r["paced"]
        rows.append(
            f"{name:<14}{sat['rps']:>9.0f}{sat['p50_ms']:>9.2f}{sat['p99_ms']:>9.2f}"
            f"{paced['p50_ms']:>9.2f}{paced['p99_ms']:>9.2f}{paced['p99_from_send_ms']:>10.2f}"
            f"{paced['max_ms']:>8.0f}{ratio['saturated_rps']:>11.2f}{ratio['paced_p99']:>11.2f}"
        )
    rows.append(
        "p99 send: from the request's actual send (leaves out the load generator's own lag); "
        "the other paced figures count from the scheduled send time."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--rate", type=float, default=2000.0, help="paced phase: total req/s")
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase (medians kept)")
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--conditional", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, sys.stdin.buffer.read())
        return
    if args.load:
        print(json.dumps(run_load(args.load, args.seconds, args.rate or None, args.conditional)))
        return
    report = measure(args.seconds, args.rate, args.repeats)
    print(table(report))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
