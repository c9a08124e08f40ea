"""Setting a guest clock from the host clock and measuring the skew left."""

from __future__ import annotations

import time

from services.host_agent.hypervisor import GuestClockUnavailable, Hypervisor, HypervisorError
from shared.contracts import ClockReading


def measure_skew_ms(hv: Hypervisor, vm: str) -> tuple[float, float]:
    """(guest - host) in ms, taking the host time at the middle of the call; and the call's RTT."""
    t1 = time.time()
    guest = hv.guest_time(vm)
    t2 = time.time()
    return (guest - (t1 + t2) / 2) * 1000, t2 - t1


def clock_action(hv: Hypervisor, vm: str, action: str) -> ClockReading:
    """`read`: measure the skew. `sync`: measure, set the guest to the host time (nanoseconds,
    not the RTC's whole seconds), measure again."""
    try:
        skew_before, rtt = measure_skew_ms(hv, vm)
        if action == "read":
            return ClockReading(vm=vm, ok=True, method="none", skew_before_ms=skew_before)
        # The guest agent applies the value about half a round trip after we read the host clock.
        hv.set_guest_time(vm, time.time() + rtt / 2)
        skew_after, _ = measure_skew_ms(hv, vm)
    except GuestClockUnavailable as exc:
        return ClockReading(vm=vm, ok=False, method="none", retryable=exc.retryable, error=str(exc))
    except HypervisorError as exc:
        return ClockReading(vm=vm, ok=False, method="none", error=str(exc))
    return ClockReading(
        vm=vm,
        ok=True,
        method="host-time",
        skew_before_ms=skew_before,
        skew_after_ms=skew_after,
    )
