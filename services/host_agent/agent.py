"""host-agent: the one owner of a host's libvirt connection. Reports inventory, runs maintenance
windows when told, answers guest-clock requests."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from services.host_agent.guest_clock import clock_action
from services.host_agent.hypervisor import Hypervisor
from services.host_agent.journal import HandledEvents, PauseJournal
from services.host_agent.pause_window import PauseWindow, WindowRequest
from services.host_agent.realtime import MAX_PRIORITY, shared_realtime
from shared.bus import EventPublisher
from shared.contracts import (
    MAX_PAUSE_BUDGET_S,
    ClockAction,
    ClockReading,
    ClockReadings,
    HostInventory,
    MaintenanceCompleted,
    MaintenanceStarted,
    is_valid_name,
    utcnow,
)
from shared.logs import log_context
from shared.settings import BusSettings
from shared.telemetry import Telemetry

log = logging.getLogger(__name__)


def default_host_name() -> str:
    """The machine's short host name, made a valid subject token."""
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "host"


class HostAgentSettings(BusSettings):
    """host-agent settings (`PP_HOST`, `PP_LIBVIRT_URI`, ...)."""

    host: str = Field(default_factory=default_host_name)
    libvirt_uri: str = "qemu:///system"
    heartbeat_s: float = 10.0
    """Inventory is re-published this often (and on every VM lifecycle change)."""
    call_timeout_s: float = 5.0
    """Timeout of one libvirt call inside a window."""
    shutdown_timeout_s: float = 60.0
    """Reboot maintenance: graceful shutdown time before a VM is forced off."""
    start_max_age_s: float = 120.0
    """A `MaintenanceStarted` older than this is refused (the planner gave up on it long ago)."""
    start_poll_s: float = 30.0
    """Each host's consumer of `MaintenanceStarted` waits this long per pull request: how often
    an idle agent asks again, and how long a request the server dropped can go unnoticed when
    neither the client reconnected nor the consumer's leader changed (after either it asks at
    once: `shared.bus`)."""
    resume_margin_s: float = 0.02
    """Resumes begin this long before the budget so that they end within it."""
    js_api_timeout_s: float = 60.0
    """An agent creates its consumers when it starts: when a whole fleet starts at once (an
    upgrade, a power event), their creations queue on JetStream for longer than the 5 s other
    services wait (100 agent processes starting together on two cores: 22 of them gave up)."""
    rt_priority: int = Field(default=10, ge=0, le=MAX_PRIORITY)
    """While a pause window is open the agent's threads run `SCHED_FIFO` at this priority (the
    window's own thread) and one below (the others); 0: the normal policy. Needs CAP_SYS_NICE."""
    fleet_file: Path | None = None
    """Simulations: serve every host of this file (one JSON object per line) in one process."""

    @field_validator("host")
    @classmethod
    def _token(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"host name {value!r} is not a valid subject token")
        return value


class HostAgent:
    """One host's agent."""

    def __init__(
        self,
        settings: HostAgentSettings,
        hypervisor: Hypervisor,
        publisher: EventPublisher,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.host = settings.host
        self.hv = hypervisor
        self.publisher = publisher
        # The test driver serializes every call under one lock: threads only add latency (and,
        # with many simulated hosts in one process, hundreds of threads contending for the GIL).
        self.serial_calls = hypervisor.kind.upper() == "TEST"
        # Inventory and clock requests; the window has threads of its own.
        self.executor = ThreadPoolExecutor(
            max_workers=1 if self.serial_calls else 8, thread_name_prefix="agent"
        )
        state = settings.state_dir / "host-agent" / self.host
        self.handled = HandledEvents(state / "handled-events")
        self.window = PauseWindow(
            host=self.host,
            hypervisor=hypervisor,
            journal=PauseJournal(state / "pause-journal.json"),
            emit=publisher.emit,
            tracer=telemetry.tracer("pausepatch.host_agent"),
            meter=telemetry.meter("pausepatch.host_agent"),
            call_timeout_s=settings.call_timeout_s,
            resume_margin_s=settings.resume_margin_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            lanes=1 if self.serial_calls else None,
            realtime=shared_realtime(settings.rt_priority) if settings.rt_priority else None,
        )
        self._tasks: set[asyncio.Task[object]] = set()
        self._inventory_changed = asyncio.Event()

    async def recover(self) -> None:
        """Start again anything a previous run of this agent left stopped (before the bus is up:
        events queue until it is), then get the window's threads ready."""
        with log_context(host=self.host):
            await self.window.recover()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.window.warm_up)

    async def inventory(self) -> HostInventory:
        """The host's VMs as of now."""
        loop = asyncio.get_running_loop()
        vms, skipped = await loop.run_in_executor(self.executor, self.hv.list_vms)
        return HostInventory(
            host=self.host,
            vms=vms,
            skipped=skipped,
            hypervisor=self.hv.kind,
            heartbeat_s=self.settings.heartbeat_s,
        )

    def inventory_changed(self) -> None:
        """A VM started, stopped, appeared or went: publish the inventory now (thread-safe)."""
        self._inventory_changed.set()

    async def heartbeat(self) -> None:
        """Publish the inventory at start, on every change and every `heartbeat_s`.

        Changes are gathered for a moment (a window pauses every VM at once) and not listed while
        a window is open: the window's own thread has the host then; it reports when it closes.
        A listing that finds what was last published (a window over, every VM running again as
        before it) publishes nothing: every reader of inventories (the planner, every notifier)
        would parse twenty VMs to learn nothing, a thousand times per thousand-host rollout. The
        heartbeat stays due `heartbeat_s` after the last inventory published.
        """
        loop = asyncio.get_running_loop()
        published: HostInventory | None = None
        due = loop.time()
        while True:
            self._inventory_changed.clear()
            try:
                inventory = await self.inventory()
                if published is None or loop.time() >= due or _differs(inventory, published):
                    self.publisher.emit(inventory)
                    published, due = inventory, loop.time() + self.settings.heartbeat_s
            except Exception:
                log.exception("could not list VMs")
                due = loop.time() + self.settings.heartbeat_s
            try:
                await asyncio.wait_for(self._inventory_changed.wait(), max(0.0, due - loop.time()))
                await asyncio.sleep(0.1)
            except TimeoutError:
                pass
            while self.window.busy:
                await asyncio.sleep(0.05)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "task") -> None:
        """Run a background task, keeping a reference until it ends."""
        task: asyncio.Task[object] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_started(self, event: MaintenanceStarted) -> None:
        """Run the window for `event` once, in the background (the handler acks at once)."""
        key = str(event.scheduled_event_id)
        with log_context(rollout=event.rollout_id, host=self.host):
            if key in self.handled:
                log.info("maintenance %s already handled here: ignoring the redelivery", key)
                return
            self.handled.add(key)
            now = utcnow()
            age = now - event.occurred_at
            refusal = None
            if event.start_by is not None and now > event.start_by:
                refusal = (
                    f"start refused: arrived after its start_by ({event.start_by.isoformat()})"
                )
            elif age > timedelta(seconds=self.settings.start_max_age_s):
                refusal = (
                    f"start refused: issued {age.total_seconds():.0f} s ago, more than "
                    f"PP_START_MAX_AGE_S={self.settings.start_max_age_s:.0f}"
                )
            if refusal:
                log.warning("%s", refusal)
                self.publisher.emit(
                    MaintenanceCompleted(
                        host=self.host,
                        rollout_id=event.rollout_id,
                        scheduled_event_id=event.scheduled_event_id,
                        event_type=event.event_type,
                        ok=False,
                        window_ms=0,
                        patch_ms=0,
                        overhead_ms=0,
                        error=refusal,
                    )
                )
                return
            request = WindowRequest(
                rollout_id=event.rollout_id,
                scheduled_event_id=event.scheduled_event_id,
                event_type=event.event_type,
                patch=event.patch,
                budget_s=event.pause_budget_s,
            )
            self.spawn(self._run_window(request), name=f"window-{key}")

    async def _run_window(self, request: WindowRequest) -> None:
        with log_context(rollout=request.rollout_id, host=self.host):
            try:
                await self.window.run(request)
            except Exception:
                log.exception("maintenance window failed")
            self.inventory_changed()

    async def clock(self, command: ClockAction) -> ClockReading | ClockReadings:
        """Set (or read) a guest clock, or the clocks of several VMs in parallel."""
        loop = asyncio.get_running_loop()

        def one(vm: str) -> Awaitable[ClockReading]:
            return loop.run_in_executor(self.executor, clock_action, self.hv, vm, command.action)

        if command.vm is not None:
            return await one(command.vm)
        if self.serial_calls:
            # One hop to the executor for the whole list, not one per VM.
            readings = await loop.run_in_executor(
                self.executor,
                lambda: [clock_action(self.hv, vm, command.action) for vm in command.vms],
            )
            return ClockReadings(readings=readings)
        return ClockReadings(readings=list(await asyncio.gather(*(one(vm) for vm in command.vms))))

    async def close(self) -> None:
        """Let an open window finish (never leave a VM paused), stop the rest, release libvirt."""
        windows = [t for t in self._tasks if t.get_name().startswith("window")]
        if windows:
            log.info("waiting for the open maintenance window before stopping")
            await asyncio.wait(windows, timeout=MAX_PAUSE_BUDGET_S + 10)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.window.close()
        self.hv.close()


def _differs(inventory: HostInventory, published: HostInventory) -> bool:
    """What an inventory says beyond its envelope (its id, its time) differs."""
    return (
        inventory.vms != published.vms
        or inventory.skipped != published.skipped
        or inventory.hypervisor != published.hypervisor
        or inventory.heartbeat_s != published.heartbeat_s
    )
