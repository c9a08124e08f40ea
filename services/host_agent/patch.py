"""Running the patch inside the pause window, never past its deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from shared.contracts import PatchSpec, utcnow

OUTPUT_TAIL_BYTES = 2000


@dataclass(frozen=True)
class PatchResult:
    """How the patch went."""

    ok: bool
    started_at: datetime
    finished_at: datetime
    duration_ms: float
    timed_out: bool
    exit_code: int | None
    error: str | None


async def run_patch(
    spec: PatchSpec, deadline: float, on_spawn: Callable[[int], None] | None = None
) -> PatchResult:
    """Apply `spec`, stopping at `deadline` (a `time.monotonic()` value).

    A command runs in its own process group (a new session) so that, at the deadline, the whole
    group is killed, children included. Its output goes to a temporary file rather than a pipe: a
    grandchild holding a pipe open could otherwise keep us waiting.
    """
    started_at, t0 = utcnow(), time.monotonic()
    remaining = max(0.0, deadline - t0)
    if spec.duration_s is not None:
        timed_out = spec.duration_s > remaining
        await asyncio.sleep(min(spec.duration_s, remaining))
        return _result(started_at, t0, timed_out, 0 if not timed_out else None, None)

    assert spec.command is not None
    with tempfile.TemporaryFile() as output:
        proc = await asyncio.create_subprocess_shell(
            spec.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
        if on_spawn is not None:
            on_spawn(proc.pid)
        try:
            exit_code: int | None = await asyncio.wait_for(proc.wait(), remaining)
            timed_out = False
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            exit_code, timed_out = None, True
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        output.seek(0, os.SEEK_END)
        size = output.tell()
        output.seek(max(0, size - OUTPUT_TAIL_BYTES))
        tail = output.read().decode(errors="replace").strip()
    return _result(started_at, t0, timed_out, exit_code, tail)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _result(
    started_at: datetime, t0: float, timed_out: bool, exit_code: int | None, tail: str | None
) -> PatchResult:
    duration_ms = (time.monotonic() - t0) * 1000
    error = None
    if timed_out:
        error = "patch exceeded the pause budget and was killed"
    elif exit_code not in (0, None):
        error = f"patch exited with status {exit_code}"
    if error and tail:
        error = f"{error}: {tail[-500:]}"
    return PatchResult(
        ok=not timed_out and exit_code == 0,
        started_at=started_at,
        finished_at=utcnow(),
        duration_ms=duration_ms,
        timed_out=timed_out,
        exit_code=exit_code,
        error=error,
    )
