"""The hypervisor port: what host-agent needs from a hypervisor, whatever drives it.

Methods are blocking (libvirt is); the agent calls them from a thread pool with timeouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shared.contracts import VMInfo


class HypervisorError(Exception):
    """A hypervisor call failed."""


class VMNotFound(HypervisorError):
    """No such VM on this host (anymore)."""


class GuestClockUnavailable(HypervisorError):
    """The guest clock cannot be read or set.

    `retryable`: the guest agent is configured but does not answer yet (try again later);
    otherwise there is no way (no agent configured, driver without guest clock).
    """

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Hypervisor(Protocol):
    """One hypervisor host."""

    @property
    def kind(self) -> str:
        """Driver type, e.g. ``QEMU`` or ``Test``."""
        ...

    def list_vms(self) -> tuple[list[VMInfo], list[str]]:
        """Every VM with its placement and state, and the names of domains it cannot manage."""
        ...

    def state(self, vm: str) -> str:
        """The VM's state: running, paused, shutoff, shutdown, crashed, pmsuspended, blocked."""
        ...

    def suspend(self, vm: str) -> None:
        """Pause the VM's vCPUs; memory stays in RAM."""
        ...

    def resume(self, vm: str) -> None:
        """Run a paused VM again."""
        ...

    def shutdown(self, vm: str, timeout_s: float) -> None:
        """Graceful shutdown, forced off after `timeout_s` (Reboot maintenance)."""
        ...

    def start(self, vm: str) -> None:
        """Boot a shut-off VM (Reboot maintenance)."""
        ...

    def guest_time(self, vm: str) -> float:
        """The guest's clock, seconds since the epoch with sub-second precision."""
        ...

    def set_guest_time(self, vm: str, epoch_s: float) -> None:
        """Set the guest clock to `epoch_s` (nanoseconds, not the RTC's whole seconds)."""
        ...

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` (on the event loop) whenever the host's VMs or their placement
        change."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
