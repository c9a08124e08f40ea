"""What publishing an event costs its sender: the services' `EventPublisher` against a bare nats-py
publisher in the same run.

    .venv/bin/python bench/bench_publish.py [--events 20000] [--rounds 7] [--out F]

Every VM of a window is two events from its host's agent and one from clock-sync, each stored in
the `PAUSEPATCH` stream before it counts: at fleet scale, the sender's CPU per event is what the
agents and clock-sync spend most on. On its own nats-server (a free loopback port), one process
publishes `--events` `VMResumed` events per round, three ways, alternated round after round:

- `bare nats-py` (the baseline): the event's JSON with its `Nats-Msg-Id`, written in windows of
  256 with nats-py's `publish_async` and the window's acks awaited together; nothing else.
- `EventPublisher`: what the services use (queue, headers, trace context, retries).
- `FastStream publish`: `broker.publish` with the same id and stream, a window of 256 gathered,
  as `EventPublisher` did before it wrote to JetStream itself.

Figures: the sender's CPU per event (median and worst of the rounds, `time.process_time`), as a
ratio against the baseline's median, and events per second. Prints a table and writes
bench/results/publish.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_soak import machine_speed, ways_summary, ways_table, write_result

from shared import subjects
from shared.bus import EventPublisher, declare_streams, make_broker
from shared.contracts import VMResumed, utcnow
from shared.devstack import NatsServer, temp_workdir
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

RESULTS = Path(__file__).resolve().parent / "results" / "publish.json"
WINDOW = 256


def events(count: int) -> list[VMResumed]:
    """`count` resumes, as an agent emits them."""
    now = utcnow()
    return [
        VMResumed(
            host=f"sim-{i // 20:05d}",
            vm=f"sim-{i // 20:05d}-v{i % 20:02d}",
            rollout_id="bench",
            paused_at=now,
            resumed_at=now + timedelta(milliseconds=100),
            paused_ms=100.0,
            budget_ms=30_000,
            forced=False,
            ok=True,
        )
        for i in range(count)
    ]


async def bare(js: Any, batch: list[VMResumed]) -> None:
    """The least a sender does: serialize, publish with the id, await the acks per window."""
    for start in range(0, len(batch), WINDOW):
        acks = []
        for event in batch[start : start + WINDOW]:
            acks.append(
                await js.publish_async(
                    event.subject(),
                    event.model_dump_json().encode(),
                    stream=subjects.STREAM_NAME,
                    headers={"Nats-Msg-Id": str(event.event_id)},
                )
            )
        done, late = await asyncio.wait(acks, timeout=10)
        if late or any(a.exception() for a in done):
            raise RuntimeError("the baseline lost an event")


async def with_publisher(publisher: EventPublisher, batch: list[VMResumed]) -> None:
    for event in batch:
        publisher.emit(event)
    if not await publisher.drain(timeout=60):
        raise RuntimeError("EventPublisher did not store every event")


async def with_faststream(broker: Any, batch: list[VMResumed]) -> None:
    for start in range(0, len(batch), WINDOW):
        await asyncio.gather(
            *(
                broker.publish(
                    event.to_json(),
                    event.subject(),
                    headers={"Nats-Msg-Id": str(event.event_id)},
                    stream=subjects.STREAM_NAME,
                    timeout=10,
                )
                for event in batch[start : start + WINDOW]
            )
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    speed = machine_speed()
    with temp_workdir("pausepatch-publish-") as workdir:
        server = NatsServer(workdir).start()
        try:
            broker = make_broker(
                "host-agent", BusSettings(nats_url=server.url), setup_telemetry("bench")
            )
            await broker.connect()
            await declare_streams(broker)
            js = broker.config.connection_state.stream
            publisher = EventPublisher(broker)
            ways: dict[str, Callable[[list[VMResumed]], Awaitable[None]]] = {
                "bare nats-py": lambda batch: bare(js, batch),
                "EventPublisher": lambda batch: with_publisher(publisher, batch),
                "FastStream publish": lambda batch: with_faststream(broker, batch),
            }
            cpu: dict[str, list[float]] = {name: [] for name in ways}
            rate: dict[str, list[float]] = {name: [] for name in ways}
            await ways["bare nats-py"](events(2000))  # connections and caches warm
            for _ in range(args.rounds):
                for name, way in ways.items():
                    batch = events(args.events)  # new ids: each round is stored anew
                    await js.purge_stream(subjects.STREAM_NAME)
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    await way(batch)
                    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
                    info = await js.stream_info(subjects.STREAM_NAME)
                    if info.state.messages != args.events:
                        raise RuntimeError(f"{name}: {info.state.messages} stored")
                    cpu[name].append(cpu_s / args.events * 1e6)
                    rate[name].append(args.events / wall_s)
            await publisher.stop()
            await broker.stop()
        finally:
            server.stop()
    return {
        "events": args.events,
        "rounds": args.rounds,
        **ways_summary(cpu, rate, "bare nats-py", "vs_bare"),
        "machine_speed": speed,
    }


def table(result: dict[str, Any]) -> Any:
    title = f"{result['events']:,} events per round, {result['rounds']} rounds"
    return ways_table(result, title, "sender", "vs_bare", "vs bare")


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
