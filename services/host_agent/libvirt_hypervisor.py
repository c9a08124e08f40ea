"""The `Hypervisor` port on libvirt-python: real QEMU (`qemu:///system`) or libvirt's test driver
(`test:///abs/path/node.xml`, used for simulated hosts)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio

from services.host_agent.hypervisor import (
    GuestClockUnavailable,
    HypervisorError,
    VMNotFound,
)
from shared.contracts import VMInfo, is_valid_name
from shared.placement import PLACEMENT_NS, parse_placement

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

_DESCRIBED_MAX = 4096
"""Descriptions kept (two per VM cover a host's VMs running and paused)."""

# Errors meaning "the guest agent is configured but does not answer (yet)": retry later.
_AGENT_RETRYABLE = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED}


def _ignore_libvirt_errors(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise and log them ourselves."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def dispatch_events_on(loop: asyncio.AbstractEventLoop) -> None:
    """Have libvirt deliver domain events on `loop` (before any connection is opened)."""
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)


class LibvirtHypervisor:
    """One libvirt connection to one host (the only one the agent holds)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {uri}: {exc}") from exc
        self._kind = self._conn.getType()
        # Domain handles stay valid across state changes; caching them saves a lookup round trip
        # on every call of the window. A stale handle (domain redefined) is dropped and looked up.
        self._domains: dict[str, libvirt.virDomain] = {}
        # What each domain was last described as, keyed by everything read from libvirt for it:
        # a listing (one at every window's start, one after it, every heartbeat) parses the
        # placement and builds the `VMInfo` (frozen) only for what changed since the last one.
        self._described: dict[tuple[str, str, int, str | None], VMInfo] = {}

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def connection(self) -> libvirt.virConnect:
        """The libvirt connection (for lifecycle event registration)."""
        return self._conn

    def _domain(self, vm: str, fresh: bool = False) -> libvirt.virDomain:
        if not fresh and vm in self._domains:
            return self._domains[vm]
        try:
            dom = self._conn.lookupByName(vm)
        except libvirt.libvirtError as exc:
            self._domains.pop(vm, None)
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise VMNotFound(f"no VM named {vm!r}") from exc
            raise HypervisorError(str(exc)) from exc
        self._domains[vm] = dom
        return dom

    def _call(self, vm: str, action: str, fn: Any, *args: Any) -> Any:
        for fresh in (False, True):
            dom = self._domain(vm, fresh)
            try:
                return fn(dom, *args)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(f"{action} {vm}: {exc.get_error_message()}") from exc
                if fresh:
                    raise VMNotFound(f"no VM named {vm!r}") from exc
        raise AssertionError("unreachable")

    def describe(self, dom: libvirt.virDomain) -> VMInfo:
        """One domain as a `VMInfo` (placement from its metadata)."""
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, PLACEMENT_NS)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise
            xml = None
        key = (dom.name(), dom.UUIDString(), dom.state()[0], xml)
        info = self._described.get(key)
        if info is None:
            if len(self._described) >= _DESCRIBED_MAX:
                self._described.clear()  # what no domain is any more goes with it
            info = self._described[key] = VMInfo(
                vm=key[0],
                uuid=key[1],
                state=STATE_NAMES.get(key[2], "nostate"),
                **parse_placement(xml),
            )
        return info

    def list_vms(self) -> tuple[list[VMInfo], list[str]]:
        vms: list[VMInfo] = []
        skipped: list[str] = []
        domains = self._conn.listAllDomains()
        self._domains = {dom.name(): dom for dom in domains}
        for dom in domains:
            try:
                if not is_valid_name(dom.name()):
                    skipped.append(dom.name())
                    continue
                vms.append(self.describe(dom))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(str(exc)) from exc
            except ValueError:
                skipped.append(dom.name())
        vms.sort(key=lambda v: v.vm)
        return vms, sorted(skipped)

    def state(self, vm: str) -> str:
        state = self._call(vm, "state", lambda d: d.state()[0])
        return STATE_NAMES.get(state, "nostate")

    def suspend(self, vm: str) -> None:
        self._call(vm, "suspend", lambda d: d.suspend())

    def resume(self, vm: str) -> None:
        self._call(vm, "resume", lambda d: d.resume())

    def shutdown(self, vm: str, timeout_s: float) -> None:
        def graceful(dom: libvirt.virDomain) -> None:
            if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                return
            dom.shutdown()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                    return
                time.sleep(0.05)
            dom.destroy()

        self._call(vm, "shutdown", graceful)

    def start(self, vm: str) -> None:
        self._call(vm, "start", lambda d: d.create())

    def _clock_supported(self) -> None:
        if self._kind.upper() == "TEST":
            # The test driver answers a fixed 1989 date and ignores setTime: no guest clock.
            raise GuestClockUnavailable("libvirt test driver has no guest clock", retryable=False)

    def _clock_call(self, vm: str, fn: Any) -> Any:
        self._clock_supported()
        try:
            return self._call(vm, "clock", fn)
        except HypervisorError as exc:
            if isinstance(exc, VMNotFound):
                raise
            code = (
                exc.__cause__.get_error_code()
                if isinstance(exc.__cause__, libvirt.libvirtError)
                else None
            )
            raise GuestClockUnavailable(str(exc), retryable=code in _AGENT_RETRYABLE) from exc

    def guest_time(self, vm: str) -> float:
        reading = self._clock_call(vm, lambda d: d.getTime())
        return float(reading["seconds"]) + reading["nseconds"] / 1e9

    def set_guest_time(self, vm: str, epoch_s: float) -> None:
        nanos, seconds = math.modf(epoch_s)
        value = {"seconds": int(seconds), "nseconds": int(nanos * 1e9)}
        self._clock_call(vm, lambda d: d.setTime(value))

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` whenever a VM starts, stops, pauses, appears, goes, or has its
        placement metadata changed (libvirt domain events; needs `dispatch_events_on` first)."""

        def lifecycle(*_: Any) -> None:
            on_change()

        for event_id in (
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
        ):
            try:
                self._conn.domainEventRegisterAny(None, event_id, lifecycle, None)
            except libvirt.libvirtError as exc:  # a driver without this event: heartbeat only
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_NO_SUPPORT,
                    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                ):
                    raise HypervisorError(f"cannot watch domain events: {exc}") from exc

    def close(self) -> None:
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass
