"""Per-process liveness of a service's consume loops, for its container's health check.

A replica of a service that shares one durable consumer with others (clock-sync) cannot be told
alive by the consumer's state: while one replica is stuck in its handler, the other's pull
requests keep the consumer looking served. So each batch loop notes every turn it takes
(`turned`: it turns at least once a second while idle, once per batch under load), and the
service writes, every `WRITE_EVERY_S`, a small file in its state directory saying which loops
have not turned for `LOOP_STALL_S` (`keep`). The health check (`deploy/docker/healthcheck.py`)
reads the files of the live processes of its container (`problems`): a loop that stopped
turning, or a file no longer written (the event loop itself stuck), is unhealthy.

The file is named after the service, the host name and the process id, so that replicas sharing
a state directory (the local stack) keep one file each, and a file left by a process that is
gone is passed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOOP_STALL_S = 60.0
"""A consume loop that has not turned for this long is stuck (an idle one turns every second;
one waiting on its own bound of work in flight, during a bus outage, may pause for a while)."""

WRITE_EVERY_S = 2.0
"""How often a service writes its liveness file."""

FILE_STALE_S = 30.0
"""A liveness file of a live process not written for this long: its event loop is stuck."""

_turns: dict[str, float] = {}
"""Consume loop (its consumer's name) -> monotonic time of its last turn."""


def turned(loop: str) -> None:
    """A consume loop takes a turn."""
    _turns[loop] = time.monotonic()


def forget(loop: str) -> None:
    """A consume loop has stopped (its subscriber stopped)."""
    _turns.pop(loop, None)


def stalled(now: float | None = None) -> list[str]:
    """The loops that have not turned for `LOOP_STALL_S`."""
    now = time.monotonic() if now is None else now
    return sorted(name for name, at in _turns.items() if now - at > LOOP_STALL_S)


def path_for(state_dir: Path, service: str, pid: int | None = None) -> Path:
    """The liveness file of this process (or of `pid`) of `service`."""
    return state_dir / f"{service}-{socket.gethostname()}-{pid or os.getpid()}.alive"


def write(state_dir: Path, service: str) -> Path:
    """Write this process's liveness file now (atomically: a reader never sees half of it)."""
    path = path_for(state_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"written_at": time.time(), "loops": sorted(_turns), "stalled": stalled()}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(body))
    partial.replace(path)
    return path


async def keep(state_dir: Path, service: str) -> None:
    """Write the liveness file every `WRITE_EVERY_S` until cancelled, then remove it."""
    path = path_for(state_dir, service)
    try:
        while True:
            try:
                write(state_dir, service)
            except OSError as exc:  # a full or read-only disk: said, and tried again
                log.warning("writing %s failed: %s", path, exc)
            await asyncio.sleep(WRITE_EVERY_S)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def problems(state_dir: Path, service: str, now: float | None = None) -> list[str]:
    """What the liveness files of this host's live `service` processes say is wrong: a file not
    written for `FILE_STALE_S`, or a consume loop stalled. Empty when all is well, or when no
    such file exists (a service that writes none, or not yet)."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(state_dir.glob(f"{service}-{socket.gethostname()}-*.alive")):
        pid = path.stem.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            continue  # left by a process that is gone
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            found.append(f"{path.name}: unreadable ({exc})")
            continue
        age = now - float(body.get("written_at", 0))
        if age > FILE_STALE_S:
            found.append(f"{path.name}: not written for {age:.0f} s (its event loop is stuck)")
        for loop in body.get("stalled", []):
            found.append(f"{path.name}: consumer {loop} has not turned for {LOOP_STALL_S:.0f} s")
    return found
