"""Running the patch inside the pause window, never past its deadline."""

from __future__ import annotations

import os
import select
import signal
import subprocess
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


def run_patch(
    spec: PatchSpec,
    deadline: float,
    on_spawn: Callable[[int | None], None] | None = None,
    env: dict[str, str] | None = None,
) -> PatchResult:
    """Apply `spec`, stopping at `deadline` (a `time.monotonic()` value). Blocking: it runs on the
    window's own thread, where nothing else competes with it. `on_spawn(pgid)` is called once the
    patch runs (with None for a simulated patch). `env` is added to the command's environment.

    A command runs in its own process group (a new session) so that, at the deadline, the whole
    group is killed, children included. Its output goes to a temporary file rather than a pipe: a
    grandchild holding a pipe open could otherwise keep us waiting.
    """
    started_at, t0 = utcnow(), time.monotonic()
    remaining = max(0.0, deadline - t0)
    if spec.duration_s is not None:
        if on_spawn is not None:
            on_spawn(None)
        timed_out = spec.duration_s > remaining
        time.sleep(min(spec.duration_s, remaining))
        return _result(started_at, t0, timed_out, None if timed_out else 0, None)

    assert spec.command is not None
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            spec.command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        if on_spawn is not None:
            on_spawn(proc.pid)
        exit_code: int | None
        if _exits_within(proc, remaining):
            exit_code, timed_out = proc.wait(), False
        else:
            kill_group(proc.pid)
            proc.wait()
            exit_code, timed_out = None, True
        output.seek(0, os.SEEK_END)
        output.seek(max(0, output.tell() - OUTPUT_TAIL_BYTES))
        tail = output.read().decode(errors="replace").strip()
    return _result(started_at, t0, timed_out, exit_code, tail)


def _exits_within(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for `proc` to exit, waking the moment it does (a pidfd), at most `timeout`.

    `Popen.wait(timeout)` polls with sleeps of up to 50 ms: that would add to every pause.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # kernel without pidfd (< 5.3): polling is all there is
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def kill_group(pgid: int) -> bool:
    """SIGKILL a process group; False if it is gone already."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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
