"""Bus wiring shared by every service: the one broker factory, the stream, dead-lettering, and the
event publisher (ordered, retried with the same `Nats-Msg-Id`, never blocking its caller).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import signal
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import nats.errors
from faststream import FastStream
from faststream._internal.middlewares import BaseMiddleware
from faststream.message import StreamMessage
from faststream.nats import JStream, NatsBroker, NatsMessage, NatsUserPassword, StorageType
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.subscriber.usecases.stream_pull_subscriber import (
    BatchPullStreamSubscriber,
    ConcurrentPullStreamSubscriber,
    PullStreamSubscriber,
)
from faststream.specification import AsyncAPI
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StreamConfig
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from opentelemetry import baggage, metrics, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.metrics import NoOpMeterProvider
from pydantic import ValidationError

from shared import liveness, subjects
from shared.contracts import (
    ErrorReply,
    Event,
    InvalidMessage,
    parse_event_bytes,
    utcnow,
)
from shared.settings import BusSettings
from shared.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

DUPLICATE_WINDOW_S = 120.0
"""JetStream de-duplication window on `Nats-Msg-Id`: a retried publish inside it is stored once."""


class NatsHeaders:
    """NATS message headers (`Key: Value` lines after the `NATS/1.0` line), parsed directly.

    nats-py parses headers with the standard library's e-mail parser (tens of microseconds per
    message, the largest single cost of consuming an event); this strict parser takes its place
    (`_install_header_parser`). Same result as nats-py's own: one value per key (the last), keys
    and values stripped, a key with white space inside dropped.
    """

    __slots__ = ("headers",)

    def __init__(self, raw: bytes) -> None:
        self.headers: dict[str, str] = {}
        for line in raw.decode("utf-8", "surrogateescape").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                name = key.split()
                if len(name) == 1:
                    self.headers[name[0]] = value.strip()


class StatusHeaderParser:
    """The headers that follow an inline status (a pull request's 408 when it expires, an idle
    heartbeat, flow control): nats-py reads those with the e-mail parser whatever its
    `fast_parse` hook holds, for every poll of every pull consumer. The same strict parser."""

    def parsebytes(self, raw: bytes) -> dict[str, str]:
        return NatsHeaders(raw).headers


def _install_header_parser() -> None:
    import nats.aio.client as nats_client

    # Each client makes its header parser from this name when it is created; it reads the
    # headers after an inline status with it, and every message's headers when nats-py's
    # `fast_parse` hook (`parse_email`, from `fast-mail-parser` if installed) is empty. That
    # hook's path also looks for white space in every key, character by character (3.2 against
    # 2.1 us for an event's four headers); the parser drops those keys itself.
    nats_client.BytesParser = StatusHeaderParser  # type: ignore[misc,assignment]
    # Also when `fast-mail-parser` is installed: its current releases return lists.
    nats_client.parse_email = None  # type: ignore[attr-defined]


_install_header_parser()


async def _next_msg_ready_first(self: Subscription, timeout: float | None = 1.0) -> Msg:
    """`Subscription.next_msg`, but a message already waiting is handed over at once.

    nats-py makes two tasks, a timer and a random UUID (a system call) for every message it
    hands over, even one already in the queue; a pull consumer's `fetch` takes each message of
    a batch that way, and at fleet scale that was a tenth of the planner's time. What waits in
    the queue is returned as nats-py itself would return it (counted off the pending size,
    marked done); an empty queue goes the way it always did."""
    queue = self._pending_queue
    if queue.qsize() and self._cb is None and not self._conn.is_closed:
        msg = queue.get_nowait()
        self._pending_size -= len(msg.data)
        queue.task_done()
        return msg
    return await _NEXT_MSG_NATS(self, timeout)


_NEXT_MSG_NATS = Subscription.next_msg
"""nats-py's own (for the bench that compares the two)."""
Subscription.next_msg = _next_msg_ready_first  # type: ignore[method-assign]


LEADER_ELECTED = "$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED"
"""The server's advisory that a consumer has a new leader (`<prefix>.<stream>.<consumer>`)."""


def _waiting(future: asyncio.Future[None] | None) -> asyncio.Future[None]:
    """`future` while it waits, else a new one."""
    if future is None or future.done():
        return asyncio.get_running_loop().create_future()
    return future


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class _LostRequests:
    """What makes the pull requests one nats-py client waits on lost, as futures: `reconnect()`
    is resolved by the client's next reconnect, `election(stream, consumer)` by that consumer's
    next leader election (its advisory subscribed to when the consumer is first fetched from)."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._reconnect: asyncio.Future[None] | None = None
        self._elections: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._watched: set[tuple[str, str]] = set()
        previous = nc._reconnected_cb

        async def reconnected() -> None:
            _resolve(self._reconnect)
            if previous is not None:
                await previous()

        nc._reconnected_cb = reconnected

    def reconnect(self) -> asyncio.Future[None]:
        self._reconnect = _waiting(self._reconnect)
        return self._reconnect

    async def election(self, stream: str, consumer: str) -> asyncio.Future[None]:
        key = (stream, consumer)
        if key not in self._watched:
            self._watched.add(key)

            async def elected(_: Msg) -> None:
                _resolve(self._elections.get(key))

            try:
                await self._nc.subscribe(f"{LEADER_ELECTED}.{stream}.{consumer}", cb=elected)
            except nats.errors.Error as exc:  # closed, draining: the fetch goes on without it
                log.debug("not watching the leader of %s/%s: %s", stream, consumer, exc)
        future = self._elections[key] = _waiting(self._elections.get(key))
        return future


_LOST: weakref.WeakKeyDictionary[NatsClient, _LostRequests] = weakref.WeakKeyDictionary()


def _lost_requests_of(nc: NatsClient) -> _LostRequests:
    if nc not in _LOST:
        _LOST[nc] = _LostRequests(nc)
    return _LOST[nc]


async def _fetch_asking_again(
    self: JetStreamContext.PullSubscription,
    batch: int = 1,
    timeout: float | None = 5,
    heartbeat: float | None = None,
) -> list[Msg]:
    """`PullSubscription.fetch`, but a pull request lost with its server, or with its consumer's
    leader, is made again at once.

    A fetch waits on a pull request that the server holds (the consumer's leader, in a
    cluster); a server that restarts forgets it, and so does a consumer whose leader changes
    (its node died: the new leader knows no waiting request). nats-py asks again in neither
    case: a 30 s fetch pending across a restart of a real nats-server returned after its 30 s,
    though an event was stored just after the reconnect, and a 40 s fetch whose consumer's
    leader died returned after its 40 s, though an event was stored 6 s in. A host's start then
    waited up to its agent's `PP_START_POLL_S`. Here, each reconnect during the fetch, and each
    leader election of its consumer (the server's `CONSUMER.LEADER_ELECTED` advisory), sends the
    same request again for the time left, to the same inbox, and the fetch goes on: what it
    brings is handed over as the first request's would have been. A request the server kept
    (e.g. another cluster node took the client) is then asked twice: what comes beyond the batch
    waits in the subscription's queue, where the next fetch takes it first."""
    if timeout is None or self._sub is None:
        return await _FETCH_NATS(self, batch, timeout, heartbeat)
    lost = _lost_requests_of(self._nc)
    started = time.monotonic()
    fetch = asyncio.ensure_future(_FETCH_NATS(self, batch, timeout, heartbeat))
    again: asyncio.Future[None] | None = None
    try:
        while True:
            reconnected = lost.reconnect()
            elected = await lost.election(self._stream, self._consumer)
            waits: list[asyncio.Future[Any]] = [fetch, reconnected, elected]
            if again is not None:
                waits.append(again)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if fetch.done():
                return fetch.result()
            if again is not None and again.done() and not (reconnected.done() or elected.done()):
                again = None  # the second asking, below: nothing more until the next loss
            else:
                # Asked again at once, and once more a moment later: a new leader announces
                # itself before it may take requests, and a request it dropped then would
                # wait out the fetch (a start, its agent's `PP_START_POLL_S`).
                if again is not None:
                    again.cancel()
                again = asyncio.ensure_future(asyncio.sleep(ASK_AGAIN_S))
            left = timeout - (time.monotonic() - started)
            if left > 0.01:
                request = {"batch": batch, "expires": int(left * 1e9) - 100_000}
                if heartbeat:
                    request["idle_heartbeat"] = int(heartbeat * 1e9)
                await self._nc.publish(self._nms, json.dumps(request).encode(), self._deliver)
    finally:
        if again is not None:
            again.cancel()
        if not fetch.done():  # this fetch was cancelled
            fetch.cancel()


ASK_AGAIN_S = 1.0
"""After a reconnect or a leader election, a waiting fetch asks at once and this long after."""


_FETCH_NATS = JetStreamContext.PullSubscription.fetch
"""nats-py's own."""
JetStreamContext.PullSubscription.fetch = _fetch_asking_again  # type: ignore[method-assign]


IDLE_POLL_S = 1.0
"""How long a batch subscriber waits for a first message once it found none in its gathering
window (`PullSub.timeout`): one pull request per this many seconds on an idle subject. Also how
long a pull request that the server dropped while the client stayed connected can go unnoticed
(one lost with a restarted server is made again on reconnect: `_fetch_asking_again`)."""


FETCH_ERROR_PAUSE_S = 0.5
"""After a fetch failed in a way the loop does not expect, it asks again this much later."""


BATCH_GAP_S = 0.005
"""How long a batch being gathered waits for one more message once the stream has none: a
batch is handed over this long after its last message, not at the end of its window."""


async def _consume_batches(self: BatchPullStreamSubscriber) -> None:
    """FastStream's loop of a batch pull subscriber, except while nothing comes, and at the end
    of a burst.

    FastStream fetches a batch for `PullSub.timeout` (50 ms here: what a batch waits for its
    stragglers), then again, for ever: two requests to the server and two wake-ups of each side
    every 50 ms on an idle subject. An idle planner (four batch subscribers) woke 200 times a
    second and used 6 % of a core, and the server 4 % for it. Here, a gathering window that
    found nothing is followed by one long poll for a single message (`IDLE_POLL_S`); the
    message it brings is handed over with whatever follows it within the window.

    Within the window, once a batch has messages, each further fetch waits at most
    `BATCH_GAP_S` for the next: the end of a burst (a host's last resumes, a wave's last clock
    results, which the next wave waits for) is handed over then, not when the window ends. A
    fetch takes what the stream holds at once (nats-py asks with `no_wait` first), so under load
    the batches fill as before."""
    assert self.subscription, "You should call `create_subscription` at first."
    batch_size = self.pull_sub.batch_size
    window = self.pull_sub.timeout or 0.05
    subscription = self.subscription
    name = str(getattr(subscription, "_consumer", None) or id(self))
    try:
        await _consume_batches_turning(self, subscription, batch_size, window, name)
    finally:
        liveness.forget(name)


async def _consume_batches_turning(
    self: BatchPullStreamSubscriber, subscription: Any, batch_size: int, window: float, name: str
) -> None:
    """`_consume_batches`'s loop; each turn noted for the service's liveness (`name`)."""
    while self.running:
        liveness.turned(name)
        messages: list[Msg] = []
        deadline = time.monotonic() + window
        try:
            while len(messages) < batch_size and self.running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    if messages:
                        messages += await subscription.fetch(
                            batch=batch_size - len(messages), timeout=min(remaining, BATCH_GAP_S)
                        )
                    else:
                        # One message: a fetch of more that has to wait for its first one then
                        # waits for the others until its timeout.
                        messages += await subscription.fetch(batch=1, timeout=remaining)
                except nats.errors.TimeoutError:
                    if messages:
                        break
                    # Idle: one request waits for the next message, up to IDLE_POLL_S.
                    messages = await subscription.fetch(batch=1, timeout=IDLE_POLL_S)
                    deadline = time.monotonic() + window
        except nats.errors.TimeoutError:
            continue  # still idle
        except (nats.errors.ConnectionClosedError, ServiceUnavailableError):
            # A closed connection or a JetStream not ready is not asked again at once, in a
            # loop. What the window had gathered before is handled first (below): delivered
            # and left unhandled, it would wait out the consumer's ack wait (30 s) to come again.
            await _handle_gathered(self, messages)
            await asyncio.sleep(0.1)
            continue
        except Exception as exc:  # noqa: BLE001 - the loop outlives any one fetch
            # Any other error: said with the consumer's name each time, and asked again after a
            # pause (FastStream's task supervisor would restart the loop at once, in a tight
            # loop for an error that persists, and log only the first of each kind). What the
            # window had gathered before the failing fetch is handled first, as above.
            log.error(
                "fetching from %s failed (%s: %s); asking again in %.1f s",
                getattr(subscription, "_consumer", "a consumer"),
                type(exc).__name__,
                exc,
                FETCH_ERROR_PAUSE_S,
            )
            await _handle_gathered(self, messages)
            await asyncio.sleep(FETCH_ERROR_PAUSE_S)
            continue
        await _handle_gathered(self, messages)


async def _handle_gathered(self: BatchPullStreamSubscriber, messages: list[Msg]) -> None:
    """Hand a gathered batch to the subscriber's handler (nothing if empty or stopping)."""
    if messages and self.running:
        await self.consume(messages)  # type: ignore[arg-type]


BatchPullStreamSubscriber._consume_pull = _consume_batches  # type: ignore[method-assign]

UNANSWERED_RETRY_S = 1.0
"""Wait before a request JetStream did not answer is asked again (`until_answered`)."""

UNANSWERED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)
"""What a request to a JetStream that does not answer raises (a server restarting, JetStream not
ready yet, a request timing out behind many others)."""


class RequestRefused(PermissionError):
    """A JetStream API request the server refused: the connection's user may not publish to
    that API subject (the server drops the request and reports a permissions violation)."""


_LAST_REFUSAL: list[tuple[float, str]] = []
"""The latest permission violation on a JetStream API subject reported to this process's
connections (`note_refusal`): when, and the server's words (only the latest is ever asked for)."""


async def note_refusal(err: Exception) -> None:
    """The `error_cb` of every service's connection (`make_broker`). A JetStream API request
    that the user may not publish gets no answer at all: the server drops it and sends the
    client an error of its own (`-ERR 'Permissions Violation for Publish to "$JS.API..."'`), so
    the request itself only times out. Kept here, the violation lets `until_answered` tell a
    refusal (fail now, saying why) from a server that does not answer (ask again)."""
    text = str(err)
    lowered = text.lower()
    if "permissions violation" in lowered and "$js.api." in lowered:
        _LAST_REFUSAL[:] = [(time.monotonic(), text.removeprefix("nats: "))]


def refused_since(since: float) -> str | None:
    """The latest permission violation on a JetStream API subject reported at or after `since`
    (monotonic), if any."""
    if _LAST_REFUSAL and _LAST_REFUSAL[0][0] >= since:
        return _LAST_REFUSAL[0][1]
    return None


async def until_answered(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...] = UNANSWERED,
    pause_s: float | None = None,
    deadline: float | None = None,
) -> T:
    """`attempt()`, asked again every `pause_s` (`UNANSWERED_RETRY_S` by default) while it
    raises one of `errors` (by default: JetStream does not answer), each time logged with
    `what`; for as long as it takes, or until `deadline` (monotonic), past which the last error
    is raised. What a service needs at its start, when waiting beats exiting (nothing restarts
    a process of the local stack). Any other error is raised at once, and so is a request left
    unanswered because the server refused it (`RequestRefused`: the server reported a
    permission violation on a JetStream API subject meanwhile, see `note_refusal`); asking again
    would wait for ever on a misconfigured user."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            return await attempt()
        except errors as exc:
            refusal = refused_since(started)
            if refusal is not None:
                raise RequestRefused(
                    f"{what}: refused by the NATS server ({refusal}); "
                    "this service's NATS user lacks that permission"
                ) from exc
            if deadline is not None and time.monotonic() >= deadline:
                raise
            failures += 1
            pause = UNANSWERED_RETRY_S if pause_s is None else pause_s
            log.warning(
                "%s failed (%s: %s); asking again in %.1f s (attempt %d)",
                what,
                type(exc).__name__,
                exc,
                pause,
                failures,
            )
            await asyncio.sleep(pause)


def _creation_asked_again(
    create: Callable[[Any], Awaitable[None]],
) -> Callable[[Any], Awaitable[None]]:
    """FastStream's creation of a pull subscriber's consumer (nats-py's `pull_subscribe`: a look
    up, then a creation), asked for again while JetStream does not answer (`until_answered`),
    instead of failing the service's start. A service starting during a bus outage exited: a
    fresh-clone CI run lost clock-sync so, and with it the rollout's clock results. Any other
    error (a consumer configured otherwise, a permission refused) still fails the start."""

    async def create_subscription(self: Any) -> None:
        name = getattr(getattr(self, "config", None), "durable_name", None) or getattr(
            getattr(self, "subject", None), "broker_address", "?"
        )
        await until_answered(f"creating the consumer {name}", lambda: create(self))

    create_subscription.asked_again = True  # type: ignore[attr-defined]
    return create_subscription


for _pull in (PullStreamSubscriber, ConcurrentPullStreamSubscriber, BatchPullStreamSubscriber):
    _pull._create_subscription = _creation_asked_again(  # type: ignore[method-assign,assignment]
        _pull.__dict__["_create_subscription"]
    )

DLQ_STREAM_NAME = "PAUSEPATCH_DLQ"
DLQ_COPY_BYTES = 64 * 1024


def events_stream(declare: bool, replicas: int = 1) -> JStream:
    """The `PAUSEPATCH` stream. Only its owner (the planner) passes `declare=True`."""
    return JStream(
        subjects.STREAM_NAME,
        subjects=[subjects.EVENTS_ROOT],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
        declare=declare,
    )


async def declare_streams(
    broker: NatsBroker,
    replicas: int = 1,
    max_age_s: float = 7 * 24 * 3600,
    max_per_subject: int = 8,
    max_bytes: int = -1,
    dlq_max_msgs: int = 10_000,
) -> None:
    """Create or update the event and dead-letter streams (the owner calls this at start).

    The event stream keeps at most `max_per_subject` events of one subject: every host's
    inventory comes again each heartbeat, and kept whole it would grow by some 30 MB per host
    and day until it filled the server's store, after which the server refuses every event.
    Other subjects carry one event per window (a VM's) or per rollout (a host's), so only what
    a newer event of the same subject superseded goes. The dead letters keep the newest
    `dlq_max_msgs`: a publisher flooding the bus with bad input must not fill the store either."""
    js = broker.config.connection_state.stream
    for config in (
        StreamConfig(
            name=subjects.STREAM_NAME,
            subjects=[subjects.EVENTS_ROOT],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
            max_age=max_age_s,
            max_msgs_per_subject=max_per_subject,
            max_bytes=max_bytes,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=DLQ_STREAM_NAME,
            subjects=[subjects.dead_letter("*")],
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=7 * 24 * 3600,
            max_msgs=dlq_max_msgs,
            discard=DiscardPolicy.OLD,
        ),
    ):
        before = await _declare(js, config, deadline=time.monotonic() + NOT_READY_TIMEOUT_S)
        if config.name == subjects.STREAM_NAME and max_per_subject > 0 and before is not None:
            previous = before.max_msgs_per_subject or -1
            if previous <= 0 or previous > max_per_subject:
                await _trim_subjects(js, max_per_subject)


async def _trim_subjects(js: Any, keep: int) -> None:
    """Trim what the event stream holds beyond a bound it was just given (an update from a
    stream without one, or with a larger one). nats-server before 2.10.24 does not do it: it
    then removes one old event of a subject per new one, and a week of heartbeats would stay.
    The subjects that repeat are the inventories and the rollouts' status; others carry an event
    per window or rollout. Best effort: what is not trimmed stays as large as it is."""
    for family in (subjects.host_inventory(), subjects.rollout_status()):
        try:
            info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=family)
            over = {s: n for s, n in (info.state.subjects or {}).items() if n > keep}
            for subject in over:
                await js.purge_stream(subjects.STREAM_NAME, subject=subject, keep=keep)
        except Exception as exc:  # noqa: BLE001 - the stream works untrimmed
            log.warning("could not trim %s to %d events per subject: %s", family, keep, exc)
            continue
        if over:
            log.info(
                "%s: %d subjects trimmed to their last %d events (%d removed)",
                family,
                len(over),
                keep,
                sum(over.values()) - keep * len(over),
            )


NOT_READY_TIMEOUT_S = 60.0
"""How long streams and KV buckets are retried on a JetStream that is not ready."""


_NOT_READY = (
    NotFoundError,  # e.g. the add was refused for another reason than an existing stream
    ServiceUnavailableError,
    BadRequestError,  # e.g. no peers for the replicas yet; or another replica created it
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
)
"""What a JetStream that is not ready answers (a cluster still forming, or without quorum)."""


async def _until_ready(what: str, attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
    """`attempt()`, again every 0.5 s while JetStream is not ready; its last refusal is raised
    once `deadline` (monotonic) has passed."""
    return await until_answered(what, attempt, _NOT_READY, 0.5, deadline)


async def _declare(js: Any, config: StreamConfig, deadline: float) -> StreamConfig | None:
    """Create `config`'s stream, or update it when it exists, until `deadline` on a JetStream
    that is not ready. Returns the config it had before an update (None: created, or the same)."""

    async def attempt() -> StreamConfig | None:
        try:
            await js.add_stream(config)
            return None
        except BadRequestError:  # it exists (with another config)
            before = (await js.stream_info(config.name)).config
            await js.update_stream(config)
            return before  # type: ignore[no-any-return]

    return await _until_ready(f"stream {config.name}", attempt, deadline)


async def key_value(
    broker: NatsBroker, bucket: str, replicas: int = 1, ttl: float | None = None
) -> Any:
    """A JetStream KV bucket, created when missing (`ttl` expires every key, e.g. leases)."""
    config = KeyValueConfig(bucket=bucket, replicas=replicas, ttl=ttl, history=1)
    deadline = time.monotonic() + NOT_READY_TIMEOUT_S
    return await _open_bucket(broker.config.connection_state.stream, config, deadline)


async def _open_bucket(js: Any, config: KeyValueConfig, deadline: float) -> Any:
    """Open `config`'s bucket, or create it when missing, until `deadline` on a JetStream that
    is not ready."""

    async def attempt() -> Any:
        try:
            return await js.key_value(config.bucket)
        except NotFoundError:  # BucketNotFoundError is one
            return await js.create_key_value(config)

    return await _until_ready(f"KV bucket {config.bucket}", attempt, deadline)


async def read_bucket(kv: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Every key of a KV bucket with its latest entry (deleted keys left out), read through one
    watcher: values and revisions in one pass, not a `get` per key.

    Not `KeyValue.keys()`: its end-of-initial-values marker is sent as soon as the consumer info
    shows nothing pending and nothing received yet, which also happens when the server has just
    pushed every value but they are still on their way, and a message's own count of what is
    pending can drop to zero early under concurrent writes; a full bucket then reads as empty or
    partial (nats-py issue 842; a planner taking over once forgot an active rollout that way).
    Here the end is the bucket's last message as of the start, which the watcher delivers last
    of the initial values (they come in stream order, each key's latest). A bucket that holds
    messages must produce it within `timeout` (TimeoutError otherwise: never an empty answer by
    mistake)."""
    status = await kv.status()
    if not status.values:
        return {}
    last = status.stream_info.state.last_seq
    watcher = await kv.watchall()
    latest: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise nats.errors.TimeoutError
                entry = await watcher.updates(timeout=remaining)
            except nats.errors.TimeoutError:
                raise TimeoutError(
                    f"KV bucket {status.bucket}: {len(latest)} key(s) read in {timeout:.0f} s, "
                    f"never its last message (revision {last})"
                ) from None
            if entry is None:
                continue  # the end-of-initial-values marker: possibly early, see above
            latest[entry.key] = entry
            if entry.revision >= last:
                break
    finally:
        await watcher.stop()
    return {
        key: entry
        for key, entry in latest.items()
        if entry.operation not in ("DEL", "PURGE") and entry.value is not None
    }


async def wait_for_stream(broker: NatsBroker, name: str = subjects.STREAM_NAME) -> None:
    """Wait until the stream exists (its owner, the planner, declares it), logging while waiting."""
    await stream_declared(broker.config.connection_state.stream, name)


async def stream_declared(js: JetStreamContext, name: str = subjects.STREAM_NAME) -> None:
    """`wait_for_stream` on a bare nats-py JetStream context (benches, tools)."""
    waited = 0.0
    while True:
        try:
            await js.stream_info(name)
            return
        except Exception as exc:  # noqa: BLE001 - not found, or no JetStream yet
            if waited % 5 < 0.25:
                log.info("waiting for stream %s (declared by the planner): %s", name, exc)
            await asyncio.sleep(0.25)
            waited += 0.25


def current_message(broker: NatsBroker) -> NatsMessage:
    """The message being handled. Asking for it as a handler parameter (`msg: NatsMessage`)
    costs a thread-pool round trip per message in FastStream's dependency resolution; the
    broker's context has it at no cost."""
    return broker.context.get_local("message")  # type: ignore[no-any-return]


class _TraceContext(BaseMiddleware):  # type: ignore[type-arg]
    """What FastStream's telemetry middleware leaves of use in a process that exports neither
    traces nor metrics: the trace context a message carries, current while it is handled (what
    the handler publishes continues that trace; a sampled parent from an exporting peer is
    honoured, as `setup_telemetry` says). Without the consume spans and the metrics that went
    nowhere: they cost FastStream's consume of one message (a start, a clock request) about
    100 of its 235 us. Batches pass through, as with `_Telemetry`."""

    async def consume_scope(
        self, call_next: Callable[[StreamMessage[Any]], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        if isinstance(self.msg, list) or "traceparent" not in msg.headers:
            return await call_next(msg)
        token = otel_context.attach(context_of(msg.raw_message))
        try:
            return await call_next(msg)
        finally:
            otel_context.detach(token)


class _Telemetry(NatsTelemetryMiddleware):
    """FastStream's telemetry, but for batches (per-VM events, by hundreds): their handlers trace
    each event in its own trace where they work on it (clock-sync), and FastStream's span for a
    whole batch, linked to every message's trace, cost the planner a tenth of its CPU (the trace
    context of every message in the batch extracted, one link each)."""

    def __call__(self, msg: Any, /, *, context: Any) -> Any:
        if isinstance(msg, list):
            return BaseMiddleware(msg, context=context)
        return super().__call__(msg, context=context)


def make_broker(
    service: str, settings: BusSettings, telemetry: Telemetry, acks: bool = True
) -> NatsBroker:
    """The broker of a service: telemetry outermost, then dead-lettering of unreadable input.
    `acks=False` for a service whose JetStream consumers acknowledge nothing (the notifier's
    ordered replay): a dead-lettered message is then not acknowledged either, and the service's
    NATS user needs no `$JS.ACK` permission."""
    security = None
    if settings.nats_user:
        password = settings.nats_password.get_secret_value() if settings.nats_password else ""
        security = NatsUserPassword(settings.nats_user, password)
    broker = NatsBroker(
        settings.nats_servers,
        name=f"pausepatch-{service}",
        security=security,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        # The server's permission violations, so that a start refused its consumer fails
        # saying so instead of waiting for an answer that never comes (`until_answered`).
        error_cb=note_refusal,
        js_options={"timeout": settings.js_api_timeout_s},
        # Replies and deliveries under this user's own prefix (its permissions allow no other).
        inbox_prefix=settings.inbox_prefix,
        # FastStream's own lines go through our handlers (JSON in containers) as well; its
        # per-message "Received/Processed" lines are debug.
        logger=logging.getLogger(f"pausepatch.faststream.{service}"),
        log_level=logging.DEBUG,
        middlewares=[
            _Telemetry(
                tracer_provider=telemetry.tracer_provider,
                meter_provider=telemetry.meter_provider,
            )
            if telemetry.exporting or not isinstance(telemetry.meter_provider, NoOpMeterProvider)
            else _TraceContext,
            DeadLetter.factory(service, settings.max_message_bytes, acks),
        ],
        description=f"pausepatch {service}",
    )
    return broker


GC_THRESHOLDS = (10_000, 20, 20)
"""Collector thresholds once a service runs (CPython's defaults are 700, 10, 10)."""


def settle_gc() -> None:
    """Once a service has started: what exists now lives as long as the process, so it leaves
    the collector's view (`gc.freeze`), and the young generations are collected less often.

    Measured on the soak bench (`gc.callbacks`), the collector otherwise stopped every service
    for 5-30 ms several times a second and for 100-470 ms on each full collection, holding the
    GIL. Events die young and by reference counting; the thresholds only delay cyclic garbage.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


STARTING_GRACE_S = 10.0
"""An exit asked while a service starts waits this long for the start to end (then it is
cancelled, as FastStream cancels it)."""


class ServiceApp(FastStream):
    """FastStream's app, except that `run` waits for its exit instead of looking for it.

    FastStream's `run` checks every 0.1 s whether it should stop: ten wake-ups a second of every
    idle process, each a pass of the event loop and anyio's sleep. The soak's 100 idle agent
    processes spent about 0.1 of a core on it (docs/RELIABILITY.md). Here `exit()` (SIGINT,
    SIGTERM, or a service's own call, from any thread) sets an event that `run` awaits; start,
    stop, hooks and errors are FastStream's own."""

    _exit_requested: asyncio.Event | None = None
    _run_loop: asyncio.AbstractEventLoop | None = None

    async def run(
        self,
        log_level: int = logging.INFO,
        run_extra_options: dict[str, Any] | None = None,
        sleep_time: float = 0.1,  # FastStream's signature; nothing is polled here
    ) -> None:
        loop = asyncio.get_running_loop()
        self._run_loop, self._exit_requested = loop, asyncio.Event()
        if self._should_exit:
            self._exit_requested.set()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.exit)
        try:
            async with self.lifespan_context(**(run_extra_options or {})):
                try:
                    async with anyio.create_task_group() as tg:
                        started = asyncio.Event()

                        async def start() -> None:
                            await self._startup(log_level, run_extra_options)
                            started.set()

                        tg.start_soon(start)
                        await self._exit_requested.wait()
                        if not started.is_set():
                            # Asked to stop while starting (a SIGTERM just after the start):
                            # the start finishes first, for a while, so that the shutdown does
                            # not close the connection under it (FastStream's own run only
                            # made that race less likely, with its 0.1 s look).
                            with anyio.move_on_after(STARTING_GRACE_S):
                                await started.wait()
                        await self._shutdown(log_level)
                        tg.cancel_scope.cancel()
                except ExceptionGroup as group:
                    for exc in group.exceptions:
                        raise exc from None
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def exit(self) -> None:
        """Stop the app (thread-safe)."""
        super().exit()
        loop, requested = self._run_loop, self._exit_requested
        if loop is not None and requested is not None and not loop.is_closed():
            loop.call_soon_threadsafe(requested.set)


def make_app(
    broker: NatsBroker, service: str, description: str, documented: NatsBroker | None = None
) -> FastStream:
    """The FastStream app of a service, with its AsyncAPI description; `documented`: a broker
    never connected, whose subscribers describe what the service consumes without FastStream."""
    app = ServiceApp(
        broker,
        logger=logging.getLogger(f"pausepatch.faststream.{service}"),
        specification=AsyncAPI(
            *([broker, documented] if documented is not None else []),
            title=f"pausepatch {service}",
            version="0.1.0",
            description=description,
        ),
    )
    app.after_startup(settle_gc)
    return app


class DeadLetter(BaseMiddleware):  # type: ignore[type-arg]
    """Unreadable input (not JSON, wrong schema, wrong type) goes to `pp.dlq.<service>` with the
    reason and the original bytes; the message is acknowledged and the consumer goes on. A command
    (a request with a reply subject) also gets a structured `{error, detail}` answer."""

    service: str = ""
    max_bytes: int = 512 * 1024
    acks: bool = True

    @classmethod
    def factory(cls, service: str, max_bytes: int, acks: bool = True) -> type[DeadLetter]:
        """A middleware class bound to one service (`acks`: its JetStream consumers acknowledge
        what they handle)."""
        return type(
            f"DeadLetter_{service}",
            (cls,),
            {"service": service, "max_bytes": max_bytes, "acks": acks},
        )

    async def consume_scope(
        self, call_next: Callable[[StreamMessage[Any]], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        size = len(msg.body) if isinstance(msg.body, bytes | bytearray) else 0
        try:
            if size > self.max_bytes:
                raise InvalidMessage(f"oversized: {size} bytes, more than {self.max_bytes}")
            return await call_next(msg)
        except ValidationError as exc:
            reason = validation_reason(exc)
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 JSON: {exc}"
        except InvalidMessage as exc:
            reason = str(exc)
        await self._dead_letter(msg, reason)
        reply = getattr(msg.raw_message, "reply", "") or ""
        if reply.startswith("$JS.ACK."):
            if self.acks:
                await msg.ack()  # handled (dead-lettered), also where the handler acks by itself
            return None
        if msg.reply_to:
            return ErrorReply(error="invalid-request", detail=reason).to_json()
        return None

    async def _dead_letter(self, msg: StreamMessage[Any], reason: str) -> None:
        raw: bytes = msg.body if isinstance(msg.body, bytes) else bytes(msg.body)
        subject = getattr(msg.raw_message, "subject", "")
        await dead_letter(
            self.context.get("broker"), self.service, subject, raw, reason, msg.raw_message
        )


_DLQ_COUNTER = metrics.get_meter("pausepatch").create_counter(
    "pp.dlq.messages", description="Messages dead-lettered"
)
"""Every dead letter stored, whoever found it (a middleware, a batch reader, the notifier's replay);
the process's meter provider, once `setup_telemetry` set it."""


DLQ_PUBLISH_TIMEOUT_S = 5.0
"""How long a dead letter waits for the dead-letter stream to store it."""


def stored_at(raw: Any) -> tuple[str, int] | None:
    """The stream and sequence at which a message delivered by a JetStream consumer is stored
    (from its acknowledgement subject); None for anything else (a command, a core message)."""
    reply = getattr(raw, "reply", "") or ""
    if not reply.startswith("$JS.ACK."):
        return None
    try:
        metadata = raw.metadata
    except Exception:  # noqa: BLE001 - not JetStream metadata after all
        return None
    return metadata.stream, metadata.sequence.stream


async def dead_letter(
    broker: NatsBroker,
    service: str,
    subject: str,
    raw: bytes,
    reason: str,
    source: Any = None,
) -> None:
    """Put `raw` (as received on `subject`) on `pp.dlq.<service>` with the reason.

    A message a JetStream consumer delivered (`source`, the NATS message) is dead-lettered once
    per service, however many times it is read: each replica of a service reads it (the
    notifier's replicas read every event), and a redelivery reads it again. Its dead letter's
    `Nats-Msg-Id` is the service, stream and sequence, which the dead-letter stream stores once
    within its two-minute de-duplication window; the body says where the original is
    (`stream`, `stream_seq`)."""
    body: dict[str, Any] = {
        "service": service,
        "subject": subject,
        "reason": reason,
        "received_at": utcnow().isoformat(),
        "size": len(raw),
        # The copy must fit in one NATS message: an oversized original is cut.
        "truncated": len(raw) > DLQ_COPY_BYTES,
        "original_b64": base64.b64encode(raw[:DLQ_COPY_BYTES]).decode(),
    }
    headers = {"Pp-Dlq-Reason": reason[:200].replace("\n", " ")}
    stored = stored_at(source)
    if stored is not None:
        body["stream"], body["stream_seq"] = stored
        headers["Nats-Msg-Id"] = f"dlq.{service}.{stored[0]}.{stored[1]}"
    try:
        ack = await broker.publish(
            body,
            subjects.dead_letter(service),
            headers=headers,
            stream=DLQ_STREAM_NAME,
            timeout=DLQ_PUBLISH_TIMEOUT_S,
        )
    except Exception:
        log.exception("could not dead-letter a message on %s (%s)", subject, reason)
        return
    if ack is not None and ack.duplicate:
        log.info("a message on %s was dead-lettered already: %s", subject, reason)
        return
    # Counted where stored: the sum over a service's replicas is its dead letters.
    _DLQ_COUNTER.add(1, {"service": service, "subject": subject})
    log.warning("dead-lettered a message on %s: %s", subject, reason)


async def raw_only(msg: Any) -> None:
    """The decoder of a batch subscriber whose handler reads its messages itself (`read_batch`):
    FastStream would otherwise parse every body as JSON first, for nothing (at fleet scale, one
    sixth of such a consumer's time). A coroutine function on purpose: FastStream runs a plain
    function decoder in a worker thread, one thread hop per message."""
    return None


def read_event(raw: Msg, accepted: tuple[type[Event], ...], max_bytes: int) -> Event | None:
    """The event a message carries; None for a kind of event the reader does not take. Raises
    `InvalidMessage` with the reason a message cannot be read (for the dead letters)."""
    if len(raw.data) > max_bytes:
        raise InvalidMessage(f"oversized: {len(raw.data)} bytes, more than {max_bytes}")
    try:
        return parse_event_bytes(raw.data, accepted, raw.subject)
    except ValidationError as exc:
        raise InvalidMessage(validation_reason(exc)) from exc
    except InvalidMessage:
        raise
    except ValueError as exc:
        raise InvalidMessage(str(exc) or type(exc).__name__) from exc


async def read_batch(
    broker: NatsBroker, service: str, accepted: tuple[type[Event], ...], max_bytes: int
) -> list[tuple[Event, Msg]]:
    """The events of the batch being handled (a batch pull subscriber), each with its message;
    what cannot be read, or is not of an accepted kind, is dead-lettered and acknowledged, one
    by one."""
    batch = current_message(broker)
    raws: list[Msg] = (
        batch.raw_message if isinstance(batch.raw_message, list) else [batch.raw_message]
    )
    events: list[tuple[Event, Msg]] = []
    for raw in raws:
        try:
            event = read_event(raw, accepted, max_bytes)
            if event is None:
                raise InvalidMessage(f"a {json.loads(raw.data)['type']} on {raw.subject}")
        except InvalidMessage as exc:
            reason = str(exc) or type(exc).__name__
        else:
            events.append((event, raw))
            continue
        await dead_letter(broker, service, raw.subject, raw.data, reason, raw)
        await raw.ack()
    return events


def recorded(traceparent: str | None) -> bool:
    """A W3C `traceparent` header of a trace that is recorded (its sampled flag set)."""
    if not traceparent or len(traceparent) < 2:
        return False
    try:
        return bool(int(traceparent[-2:], 16) & 1)
    except ValueError:
        return False


def context_of(raw: Msg) -> otel_context.Context:
    """The trace context a message carries (its W3C headers)."""
    return propagate.extract(dict(raw.headers or {}))


def validation_reason(exc: ValidationError) -> str:
    """A short, readable reason from a pydantic error (for the dead-letter record)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "message"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts) or str(exc)


def decode_original(dead_letter_body: bytes) -> bytes:
    """The original bytes of a dead-lettered message."""
    return base64.b64decode(json.loads(dead_letter_body)["original_b64"])


_ACKS_KEPT = 16_384
"""Acks awaited by one connection at once before those given up on are forgotten."""


class _AckInbox:
    """The stream's acks (`PubAck`) of one connection's publishes, on one reply subscription.

    nats-py's `publish_async` costs every event a task (its stall semaphore is awaited through
    `asyncio.wait_for`), a read of the system's random source (`token_hex`, a system call) and a
    callback scheduled when its ack comes: with them an event cost its sender 30 us of CPU, 21
    without (bench_publish.py). Here the reply subject is a counter after one inbox of the
    connection (its inbox prefix, as the NATS permissions expect), and the ack resolves its
    future where it is read. How much is in flight is bounded by the publisher (window x depth),
    not here."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self._count = 0
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._subscription: Subscription | None = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Any]:
        """Write one message to JetStream; the future is its ack."""
        if self._subscription is None:
            self._subscription = await self.nc.subscribe(self.prefix + "*", cb=self._on_ack)
        if len(self._waiting) >= _ACKS_KEPT:
            # Those the publisher gave up on (cancelled after its ack timeout) or never wrote.
            self._waiting = {t: f for t, f in self._waiting.items() if not f.done()}
        self._count += 1
        token = str(self._count)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return future

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self.prefix) :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":  # no responders: no stream
            future.set_exception(NoStreamResponseError())
            return
        data = msg.data
        if data.startswith(b'{"stream":') and b'"error"' not in data:
            # Stored: the ack's body (stream, sequence, duplicate) is not needed, and one
            # parse less per event counts at a thousand events a second.
            future.set_result(None)
            return
        try:
            reply = json.loads(data)
        except ValueError as exc:
            future.set_exception(exc)
            return
        if "error" in reply:
            future.set_exception(APIError.from_error(reply["error"]))
        else:
            future.set_result(reply)


@dataclass
class _Pending:
    event: Event
    context: otel_context.Context
    done: asyncio.Future[None] | None = None
    enqueued: float = field(default_factory=time.monotonic)


class EventPublisher:
    """Publishes events to the `PAUSEPATCH` stream in order, with `Nats-Msg-Id` = `event_id`.

    Up to `window` queued events are written at once and their acks awaited together (the
    connection keeps their order), so a burst (every VM of a host resuming) costs one round trip;
    and up to `depth` such windows are awaited at once: the next window is written while earlier
    ones wait on their acks, so a busy server's ack time is paid once, not once per window. Acks
    are settled window after window; once one fails, nothing new is written until every event
    that failed, in that window and in those written after it, has been sent again in the order
    emitted and stored (an outage, where everything fails, keeps the order).

    `emit` never waits: the event is queued with the caller's trace context and a background task
    publishes it, retrying with the same id (so JetStream stores it once) until the server acks.
    A NATS outage therefore never delays the caller, and events emitted during it arrive after
    reconnect, once. `publish` does the same but waits for the ack.

    Events go straight to the broker's connection (acks on the publisher's own inbox:
    `_AckInbox`), with the headers FastStream would set
    (`content-type`, `correlation_id`: the event id) and the caller's trace context: FastStream's
    publish pipeline (its middlewares, a publish span whether or not anything is recorded, the
    body encoded twice) cost about three times as much CPU per event, on the events the agents,
    clock-sync and the planner send per VM. In a recorded trace, each publish still has its own
    `<subject> create` span (PRODUCER, as FastStream names it), which the consumer's span
    continues.
    """

    def __init__(
        self,
        broker: NatsBroker,
        retry_s: float = 0.5,
        ack_timeout_s: float = 5.0,
        window: int = 256,
        depth: int = 4,
    ) -> None:
        self.broker = broker
        self.window = window
        self.depth = depth
        self._windows = asyncio.Semaphore(depth)
        self._unsettled = 0  # events taken from the queue and not yet stored
        self._written: asyncio.Queue[tuple[list[_Pending], list[_Outcome]]] = asyncio.Queue()
        self._writing = asyncio.Lock()
        self._settler: asyncio.Task[None] | None = None
        self.retry_s = retry_s
        self.ack_timeout_s = ack_timeout_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._acks: _AckInbox | None = None
        self._traced: tuple[trace.SpanContext, dict[str, str]] = (trace.INVALID_SPAN_CONTEXT, {})
        self.published = 0
        # The process's providers (set by `setup_telemetry`), resolved when first used.
        self._tracer = trace.get_tracer("pausepatch.bus")
        self._counter = metrics.get_meter("pausepatch").create_counter(
            "pp.events.published", description="Events stored in the stream, per type"
        )

    def start(self) -> None:
        """Start the background sender (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-publisher")
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_all(), name="event-publisher-acks")

    def emit(self, event: Event) -> None:
        """Queue `event`; returns at once."""
        self.start()
        self._queue.put_nowait(_Pending(event, otel_context.get_current()))

    async def publish(self, event: Event) -> None:
        """Queue `event` and wait until the stream has stored it."""
        await self.storing(event)

    def storing(
        self, event: Event, context: otel_context.Context | None = None
    ) -> asyncio.Future[None]:
        """Queue `event` (in trace `context`, by default the current one); the future is done
        once the stream has stored it (a publish awaited later, or together with others, without
        a task of its own)."""
        self.start()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if context is None:
            context = otel_context.get_current()
        self._queue.put_nowait(_Pending(event, context, done))
        return done

    @property
    def backlog(self) -> int:
        """Events not yet acknowledged by the stream."""
        return self._queue.qsize()

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued is published; False on timeout."""
        deadline = time.monotonic() + timeout
        while (self._queue.qsize() or self._unsettled) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not (self._queue.qsize() or self._unsettled)

    async def stop(self, timeout: float = 5.0) -> None:
        """Drain, then stop the sender."""
        await self.drain(timeout)
        tasks = [t for t in (self._task, self._settler) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            window = [await self._queue.get()]
            while len(window) < self.window and not self._queue.empty():
                window.append(self._queue.get_nowait())
            self._unsettled += len(window)
            acquired = False
            try:
                await self._windows.acquire()
                acquired = True
                async with self._writing:
                    # One window after the other: the connection keeps their order.
                    self._written.put_nowait((window, await self._write(window)))
            except BaseException:  # cancelled: the publisher stopped
                self._unsettled -= len(window)
                if acquired:
                    self._windows.release()
                raise

    async def _settle_all(self) -> None:
        """Settle the written windows in the order written; on a failure, send again what failed
        before anything new is written."""
        while True:
            window, outcomes = await self._written.get()
            slots = 1
            try:
                failed = await self._settle(window, outcomes)
                if failed:
                    async with self._writing:
                        # The windows written after this one: their failures go after its own.
                        while not self._written.empty():
                            later, later_outcomes = self._written.get_nowait()
                            slots += 1
                            failed += await self._settle(later, later_outcomes)
                        while failed:
                            await asyncio.sleep(self.retry_s)
                            failed = await self._settle(failed, await self._write(failed))
            finally:
                for _ in range(slots):
                    self._windows.release()

    async def _write(self, window: list[_Pending]) -> list[_Outcome]:
        """Write every event of `window` to the connection; each outcome is its ack to come, or
        why it could not be written."""
        outcomes: list[_Outcome] = []
        for pending in window:
            try:
                outcomes.append(await self._send(pending))
            except Exception as exc:  # noqa: BLE001 - not connected, closed...: sent again
                outcomes.append(exc)
        return outcomes

    async def _settle(self, window: list[_Pending], outcomes: list[_Outcome]) -> list[_Pending]:
        """Await a written window's acks together (one timer for the window, not one per event);
        answers what failed (in order), to be sent again with the same ids."""
        acks = [o for o in outcomes if isinstance(o, asyncio.Future)]
        if acks:
            _, late = await asyncio.wait(acks, timeout=self.ack_timeout_s)
            for ack in late:
                ack.cancel()
        failed, reasons = [], []
        for pending, outcome in zip(window, outcomes, strict=True):
            reason = _failure(outcome)
            if reason is not None:
                failed.append(pending)
                reasons.append(reason)
                continue
            self.published += 1
            self._unsettled -= 1
            self._counter.add(1, {"type": pending.event.type})
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(None)
        if failed:
            first = failed[0].event
            log.warning(
                "publish of %d event(s) failed (first %s on %s: %s); retrying",
                len(failed),
                first.type,
                first.subject(),
                reasons[0],
            )
        return failed

    def _trace_headers(self, context: otel_context.Context) -> dict[str, str]:
        """The headers carrying `context` on (`traceparent`, ...). The events of one window, or
        of one host's clock results, share one span context: what the propagators write for it is
        kept and used again while it stays the same (no baggage to carry)."""
        span_context = trace.get_current_span(context).get_span_context()
        plain = not baggage.get_all(context)
        if plain and span_context.is_valid and span_context == self._traced[0]:
            return self._traced[1]
        carried: dict[str, str] = {}
        propagate.inject(carried, context=context)
        if plain:
            self._traced = (span_context, carried)
        return carried

    def _acks_of(self, nc: NatsClient) -> _AckInbox:
        """The ack inbox of the broker's connection (a new one if the broker connected anew)."""
        if self._acks is None or self._acks.nc is not nc:
            self._acks = _AckInbox(nc)
        return self._acks

    async def _send(self, pending: _Pending) -> asyncio.Future[Any]:
        """Write one event to the connection; the future is its ack (a `PubAck`)."""
        event = pending.event
        subject = event.subject()
        event_id = str(event.event_id)
        payload = event.model_dump_json().encode()
        headers = {
            "content-type": "application/json",
            "correlation_id": event_id,
            "Nats-Msg-Id": event_id,
            "Nats-Expected-Stream": subjects.STREAM_NAME,
        }
        acks = self._acks_of(self.broker.config.connection_state.connection)
        context, span = pending.context, None
        if trace.get_current_span(context).get_span_context().trace_flags.sampled:
            # A recorded trace: each event has a span of its own (named as FastStream names it,
            # as the creation context of one message of a batch sent at once), from its write to
            # its ack; the consumer's span continues it. Otherwise only the context travels on.
            span = self._tracer.start_span(
                f"{subject} create",
                context=context,
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "create",
                    "messaging.destination.name": subject,
                    "messaging.message.id": event_id,
                    "messaging.message.body.size": len(payload),
                    "pp.event.type": event.type,
                },
            )
            context = trace.set_span_in_context(span, context)
        headers.update(self._trace_headers(context))
        try:
            ack = await acks.publish(subject, payload, headers)
        except BaseException as exc:
            if span is not None:
                _end_span(span, str(exc) or type(exc).__name__)
            raise
        if span is not None:
            ack.add_done_callback(lambda done: _end_span(span, _failure(done)))
        return ack


_Outcome = asyncio.Future[Any] | BaseException
"""A written event's ack to come, or why it could not be written."""


def _failure(outcome: _Outcome) -> str | None:
    """Why a publish failed (its exception, its ack's error, no ack in time); None if stored."""
    if isinstance(outcome, BaseException):
        return str(outcome) or type(outcome).__name__
    if not outcome.done() or outcome.cancelled():
        return "no acknowledgement in time"
    exc = outcome.exception()
    return None if exc is None else (str(exc) or type(exc).__name__)


def _end_span(span: trace.Span, error: str | None) -> None:
    if error is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end()
