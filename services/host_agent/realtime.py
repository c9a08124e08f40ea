"""Real-time priority for the agent while a pause window is open.

A VM's pause is a handful of short libvirt calls; on a busy host, the time between them is spent
waiting for a core (run-queue waits of tens of milliseconds under load, see docs/RELIABILITY.md).
While a window is open, every thread of the agent runs `SCHED_FIFO` (the window's own thread one
step above the others, so that the thread holding the GIL is never one that the rest of the host
keeps off a core), and goes back to the normal policy when the last window closes. The patch runs
in a child process at the normal policy (`SCHED_RESET_ON_FORK`): it competes with the rest of the
host as it would anyway.

It needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` at least as high): without it, the agent says so
once and runs its windows at the normal policy. `PP_RT_PRIORITY=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

MAX_PRIORITY = 98
"""Leaves 99 (the kernel's own threads: watchdogs, migration) above the agent."""


def thread_ids() -> list[int]:
    """Every thread of this process (Linux)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def policy_of(tid: int) -> int:
    """A thread's scheduling policy, without the reset-on-fork flag."""
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


class RealtimeWindows:
    """Counts the open windows of this process: the first raises every thread, the last lowers
    them all again. Shared by the windows of a process (`shared_realtime`)."""

    def __init__(self, priority: int) -> None:
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"real-time priority must be 0 (off) to {MAX_PRIORITY}")
        self.priority = priority
        self.enabled = priority > 0 and hasattr(os, "SCHED_FIFO")
        self._lock = threading.Lock()
        self._open = 0

    def enter(self) -> bool:
        """On a window's own thread, as it opens: True if it runs real-time."""
        if not self.enabled:
            return False
        with self._lock:
            if not self.enabled:
                return False
            try:
                if self._open == 0:
                    # Every thread one step below the windows' (the event loop, the pools).
                    for tid in thread_ids():
                        self._set(tid, os.SCHED_FIFO, max(1, self.priority - 1))
                self._set(0, os.SCHED_FIFO, self.priority)
            except PermissionError as exc:
                self.enabled = False
                self._restore_all()
                log.warning(
                    "pause windows run at the normal scheduling policy: real-time priority %d "
                    "refused (%s; the agent needs CAP_SYS_NICE, or PP_RT_PRIORITY=0)",
                    self.priority,
                    exc,
                )
                return False
            self._open += 1
            return True

    def exit(self) -> None:
        """On the same thread, once the window's VMs are running again."""
        with self._lock:
            if self._open == 0:
                return
            self._open -= 1
            if self._open == 0:
                self._restore_all()
            else:
                # Other windows are open: this thread stays with the rest, below them.
                self._set(0, os.SCHED_FIFO, max(1, self.priority - 1))

    @contextmanager
    def window(self) -> Iterator[bool]:
        """`enter` and `exit` around a window's code, on its thread (yields what `enter` said)."""
        entered = self.enter()
        try:
            yield entered
        finally:
            if entered:
                self.exit()

    @property
    def open_windows(self) -> int:
        return self._open

    def _restore_all(self) -> None:
        for tid in thread_ids():
            try:
                self._set(tid, os.SCHED_OTHER, 0)
            except PermissionError:
                pass

    @staticmethod
    def _set(tid: int, policy: int, priority: int) -> None:
        try:
            # Reset on fork: a thread or process started from here (the patch) is not real-time.
            os.sched_setscheduler(tid, policy | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        except ProcessLookupError:
            pass  # the thread ended meanwhile


WINDOW_SWITCH_INTERVAL_S = 0.0005
"""How often the GIL changes hands while a window is open: a window's thread waiting on it when
the patch ends gets it within half a millisecond, not the interpreter's default 5 ms."""

_switching = threading.Lock()
_switching_open = 0
_switch_interval_before = sys.getswitchinterval()


@contextmanager
def quick_gil_handoff() -> Iterator[None]:
    """While any window of the process is open, the GIL changes hands every
    `WINDOW_SWITCH_INTERVAL_S`; once the last one closes, at the interval it had before. Each
    forced hand-off is two thread wake-ups. Kept all the time (as it was), they cost an agent
    about a tenth of its CPU per window (`bench/bench_agent_cpu.py`, five alternated runs each:
    13.2 against 14.4 ms, 12.3 against 14.0 times the direct loop), much of it while a window's
    events are published after its VMs run again, when no window waits on the GIL."""
    global _switching_open, _switch_interval_before
    with _switching:
        if _switching_open == 0:
            _switch_interval_before = sys.getswitchinterval()
            sys.setswitchinterval(WINDOW_SWITCH_INTERVAL_S)
        _switching_open += 1
    try:
        yield
    finally:
        with _switching:
            _switching_open -= 1
            if _switching_open == 0:
                sys.setswitchinterval(_switch_interval_before)


_shared: dict[int, RealtimeWindows] = {}
_shared_lock = threading.Lock()


def shared_realtime(priority: int) -> RealtimeWindows:
    """The process's one counter for `priority` (every simulated host of a process shares it)."""
    with _shared_lock:
        if priority not in _shared:
            _shared[priority] = RealtimeWindows(priority)
        return _shared[priority]
