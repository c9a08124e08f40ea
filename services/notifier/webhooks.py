"""Push: every change of a scheduled event, as a CloudEvents 1.0 JSON message (structured mode),
POSTed to each configured webhook, with retries and exponential back-off.

Delivery runs in a task per URL, fed by a bounded queue: the bus consumer only enqueues and never
waits on a receiver. Per URL, CloudEvents arrive in the order of the changes. Delivery is at least
once: the CloudEvent `id` is derived from the bus event that caused the change, so every replica
(and a restarted notifier) sends the same `id` for the same change and receivers de-duplicate on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx

from services.notifier.document import LATEST_VERSION, Change, DeferPolicy

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
TYPE_PREFIX = "io.pausepatch.scheduledevent."
RETRYABLE = {408, 425, 429}


def cloud_event(change: Change, policy: DeferPolicy) -> dict[str, Any]:
    """The CloudEvent of one change (`type` = `io.pausepatch.scheduledevent.<kind>`)."""
    event = change.event
    data = {
        **event.extended_view(LATEST_VERSION, policy),
        "Host": event.host,
        "RolloutId": event.rollout_id,
        "AvailabilitySets": sorted(name for kind, name in event.scopes if kind == "set"),
    }
    if change.vm is not None:
        data["ChangedBy"] = change.vm
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid5(change.cause_id, str(event.event_id))),
        "source": f"/pausepatch/hosts/{event.host}",
        "type": TYPE_PREFIX + change.kind,
        "subject": str(event.event_id),
        "time": change.occurred_at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


@dataclass
class RetryPolicy:
    """How hard delivery tries."""

    max_attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 5.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Wait before attempt `attempt + 1`: `Retry-After` if given, else exponential with
        jitter (half to full), never above the maximum."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.backoff_max_s)
            except ValueError:
                pass
        ceiling = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
        return ceiling * random.uniform(0.5, 1.0)


class WebhookTarget:
    """One receiver: its queue and its delivery task."""

    def __init__(
        self, url: str, client: httpx.AsyncClient, retry: RetryPolicy, queue_max: int
    ) -> None:
        self.url = url
        self.client = client
        self.retry = retry
        self.queue: deque[dict[str, Any]] = deque(maxlen=queue_max)
        self.ready = asyncio.Event()
        self.delivered = 0
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def offer(self, message: dict[str, Any]) -> None:
        """Queue one CloudEvent (never blocks; the oldest goes when the queue is full)."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
            log.warning("webhook %s: queue full, dropping the oldest CloudEvent", self.url)
        self.queue.append(message)
        self.ready.set()

    async def run(self) -> None:
        """Deliver queued CloudEvents one by one, in order."""
        while True:
            await self.ready.wait()
            while self.queue:
                await self._deliver(self.queue.popleft())
            self.ready.clear()

    async def _deliver(self, message: dict[str, Any]) -> None:
        for attempt in range(1, self.retry.max_attempts + 1):
            retry_after = None
            try:
                response = await self.client.post(
                    self.url,
                    json=message,
                    headers={"Content-Type": CONTENT_TYPE},
                    timeout=self.retry.timeout_s,
                )
                if response.is_success:
                    self.delivered += 1
                    return
                if response.status_code < 500 and response.status_code not in RETRYABLE:
                    self.dropped += 1
                    log.warning(
                        "webhook %s refused CloudEvent %s with %d; not retried",
                        self.url,
                        message["id"],
                        response.status_code,
                    )
                    return
                retry_after = response.headers.get("Retry-After")
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt == self.retry.max_attempts:
                break
            delay = self.retry.delay(attempt, retry_after)
            log.info(
                "webhook %s: attempt %d for %s failed (%s); retrying in %.2f s",
                self.url,
                attempt,
                message["id"],
                why,
                delay,
            )
            await asyncio.sleep(delay)
        self.dropped += 1
        log.warning(
            "webhook %s: CloudEvent %s dropped after %d attempts",
            self.url,
            message["id"],
            self.retry.max_attempts,
        )


class WebhookDispatcher:
    """Every configured webhook; `push` enqueues a change for all of them."""

    def __init__(
        self, urls: list[str], policy: DeferPolicy, retry: RetryPolicy, queue_max: int
    ) -> None:
        self.policy = policy
        self.client = httpx.AsyncClient(trust_env=False)
        self.targets = [WebhookTarget(url, self.client, retry, queue_max) for url in urls]

    def start(self) -> None:
        """Start the delivery tasks."""
        for target in self.targets:
            if target.task is None:
                target.task = asyncio.create_task(target.run(), name=f"webhook {target.url}")

    def push(self, change: Change) -> None:
        """Queue the CloudEvent of `change` for every webhook; returns at once."""
        if not self.targets:
            return
        message = cloud_event(change, self.policy)
        for target in self.targets:
            target.offer(message)

    async def stop(self) -> None:
        """Stop delivering (what is still queued is lost, as documented)."""
        for target in self.targets:
            if target.task is not None:
                target.task.cancel()
        await asyncio.gather(
            *(t.task for t in self.targets if t.task is not None), return_exceptions=True
        )
        await self.client.aclose()
