"""The heartbeat bench on a small fleet: the planner, the notifier and the bare reader each read
every inventory, and the planner's catching up is seen."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

from shared.client import PlannerClient, connect
from shared.devstack import LocalStack
from tests.support.fleet import wait_stream

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    # On the path, as when it runs as a script: its bare reader is a process that imports it.
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_inventory")
    finally:
        sys.path.remove(str(BENCH))


async def test_every_reader_reads_every_inventory_and_is_measured(bench: ModuleType) -> None:
    args = argparse.Namespace(hosts=60, vms=20, rounds=2, out=None)
    result = await bench.run(args)
    assert result["inventories"] == 120 and result["inventory_bytes"] > 3000
    # The bare reader read every inventory of the measured rounds, and none of the first.
    assert result["bare_reader_read"] == 120
    per = result["cpu_us_per_inventory"]
    assert set(per) == {"planner", "notifier", "nats", "bare reader"}
    assert all(value > 0 for value in per.values())
    assert result["vs_bare_reader"]["bare reader"] == 1.0
    assert result["planner_lag_after_last_publish_s"] >= 0


async def test_a_planner_that_never_catches_up_fails_the_bench_saying_why(
    bench: ModuleType, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bench waited for ever on a planner that never showed the round (a CI run hung 300 s
    # there, with nothing said): it now gives up after its wait, with the planner's state.
    monkeypatch.setattr(bench, "WAIT_S", 1.0)
    stack.start_service("planner", "planner")
    nc = await connect(stack.nats_url)
    try:
        await wait_stream(nc)
        never = datetime.now(UTC)  # no inventory carries this stamp
        with pytest.raises(RuntimeError, match="never read the round") as failed:
            await bench.planner_caught_up(PlannerClient(nc), never, 1, stack)
    finally:
        await nc.close()
    assert "planner running; its log ends:" in str(failed.value)
