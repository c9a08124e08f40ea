"""What clock-sync decides for one resumed VM: done, retry later, or give up."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from shared.contracts import ClockReading, ClockSynced, VMResumed


def result_id(resumed: VMResumed) -> uuid.UUID:
    """The `ClockSynced` of one resume always has the same id: two replicas (or a redelivery)
    publishing it are stored once by JetStream's de-duplication."""
    return uuid.uuid5(resumed.event_id, "clock-synced")


def clock_result(
    resumed: VMResumed, reading: ClockReading | None, ok: bool, attempts: int, error: str | None
) -> ClockSynced:
    """The `ClockSynced` reporting the sync of `resumed` (with the agent's `reading`, if any)."""
    return ClockSynced(
        event_id=result_id(resumed),
        host=resumed.host,
        vm=resumed.vm,
        rollout_id=resumed.rollout_id,
        ok=ok,
        skew_before_ms=reading.skew_before_ms if reading else None,
        skew_after_ms=reading.skew_after_ms if reading else None,
        method=reading.method if reading and reading.ok else "none",
        attempts=attempts,
        error=error,
    )


@dataclass(frozen=True)
class Decision:
    """Publish `event` (when set) or retry after `retry_in_s`."""

    event: ClockSynced | None
    retry_in_s: float | None = None


def decide(
    resumed: VMResumed,
    reading: ClockReading | None,
    attempt: int,
    max_attempts: int,
    retry_s: float,
    max_skew_ms: float,
    failure: str | None = None,
) -> Decision:
    """Turn the agent's answer (or `failure` to get one) into a result or a retry.

    Like KubeVirt: retry every `retry_s` while the guest agent does not answer, up to
    `max_attempts`; "no guest agent configured" ends at once with `ok: false, method: none`.
    A set whose verified skew is still above `max_skew_ms` is retried too.
    """

    def result(ok: bool, error: str | None) -> Decision:
        return Decision(clock_result(resumed, reading, ok, attempt, error))

    last = attempt >= max_attempts
    if reading is None:
        return result(False, failure) if last else Decision(None, retry_s)
    if reading.ok:
        skew = abs(reading.skew_after_ms or 0.0)
        if skew <= max_skew_ms:
            return result(True, None)
        error = f"skew {skew:.1f} ms after set, above {max_skew_ms:.0f} ms"
        return result(False, error) if last else Decision(None, retry_s)
    if reading.retryable and not last:
        return Decision(None, retry_s)
    return result(False, reading.error)
