"""The planner-scale bench on a small fleet: a whole rollout through a real engine and KV
bucket, and its baseline of bare KV writes, both counted right."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from shared.client import connect
from shared.devstack import NatsServer

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))  # as when it runs as a script: it imports bench_planning
    try:
        yield importlib.import_module("bench_planner_scale")
    finally:
        sys.path.remove(str(BENCH))


async def test_every_host_goes_through_the_engine_and_the_baseline_writes_as_much(
    bench: ModuleType, nats_server: NatsServer
) -> None:
    hosts = 240
    (row,) = await bench.measure(nats_server.url, [hosts], runs=1)
    engine, baseline = row["engine"], row["baseline"]
    # 20 UDs per set in the round-robin fleet: at least 20 waves, and more than one per
    # hundred hosts in flight; the baseline ran the engine's own waves.
    assert row["waves"] >= 20 and row["hosts"] == hosts
    # Each host record is written at submit, at its notice, its start and its completion; the
    # rollout's record a few times per wave, never once per host done.
    assert 4 * hosts <= engine["kv_writes"] < 4 * hosts + 5 * row["waves"]
    for figure in ("submit_ms", "advance_ms", "completions_total_ms", "completion_ms_p99"):
        assert engine[figure] > 0 and baseline[figure] > 0
    # The rollout's own record was read back from the bucket.
    assert engine["rollout_record_bytes"] > 0
    assert row["completion_per_host_ms"] == pytest.approx(engine["completions_total_ms"] / hosts)
    assert row["advance_vs_baseline"] == pytest.approx(
        engine["advance_ms"] / baseline["advance_ms"]
    )
    # Each run's fresh bucket is gone again: nothing is left on the server.
    nc = await connect(nats_server.url)
    try:
        assert [s.config.name for s in await nc.jetstream().streams_info()] == []
    finally:
        await nc.close()
