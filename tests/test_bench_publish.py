"""The publish bench on a few events: every way stores every event, and each is measured."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_publish")
    finally:
        sys.path.remove(str(BENCH))


async def test_every_sender_stores_every_event_and_is_measured(bench: ModuleType) -> None:
    result = await bench.run(argparse.Namespace(events=600, rounds=2, out=None))
    per = result["cpu_us_per_event_median"]
    assert set(per) == {"bare nats-py", "EventPublisher", "FastStream publish"}
    assert all(value > 0 for value in per.values())
    assert result["vs_bare"]["bare nats-py"] == 1.0
    assert all(rate > 0 for rate in result["events_per_s_median"].values())
