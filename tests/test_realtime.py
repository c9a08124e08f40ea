"""Real-time priority while a pause window is open (`PP_RT_PRIORITY`), on libvirt's test driver and
the kernel's own scheduler: the window's libvirt calls run `SCHED_FIFO`, the patch does not, and
every thread is back to the normal policy once the VMs run again; without the privilege, the
window still runs, at the normal policy, and says why."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.host_agent.journal import PauseJournal
from services.host_agent.libvirt_hypervisor import LibvirtHypervisor
from services.host_agent.pause_window import PauseWindow, WindowRequest
from services.host_agent.realtime import (
    WINDOW_SWITCH_INTERVAL_S,
    RealtimeWindows,
    policy_of,
    quick_gil_handoff,
    thread_ids,
)
from shared.contracts import Event, PatchSpec, VMResumed
from shared.devstack import SimVM, sim_node_xml

VMS = [SimVM("a", "web", 0), SimVM("b", "web", 1)]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "SCHED_FIFO") or not Path("/proc/self/task").is_dir(), reason="Linux only"
)


class RecordingHypervisor(LibvirtHypervisor):
    """The test driver, noting the calling thread's policy and priority at each suspend and
    resume."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.seen: list[tuple[str, int, int]] = []
        self.switch_intervals: set[float] = set()

    def _note(self, call: str) -> None:
        self.seen.append((call, policy_of(0), os.sched_getparam(0).sched_priority))
        self.switch_intervals.add(sys.getswitchinterval())

    def suspend(self, vm: str) -> None:
        self._note("suspend")
        super().suspend(vm)

    def resume(self, vm: str) -> None:
        self._note("resume")
        super().resume(vm)


def normal_everywhere() -> bool:
    return all(policy_of(tid) == os.SCHED_OTHER for tid in thread_ids())


@pytest.fixture
def hv(tmp_path: Path) -> RecordingHypervisor:
    node = tmp_path / "node.xml"
    node.write_text(sim_node_xml(VMS))
    return RecordingHypervisor(f"test://{node}")


async def test_the_window_runs_real_time_and_the_patch_does_not(
    hv: RecordingHypervisor, tmp_path: Path
) -> None:
    assert normal_everywhere()
    interval = sys.getswitchinterval()
    assert interval > WINDOW_SWITCH_INTERVAL_S  # the interpreter's default, 5 ms
    events: list[Event] = []
    window = PauseWindow(
        "h1",
        hv,
        PauseJournal(tmp_path / "j.json"),
        events.append,
        TracerProvider().get_tracer("test"),
        MeterProvider().get_meter("test"),
        lanes=1,
        realtime=RealtimeWindows(10),
    )
    seen_by_patch = tmp_path / "patch-policy"
    # The patch notes its own policy and priority as the kernel reports them.
    patch = PatchSpec(command=f"chrt -p $$ > {seen_by_patch}")
    result = await window.run(WindowRequest("r1", uuid.uuid4(), "Freeze", patch, 5.0))

    assert result.ok, result.error
    assert sorted(e.vm for e in events if isinstance(e, VMResumed)) == ["a", "b"]
    assert hv.seen == [("suspend", os.SCHED_FIFO, 10)] * 2 + [("resume", os.SCHED_FIFO, 10)] * 2
    policy = seen_by_patch.read_text()
    assert "SCHED_OTHER" in policy, policy
    assert "priority: 0" in policy, policy
    assert normal_everywhere()  # the loop, the pools, the window's thread: all back
    # The GIL changed hands quickly while the VMs were stopped, at the default again after.
    assert hv.switch_intervals == {WINDOW_SWITCH_INTERVAL_S}
    assert sys.getswitchinterval() == interval
    window.close()


def test_the_gil_changes_hands_quickly_until_the_last_window_of_the_process_closes() -> None:
    interval = sys.getswitchinterval()
    entered, leave = threading.Event(), threading.Event()

    def second_window() -> None:
        with quick_gil_handoff():
            entered.set()
            leave.wait(10)

    with quick_gil_handoff():  # the first window, on this thread
        assert sys.getswitchinterval() == WINDOW_SWITCH_INTERVAL_S
        thread = threading.Thread(target=second_window)
        thread.start()
        assert entered.wait(10)
    assert sys.getswitchinterval() == WINDOW_SWITCH_INTERVAL_S  # the second is still open
    leave.set()
    thread.join(10)
    assert sys.getswitchinterval() == interval


def test_other_threads_run_one_step_below_until_the_last_window_closes() -> None:
    realtime = RealtimeWindows(20)
    entered = threading.Event()
    leave = threading.Event()
    seen: dict[str, tuple[int, int]] = {}

    def second_window() -> None:
        assert realtime.enter()
        seen["second window"] = (policy_of(0), os.sched_getparam(0).sched_priority)
        entered.set()
        leave.wait(10)
        realtime.exit()

    try:
        assert realtime.enter()  # the first window, on this thread
        me = threading.get_native_id()
        thread = threading.Thread(target=second_window)
        thread.start()
        assert entered.wait(10)
        assert (policy_of(me), os.sched_getparam(me).sched_priority) == (os.SCHED_FIFO, 20)
        assert seen["second window"] == (os.SCHED_FIFO, 20)
        realtime.exit()  # the first closes, the second is still open
        assert realtime.open_windows == 1
        assert (policy_of(me), os.sched_getparam(me).sched_priority) == (os.SCHED_FIFO, 19)
        leave.set()
        thread.join(10)
        assert realtime.open_windows == 0
        assert normal_everywhere()
    finally:
        leave.set()
        while realtime.open_windows:
            realtime.exit()


def test_without_the_privilege_the_window_says_so_and_runs_normally(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping CAP_SYS_NICE from a child needs root")
    script = tmp_path / "probe.py"
    script.write_text(
        "import logging, os\n"
        "from services.host_agent.realtime import RealtimeWindows, policy_of\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "rt = RealtimeWindows(10)\n"
        "print('entered', rt.enter(), 'enabled', rt.enabled, 'fifo', "
        "policy_of(0) == os.SCHED_FIFO)\n"
        "print('again', rt.enter())\n"
    )
    # Root without CAP_SYS_NICE (and RLIMIT_RTPRIO 0): what an agent without the privilege has.
    done = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-sys_nice",
            "--bounding-set=-sys_nice",
            "prlimit",
            "--rtprio=0",
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert "entered False enabled False fifo False" in done.stdout
    assert "again False" in done.stdout
    assert done.stderr.count("CAP_SYS_NICE") == 1, done.stderr  # said once, not per window
