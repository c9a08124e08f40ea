"""What the HTTP API does, without HTTP: rendered documents (cached per scope, version and view),
waiting for a change, approvals and defers with their limits. The bus is reached only through
the `publish` callable, so this runs the same in a test without a broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.notifier.document import (
    Caller,
    Change,
    ScheduledEvent,
    ScheduledEventsDocument,
    Scope,
)
from shared.contracts import Event, HostInventory, MaintenanceApproved, MaintenanceDeferred, utcnow

log = logging.getLogger(__name__)

PUBLISH_WAIT_S = 3.0
"""How long an approval waits for the stream's ack before answering (the publish goes on)."""


class ApiError(Exception):
    """A request the API refuses: always a 4xx with a message."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Rendered:
    """A document ready to send: its bytes and ETag."""

    body: bytes
    etag: str
    incarnation: int
    valid_until: datetime | None = None


@dataclass(frozen=True)
class DeferRequest:
    """One event a VM asks to postpone, by how long."""

    event_id: str
    defer_s: float


_UNKNOWN: Scope = ("", "")
"""The scope of callers the inventory does not know (they see an empty document)."""


class ScheduledEventsService:
    """The documents as the API serves them; `apply` feeds them from the bus."""

    def __init__(
        self,
        document: ScheduledEventsDocument,
        publish: Callable[[Event], Awaitable[None]],
        on_changes: Callable[[list[Change]], None] | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.document = document
        self.publish = publish
        self.on_changes = on_changes
        self.now = now
        self._cache: dict[Scope, dict[tuple[str, bool], Rendered]] = {}
        """Rendered documents by scope, then (api-version, extended view): a change drops its
        scopes' entries only, whatever the number of scopes cached."""
        self._waiters: dict[Scope | None, asyncio.Event] = {}
        self._pending_defers: dict[uuid.UUID, set[uuid.UUID]] = {}
        self.handled = 0
        """Bus events handled since this process started (a replay included)."""

    # ------------------------------------------------------------ from the bus

    def apply(self, event: Event, seq: int) -> list[Change]:
        """Apply one bus event at stream sequence `seq`; wake whoever waits on a changed scope."""
        changes = self.document.apply(event)
        self.document.seq = seq
        self.handled += 1
        if isinstance(event, MaintenanceDeferred):
            self._pending_defers.get(event.scheduled_event_id, set()).discard(event.event_id)
        if isinstance(event, HostInventory):
            # A caller became known, left, or moved to another set: its long polls re-render.
            for scope in self.document.take_moved_scopes():
                self._wake(scope)
        for change in changes:
            if change.event.status != "Scheduled":
                self._pending_defers.pop(change.event.event_id, None)
            for scope in change.event.scopes:
                self._cache.pop(scope, None)
                self._wake(scope)
        if changes and self.on_changes is not None:
            self.on_changes(changes)
        return changes

    def skip(self, seq: int) -> None:
        """A bus event that is not part of the documents (or unreadable) was passed over."""
        self.document.seq = seq
        self.handled += 1

    def _wake(self, scope: Scope | None) -> None:
        waiter = self._waiters.pop(scope, None)
        if waiter is not None:
            waiter.set()

    # ------------------------------------------------------------ reading

    def render(self, caller: Caller | None, api_version: str, extended: bool) -> Rendered:
        """The caller's document (cached until its scope changes or an ended event ages out)."""
        scope = caller.scope if caller else _UNKNOWN
        key = (api_version, extended)
        now = self.now()
        cached = self._cache.get(scope, {}).get(key)
        if cached is not None and (cached.valid_until is None or now < cached.valid_until):
            return cached
        valid_until = None
        if extended:
            body = self.document.render_extended(caller, api_version, now)
            valid_until = self.document.next_age_out(scope, now) if caller else None
        else:
            body = self.document.render(caller, api_version)
        raw = json.dumps(body, separators=(",", ":")).encode()
        rendered = Rendered(
            raw, ScheduledEventsDocument.etag(body), body["DocumentIncarnation"], valid_until
        )
        self._cache.setdefault(scope, {})[key] = rendered
        return rendered

    async def wait_for_change(
        self,
        address: str,
        api_version: str,
        extended: bool,
        seen_etags: set[str] | None,
        timeout_s: float,
    ) -> Rendered:
        """Long poll: the caller's document once its ETag is not in `seen_etags` (the current
        one when None), or after `timeout_s`, whichever comes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        caller = self.document.caller(address)
        rendered = self.render(caller, api_version, extended)
        seen = seen_etags if seen_etags is not None else {rendered.etag}
        while rendered.etag in seen:
            remaining = deadline - loop.time()
            if rendered.valid_until is not None:
                remaining = min(remaining, (rendered.valid_until - self.now()).total_seconds())
            if remaining <= 0 and loop.time() >= deadline:
                break
            waiter = self._waiters.setdefault(caller.scope if caller else None, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), max(remaining, 0.001))
            except TimeoutError:
                pass
            caller = self.document.caller(address)
            rendered = self.render(caller, api_version, extended)
        return rendered

    # ------------------------------------------------------------ approving and deferring

    def _visible(self, caller: Caller | None, event_id: str) -> ScheduledEvent:
        found = self.document.find(caller, event_id)
        if found is None:
            raise ApiError(
                400, f"Bad request. EventId {event_id!r} is not a scheduled event of this VM"
            )
        return found

    async def approve(self, caller: Caller | None, event_ids: list[str]) -> None:
        """StartRequests: every EventId must be visible to the caller (else nothing happens)."""
        events = [self._visible(caller, event_id) for event_id in event_ids]
        assert caller is not None  # an unknown caller sees no event
        for event in events:
            if event.status != "Scheduled" or caller.vm in event.approved_by:
                continue  # already started or already approved by this VM: 200, as Azure
            await self._publish(
                MaintenanceApproved(
                    host=event.host,
                    rollout_id=event.rollout_id,
                    scheduled_event_id=event.event_id,
                    vm=caller.vm,
                )
            )
            log.info("event %s approved by %s", event.event_id, caller.vm)

    async def defer(
        self, caller: Caller | None, requests: list[DeferRequest]
    ) -> list[dict[str, Any]]:
        """DeferRequests (extended API): checked against the same limits the planner applies,
        so that a VM over its limit gets a clear refusal instead of a silent no."""
        policy = self.document.policy
        checked = []
        for request in requests:
            event = self._visible(caller, request.event_id)
            if event.status != "Scheduled":
                raise ApiError(409, f"Event {event.event_id} has started: it cannot be deferred")
            if request.defer_s > policy.max_defer_s:
                raise ApiError(
                    400,
                    f"DeferSeconds {request.defer_s:g} is over the limit of "
                    f"{policy.max_defer_s:g} s",
                    MaxDeferSeconds=policy.max_defer_s,
                )
            used = len(event.deferrals) + len(self._pending_defers.get(event.event_id, ()))
            if used >= policy.max_defers:
                raise ApiError(
                    409,
                    f"Event {event.event_id} was deferred {used} time(s): the limit is "
                    f"{policy.max_defers}",
                    DefersRemaining=0,
                )
            checked.append((event, request, used))
        assert caller is not None
        answers = []
        for event, request, used in checked:
            deferred = MaintenanceDeferred(
                host=event.host,
                rollout_id=event.rollout_id,
                scheduled_event_id=event.event_id,
                vm=caller.vm,
                defer_s=request.defer_s,
            )
            self._pending_defers.setdefault(event.event_id, set()).add(deferred.event_id)
            await self._publish(deferred)
            log.info("event %s: %s asked to defer %g s", event.event_id, caller.vm, request.defer_s)
            answers.append(
                {
                    "EventId": str(event.event_id),
                    "DeferSeconds": request.defer_s,
                    "DefersRemaining": max(0, policy.max_defers - used - 1),
                }
            )
        return answers

    async def _publish(self, event: Event) -> None:
        # The publisher retries until the stream acks; the VM need not wait for a slow bus.
        try:
            await asyncio.wait_for(asyncio.shield(self.publish(event)), PUBLISH_WAIT_S)
        except TimeoutError:
            log.warning("%s %s not acknowledged yet; it stays queued", event.type, event.event_id)
