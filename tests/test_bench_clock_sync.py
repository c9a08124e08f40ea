"""The clock-sync CPU bench on three small hosts: every resume gets its result, once, from
clock-sync and then from the bare loop, and each is measured."""

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
    # On the path, as when it runs as a script: its bare loop is a process that imports it.
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_clock_sync")
    finally:
        sys.path.remove(str(BENCH))


async def test_every_resume_is_synced_once_by_clock_sync_then_by_the_bare_loop(
    bench: ModuleType,
) -> None:
    args = argparse.Namespace(hosts=3, vms=4, rounds=2, out=None)
    result = await bench.run(args)
    # Each phase: a warm-up round and the measured ones, every VM of every host once.
    assert result["vms_synced"] == 2 * (1 + 2) * 3 * 4
    assert len(result["clock_sync_cpu_ms_per_vm"]) == len(result["bare_cpu_ms_per_vm"]) == 2
    assert result["clock_sync_cpu_ms_per_vm_median"] > 0
    assert result["bare_cpu_ms_per_vm_median"] > 0
    assert result["clock_sync_vs_bare_median"] == pytest.approx(
        result["clock_sync_cpu_ms_per_vm_median"] / result["bare_cpu_ms_per_vm_median"], rel=0.5
    )
