"""What reading events costs a pull consumer: nats-py's `fetch` with its own `next_msg` against
the same `fetch` with the services' `next_msg` (`shared.bus`), in the same run.

    .venv/bin/python bench/bench_fetch.py [--events 20000] [--rounds 7] [--out F]

The planner reads every VM's pause, resume and clock result, and clock-sync every resume, through
pull consumers that fetch batches of up to 256. nats-py hands each message of a batch over through
`Subscription.next_msg`, which makes two tasks, a timer and a random UUID per message even when
the message is already waiting; the services' `next_msg` hands a waiting message over at once.
On its own nats-server (a free loopback port), `--events` `VMResumed` events are stored once;
each round reads them all through a new pull consumer (no acknowledgements, so that only the
reading is measured), in batches of 256 as the services fetch, once each way, alternated:

- `nats-py next_msg` (the baseline): nats-py as released.
- `services' next_msg`: what every service runs.

Figures: the reader's CPU per event (median and worst of the rounds, `time.process_time`), as a
ratio against the baseline's median, and events per second. Prints a table and writes
bench/results/fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_publish import bare, events
from bench_soak import machine_speed, ways_summary, ways_table, write_result

from shared import bus, subjects
from shared.bus import declare_streams, make_broker
from shared.devstack import NatsServer, temp_workdir
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

RESULTS = Path(__file__).resolve().parent / "results" / "fetch.json"
BATCH = 256
WAYS = {
    "nats-py next_msg": bus._NEXT_MSG_NATS,
    "services' next_msg": bus._next_msg_ready_first,
}


async def read_all(js: Any, durable: str, count: int) -> int:
    """Every stored event through a new pull consumer, in batches of `BATCH`."""
    sub = await js.pull_subscribe(
        subjects.vm_resumed(),
        durable=durable,
        stream=subjects.STREAM_NAME,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    read = 0
    try:
        while read < count:
            try:
                read += len(await sub.fetch(BATCH, timeout=0.05))
            except nats.errors.TimeoutError:
                continue
    finally:
        await js.delete_consumer(subjects.STREAM_NAME, durable)
    return read


async def run(args: argparse.Namespace) -> dict[str, Any]:
    speed = machine_speed()
    cpu: dict[str, list[float]] = {name: [] for name in WAYS}
    rate: dict[str, list[float]] = {name: [] for name in WAYS}
    with temp_workdir("pausepatch-fetch-") as workdir:
        server = NatsServer(workdir).start()
        try:
            broker = make_broker(
                "planner", BusSettings(nats_url=server.url), setup_telemetry("bench")
            )
            await broker.connect()
            await declare_streams(broker)
            js = broker.config.connection_state.stream
            await bare(js, events(args.events))
            n = 0
            for _ in range(args.rounds):
                for name, next_msg in WAYS.items():
                    n += 1
                    Subscription.next_msg = next_msg  # type: ignore[method-assign]
                    try:
                        cpu0, wall0 = time.process_time(), time.perf_counter()
                        read = await read_all(js, f"bench-{n}", args.events)
                        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
                    finally:
                        Subscription.next_msg = bus._next_msg_ready_first  # type: ignore[method-assign]
                    if read != args.events:
                        raise RuntimeError(f"{name}: {read} events read of {args.events}")
                    cpu[name].append(cpu_s / args.events * 1e6)
                    rate[name].append(args.events / wall_s)
            await broker.stop()
        finally:
            server.stop()
    return {
        "events": args.events,
        "rounds": args.rounds,
        "batch": BATCH,
        **ways_summary(cpu, rate, "nats-py next_msg", "vs_nats_py"),
        "machine_speed": speed,
    }


def table(result: dict[str, Any]) -> Any:
    title = (
        f"{result['events']:,} events per round, batches of {result['batch']}, "
        f"{result['rounds']} rounds"
    )
    return ways_table(result, title, "reader", "vs_nats_py", "vs nats-py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Console(width=140).print(table(result))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
