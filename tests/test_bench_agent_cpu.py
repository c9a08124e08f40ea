"""The agent CPU bench on two small hosts: every window completes and is measured against the
direct loop's, and what the agent stored per window is read from the stream."""

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
    # On the path, as when it runs as a script: its direct loop is a process that imports it.
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_agent_cpu")
    finally:
        sys.path.remove(str(BENCH))


async def test_every_window_is_measured_against_the_direct_loop(bench: ModuleType) -> None:
    args = argparse.Namespace(
        hosts=2, vms=4, rounds=2, repeat=2, patch_s=0.01, idle_s=1.0, rt_priority=10, out=None
    )
    result = await bench.run(args)
    assert result["windows"] == 2 * 2 * 2
    # Per VM a pause and a resume, per window the host's pauses, the patch result and the
    # completion.
    assert result["events_stored_per_window"] == 4 * 2 + 3
    assert result["agent_cpu_ms_per_window_median"] > 0
    assert result["direct_cpu_ms_per_window_median"] > 0
    assert result["agent_vs_direct_median"] == pytest.approx(
        result["agent_cpu_ms_per_window_median"] / result["direct_cpu_ms_per_window_median"],
        rel=0.5,
    )
    assert result["agent_cpu_ms_per_clock_request_median"] > 0
    assert 0 < result["agent_main_thread_share"] <= 1
    # The scheduler's nanoseconds and the kernel's 10 ms ticks tell the same CPU time.
    ticks = result["agent_cpu_s_ticks"]
    assert abs(result["agent_cpu_s_measured"] - ticks) <= 0.05 + 0.25 * ticks
