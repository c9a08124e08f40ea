"""A client of the bus API for operators' tools (the CLI, the demo, tests): planner commands
over request/reply, and a watcher of the event stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from shared import subjects
from shared.contracts import EVENT_TYPES, Event

log = logging.getLogger(__name__)


class CommandError(Exception):
    """The planner answered `{error, detail}` (or did not answer)."""

    def __init__(self, error: str, detail: Any = None) -> None:
        super().__init__(f"{error}: {detail}" if detail is not None else error)
        self.error = error
        self.detail = detail


async def connect(url: str, user: str | None = None, password: str | None = None) -> Client:
    """A plain NATS connection (`url` may list several servers, comma-separated) that reconnects
    for ever once up, but fails at once (OSError) when no server can be reached at all."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    await _any_reachable(servers)

    async def quiet(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    # The user may come in the URL (`nats://operator:secret@host:4222`, as the CLI takes it).
    login = user or next(
        (unquote(p.username) for s in servers if (p := urlparse(s)).username), None
    )
    return await nats.connect(
        servers=servers,
        user=user,
        password=password,
        # Replies arrive under the user's own prefix: its NATS permissions allow no other.
        inbox_prefix=subjects.inbox_prefix(login),
        name="pausepatch-client",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=3,
        error_cb=quiet,
    )


async def _any_reachable(servers: list[str], timeout: float = 3.0) -> None:
    errors = []
    for server in servers:
        parsed = urlparse(server if "://" in server else f"nats://{server}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            errors.append(f"{server}: {exc or type(exc).__name__}")
            continue
        writer.close()
        return
    raise OSError("; ".join(errors))


class PlannerClient:
    """`pp.cmd.rollout.*` as methods."""

    def __init__(
        self, nc: Client, timeout: float = 10.0, no_responder_grace_s: float = 3.0
    ) -> None:
        self.nc = nc
        self.timeout = timeout
        self.no_responder_grace_s = no_responder_grace_s

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command; raise `CommandError` on a structured error or no answer.

        "No responders" is retried for up to `no_responder_grace_s`: a standby planner taking
        over, or a subscription still propagating through a cluster, answers a moment later.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.no_responder_grace_s
        while True:
            try:
                reply = await self.nc.request(
                    subjects.rollout_command(verb),
                    json.dumps(body or {}).encode(),
                    timeout=self.timeout,
                )
                break
            except nats.errors.NoRespondersError as exc:
                if loop.time() < deadline:
                    await asyncio.sleep(0.2)
                    continue
                raise CommandError("no-planner", "no active planner answered") from exc
            except TimeoutError as exc:
                raise CommandError(
                    "no-planner", f"no planner answered within {self.timeout:.0f} s"
                ) from exc
        data = json.loads(reply.data) if reply.data else {}
        if isinstance(data, dict) and "error" in data and len(data) <= 2:
            raise CommandError(data["error"], data.get("detail"))
        return data  # type: ignore[no-any-return]

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout."""
        return await self.call("submit", request)

    async def plan(self, request: dict[str, Any]) -> dict[str, Any]:
        """Dry run."""
        return await self.call("plan", request)

    async def get(self, rollout_id: str) -> dict[str, Any]:
        """One rollout with every host and VM (fetched page by page)."""
        report = await self.call("get", {"rollout_id": rollout_id})
        while report.get("next_offset") is not None:
            page = await self.call(
                "get", {"rollout_id": rollout_id, "offset": report["next_offset"]}
            )
            report["hosts"] += page["hosts"]
            report["next_offset"] = page["next_offset"]
        return report

    async def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout."""
        return (await self.call("list"))["rollouts"]  # type: ignore[no-any-return]

    async def halt(self, rollout_id: str, reason: str | None = None) -> dict[str, Any]:
        """Halt a rollout."""
        return await self.call("halt", {"rollout_id": rollout_id, "reason": reason})

    async def resume(self, rollout_id: str) -> dict[str, Any]:
        """Resume a halted rollout."""
        return await self.call("resume", {"rollout_id": rollout_id})

    async def abort(self, rollout_id: str, reason: str | None = None) -> dict[str, Any]:
        """Abort a rollout."""
        return await self.call("abort", {"rollout_id": rollout_id, "reason": reason})

    async def hosts(self) -> list[dict[str, Any]]:
        """The fleet inventory (fetched page by page)."""
        page = await self.call("hosts")
        hosts: list[dict[str, Any]] = page["hosts"]
        while page.get("next_offset") is not None:
            page = await self.call("hosts", {"offset": page["next_offset"]})
            hosts += page["hosts"]
        return hosts


@dataclass
class Received:
    """One event off the stream, with its subject and stream sequence."""

    subject: str
    seq: int
    event: Event | None
    raw: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class EventWatcher:
    """Every event of the `PAUSEPATCH` stream from its start (an ordered consumer), kept in order,
    so a test can wait for an outcome without racing it."""

    def __init__(self, nc: Client, subject: str = subjects.EVENTS_ROOT) -> None:
        self.nc = nc
        self.subject = subject
        self.received: list[Received] = []
        self._changed = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> EventWatcher:
        js = self.nc.jetstream()
        self._sub = await js.subscribe(
            self.subject,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=self._on_msg,
        )
        return self

    async def _on_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if self.received and seq <= self.received[-1].seq:
            return  # an ordered consumer that was reset delivers from where it stood again
        try:
            raw = json.loads(msg.data)
        except ValueError:
            raw = {}
        cls = EVENT_TYPES.get(raw.get("type", "")) if isinstance(raw, dict) else None
        event = None
        if cls is not None:
            try:
                event = cls.model_validate(raw)
            except ValueError:
                event = None
        self.received.append(Received(msg.subject, seq, event, raw, dict(msg.headers or {})))
        self._changed.set()

    def events(self, kind: type[Event] | None = None, **fields: Any) -> list[Any]:
        """Events received so far, optionally of one type and with given field values."""
        found = []
        for r in self.received:
            if r.event is None or (kind is not None and not isinstance(r.event, kind)):
                continue
            if all(getattr(r.event, k, None) == v for k, v in fields.items()):
                found.append(r.event)
        return found

    async def wait_for(
        self, predicate: Callable[[EventWatcher], Any], timeout: float, what: str = "events"
    ) -> Any:
        """Wait until `predicate(self)` returns something truthy; return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate(self)
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
