"""planner's FastStream app: `faststream run services.planner.main:app` or
`python -m services.planner`.

The planner owns the `PAUSEPATCH` stream and the rollout KV bucket. Only the instance holding the
lease subscribes to anything: a standby waits in its start-up hook until the lease is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import DeliverPolicy, PullSub
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from pydantic import Field

from services.planner.engine import (
    REPLY_MAX_BYTES,
    RequestError,
    RolloutEngine,
    fill_page,
    fit_reply,
)
from services.planner.lease import Lease
from services.planner.state import LeadershipLost, RolloutStore
from shared import subjects
from shared.bus import (
    IDLE_POLL_S,
    EventPublisher,
    current_message,
    declare_streams,
    events_stream,
    key_value,
    make_app,
    make_broker,
    raw_only,
    read_batch,
    until_answered,
)
from shared.contracts import (
    ClockSynced,
    Event,
    HostClockSynced,
    HostInventory,
    HostPatched,
    HostPaused,
    MaintenanceApproved,
    MaintenanceCompleted,
    MaintenanceDeferred,
    Page,
    RolloutRef,
    RolloutSubmit,
    VMClock,
    ensure_on_subject,
    parse_event_bytes,
)
from shared.logs import setup_logging
from shared.settings import BusSettings
from shared.telemetry import setup_telemetry

SERVICE = "planner"
ROLLOUTS_BUCKET = "pp_rollouts"
LEASE_BUCKET = "pp_planner_lease"
INVENTORY_DURABLE = "planner-inventory"
"""The active planner's inventory consumer (deleted and made anew by each planner that starts)."""
REPLY_HEADROOM_BYTES = 8 * 1024
"""Room left in an answer for its headers (trace context and the like)."""

log = logging.getLogger(__name__)


class PlannerSettings(BusSettings):
    """planner settings (`PP_TICK_S`, `PP_LEASE_TTL_S`, ...)."""

    instance_id: str = Field(default_factory=lambda: f"planner-{uuid.uuid4().hex[:8]}")
    tick_s: float = 0.1
    """How often rollouts are moved forward (and on every event)."""
    lease_ttl_s: float = 6.0
    """A standby takes over at most this long after the active planner dies."""
    start_timeout_s: float = 10.0
    """An agent must begin a window this soon after `MaintenanceStarted`."""
    host_grace_s: float = 30.0
    """Beyond the budget, how long a started host may stay silent before it counts as failed."""
    clock_timeout_s: float = 20.0
    """How long a wave waits for clock-sync results after its hosts completed."""
    clock_lookup_after_s: float = 2.0
    """A host's clock results this late are read from the stream (a delivery lost on the way)."""
    inventory_stale_s: float = 60.0
    """A host whose last inventory is older than this is not planned."""
    reboot_min_notice_s: float = 15 * 60.0
    max_defer_s: float = 600.0
    """Longest postponement one defer may obtain."""
    max_defers: int = 1
    """Defers honoured per scheduled event."""
    rollout_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """A finished rollout (its report, per host and per VM) is kept this long, then forgotten."""


CLOCK_LOOKUP_MAX_VMS = 64
"""Per host and lookup, how many VMs' own `ClockSynced` are read at most."""


async def clock_results_in_stream(
    js: JetStreamContext, rollout_id: str, host: str, vms: list[str]
) -> dict[str, VMClock]:
    """The clock results of `vms` (of `host`, in rollout `rollout_id`) that the stream holds: the
    host's last `HostClockSynced`, then, if it is of this rollout but does not cover them all
    (clock-sync reported the host in parts), each remaining VM's last `ClockSynced` (at most
    `CLOCK_LOOKUP_MAX_VMS`). A host with no result of this rollout yet costs one read, not one
    per VM (on a loaded machine, many hosts of a wave are that late). A result of another
    rollout, or one that cannot be read, is not one."""
    found: dict[str, VMClock] = {}
    wanted = set(vms)

    async def last(subject: str, kind: type[Event]) -> Event | None:
        try:
            msg = await js.get_last_msg(subjects.STREAM_NAME, subject)
            return parse_event_bytes(msg.data or b"", (kind,), subject)
        except (NotFoundError, ValueError):  # none stored; or not readable (`InvalidMessage`)
            return None

    host_event = await last(subjects.host_clock(host), HostClockSynced)
    if not isinstance(host_event, HostClockSynced) or host_event.rollout_id != rollout_id:
        return found
    found.update({vm: c for vm, c in host_event.clocks.items() if vm in wanted})
    rest = [v for v in vms if v not in found][:CLOCK_LOOKUP_MAX_VMS]
    own = await asyncio.gather(*(last(subjects.vm_clock(host, vm), ClockSynced) for vm in rest))
    for vm, vm_event in zip(rest, own, strict=True):
        if isinstance(vm_event, ClockSynced) and vm_event.rollout_id == rollout_id:
            found[vm] = VMClock.of(vm_event)
    return found


def build_app(settings: PlannerSettings) -> FastStream:
    """The planner as a FastStream app."""
    setup_logging(SERVICE, settings.log_format, settings.log_level)
    telemetry = setup_telemetry(SERVICE)
    broker = make_broker(SERVICE, settings, telemetry)
    publisher = EventPublisher(broker)
    stream = events_stream(declare=False)
    lock = asyncio.Lock()
    wake = asyncio.Event()
    state: dict[str, Any] = {}

    def engine() -> RolloutEngine:
        return state["engine"]  # type: ignore[no-any-return]

    async def apply(handler: Callable[[RolloutEngine], Awaitable[None]]) -> None:
        # What moves a rollout (completions, approvals) is serialized with the ticker and the
        # commands; per-VM records (`apply_batch`) touch one host's record only.
        async with lock:
            await handler(engine())
        wake.set()

    def reply_limit() -> int:
        """What one answer may hold: the server's maximum message, less room for headers."""
        max_payload = broker.config.connection_state.connection.max_payload
        return max(REPLY_HEADROOM_BYTES, max_payload - REPLY_HEADROOM_BYTES)

    def page_limit() -> int:
        """What a page of a long answer holds at most."""
        return min(REPLY_MAX_BYTES, reply_limit())

    async def command(
        action: Callable[[RolloutEngine], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        try:
            async with lock:
                result = await action(engine())
        except RequestError as exc:
            return exc.reply.to_json()
        wake.set()
        return fit_reply(result, reply_limit())

    def durable(name: str, subject: str, description: str) -> Any:
        return broker.subscriber(
            subject,
            stream=stream,
            durable=f"planner-{name}",
            # One message per fetch (a larger batch waits for stragglers up to the timeout),
            # handled by a pool of workers. A fetch of one returns as soon as it comes: the
            # timeout says how often an idle subject is asked again.
            pull_sub=PullSub(batch_size=1, timeout=IDLE_POLL_S),
            inbox_prefix=settings.pull_inbox,
            max_workers=16,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            title=f"{subject}:planner",
            description=description,
        )

    def per_vm(name: str, subject: str, description: str) -> Any:
        # Per-VM records come by thousands: in batches (the fetch returns 50 ms after the
        # first), applied at once, acknowledged once written together.
        return broker.subscriber(
            subject,
            stream=stream,
            durable=f"planner-{name}",
            pull_sub=PullSub(batch_size=256, timeout=0.05, batch=True),
            decoder=raw_only,
            inbox_prefix=settings.pull_inbox,
            ack_policy=AckPolicy.MANUAL,
            title=f"{subject}:planner",
            description=description,
        )

    async def apply_batch(
        kind: type[Event], handler: Callable[[RolloutEngine, Any], Awaitable[None]]
    ) -> None:
        items = await read_batch(broker, SERVICE, (kind,), settings.max_message_bytes)
        for event, _ in items:
            await handler(engine(), event)
        raws = [raw for _, raw in items]

        async def ack_all() -> None:
            # One after the other: an ack is a write to the connection's buffer, and a task
            # each (`gather`) cost more than the acks themselves.
            for raw in raws:
                await raw.ack()

        engine().store.after_flush(ack_all)
        wake.set()

    # ---------------------------------------------------------------- commands

    @broker.subscriber(subjects.rollout_command("submit"), title="pp.cmd.rollout.submit:planner")
    async def submit(request: RolloutSubmit) -> dict[str, Any]:
        """Plan and start a rollout; answers the rollout or `{error, detail}`."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            return e.summary(await e.submit(request))

        return await command(act)

    @broker.subscriber(subjects.rollout_command("plan"), title="pp.cmd.rollout.plan:planner")
    async def plan(request: RolloutSubmit) -> dict[str, Any]:
        """Dry run: the waves of `request`, nothing started."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            event_type, _ = e.validate(request)
            return {**e.plan(request).to_json(), "event_type": event_type}

        return await command(act)

    @broker.subscriber(subjects.rollout_command("get"), title="pp.cmd.rollout.get:planner")
    async def get(ref: RolloutRef) -> dict[str, Any]:
        """A rollout with every host and VM."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            rollout = e.get(ref.rollout_id)
            if ref.summary:
                return e.summary(rollout)
            return e.report(rollout, ref.offset, ref.limit, max_bytes=page_limit())

        return await command(act)

    @broker.subscriber(subjects.rollout_command("list"), title="pp.cmd.rollout.list:planner")
    async def list_rollouts(body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every rollout, newest first (summaries)."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            # Newest first, without the plans themselves (a fleet's plan is long).
            rollouts = sorted(e.rollouts.values(), key=lambda r: r.created_at, reverse=True)
            bulky = ("waves", "violations", "skipped_hosts")
            return {
                "rollouts": [
                    {k: v for k, v in e.summary(r).items() if k not in bulky}
                    for r in rollouts[:500]
                ]
            }

        return await command(act)

    @broker.subscriber(subjects.rollout_command("halt"), title="pp.cmd.rollout.halt:planner")
    async def halt(ref: RolloutRef) -> dict[str, Any]:
        """Stop starting hosts; in-flight hosts finish."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            return e.summary(await e.halt(ref.rollout_id, ref.reason))

        return await command(act)

    @broker.subscriber(subjects.rollout_command("resume"), title="pp.cmd.rollout.resume:planner")
    async def resume(ref: RolloutRef) -> dict[str, Any]:
        """Continue a halted rollout."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            return e.summary(await e.resume(ref.rollout_id))

        return await command(act)

    @broker.subscriber(subjects.rollout_command("abort"), title="pp.cmd.rollout.abort:planner")
    async def abort(ref: RolloutRef) -> dict[str, Any]:
        """Cancel what has not started; scheduled events disappear."""

        async def act(e: RolloutEngine) -> dict[str, Any]:
            return e.summary(await e.abort(ref.rollout_id, ref.reason))

        return await command(act)

    @broker.subscriber(subjects.rollout_command("hosts"), title="pp.cmd.rollout.hosts:planner")
    async def hosts(page: Page) -> dict[str, Any]:
        """The fleet inventory as the planner knows it, a page at a time."""
        known = sorted(engine().inventory.items(), key=lambda kv: kv[0])
        listed = fill_page(
            (inv.to_json() for _, inv in known[page.offset : page.offset + page.limit]),
            page_limit(),
        )
        end = page.offset + len(listed)
        return {
            "hosts": listed,
            "total": len(known),
            "next_offset": end if end < len(known) else None,
        }

    # ---------------------------------------------------------------- events

    @broker.subscriber(
        subjects.host_inventory(),
        stream=stream,
        # Made anew by each planner that becomes active (`startup` deletes the last one's):
        # the last inventory of every host, then every new one.
        durable=INVENTORY_DURABLE,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        # Nothing to acknowledge: a planner that stops reads the last ones again when it starts.
        config=ConsumerConfig(ack_policy=JsAckPolicy.NONE),
        # Every agent's heartbeat (10,000 hosts: 1,000 a second) in batches: one pass through
        # the per-message pipeline per batch, not per inventory (bench/bench_inventory.py).
        pull_sub=PullSub(batch_size=256, timeout=0.05, batch=True),
        decoder=raw_only,
        inbox_prefix=settings.pull_inbox,
        ack_policy=AckPolicy.MANUAL,
        title="pp.evt.host.*.inventory:planner",
        description="The fleet inventory (the last one of every host, then every new one).",
    )
    async def on_inventory(documented: list[HostInventory] | None = None) -> None:
        # (`documented` names the payload for the bus documents; the batch is read below.)
        items = await read_batch(broker, SERVICE, (HostInventory,), settings.max_message_bytes)
        for event, _ in items:
            if isinstance(event, HostInventory):
                engine().on_inventory(event)

    @durable("approved", subjects.host_approved(), "VM approvals (start a wave early).")
    async def on_approved(event: MaintenanceApproved) -> None:
        msg = current_message(broker)
        ensure_on_subject(event, msg.raw_message.subject)
        await apply(lambda e: e.on_approved(event))

    @durable("deferred", subjects.host_deferred(), "VM requests to postpone.")
    async def on_deferred(event: MaintenanceDeferred) -> None:
        msg = current_message(broker)
        ensure_on_subject(event, msg.raw_message.subject)
        await apply(lambda e: e.on_deferred(event))

    # A window's pauses come as one `HostPaused` per host, not one `VMPaused` per VM: reading
    # every VM's pause cost the planner a fifth of its CPU and the server its deliveries and
    # acknowledgements, for what the host's event says at once.
    @per_vm("host-paused", subjects.host_paused(), "Pauses of a host's VMs.")
    async def on_host_paused() -> None:
        await apply_batch(HostPaused, RolloutEngine.on_host_paused)

    @per_vm("patched", subjects.host_patched(), "Patch results.")
    async def on_patched() -> None:
        await apply_batch(HostPatched, RolloutEngine.on_patched)

    @durable("completed", subjects.host_completed(), "Host windows closed.")
    async def on_completed(event: MaintenanceCompleted) -> None:
        msg = current_message(broker)
        ensure_on_subject(event, msg.raw_message.subject)
        await apply(lambda e: e.on_completed(event))

    # Clock results likewise: one `HostClockSynced` per host (clock-sync's results for a host's
    # VMs handled together), not one `ClockSynced` per VM.
    @per_vm("host-clock", subjects.host_clock(), "Clock sync results of a host's VMs.")
    async def on_host_clock() -> None:
        await apply_batch(HostClockSynced, RolloutEngine.on_host_clock)

    # ---------------------------------------------------------------- lifecycle

    app = make_app(
        broker, SERVICE, "Plans rollouts in waves, gives notice, starts hosts, tracks results."
    )

    async def ticker() -> None:
        while True:
            due = engine().seconds_until_due()
            try:
                await asyncio.wait_for(wake.wait(), min(settings.tick_s, due))
            except TimeoutError:
                pass
            wake.clear()
            try:
                async with lock:
                    await engine().advance()
            except LeadershipLost as exc:
                log.error("stopping: %s (another planner is active)", exc)
                app.exit()
                return
            except Exception:
                log.exception("advancing rollouts failed")
                await asyncio.sleep(settings.tick_s)

    async def keep_lease(lease: Lease) -> None:
        await lease.keep()
        log.error("stopping: another planner is active now")
        app.exit()

    @app.on_startup
    async def startup() -> None:
        await broker.connect()
        await declare_streams(
            broker,
            settings.stream_replicas,
            settings.stream_max_age_s,
            settings.stream_max_per_subject,
            settings.stream_max_bytes,
            settings.dlq_max_msgs,
        )
        lease_kv = await key_value(
            broker, LEASE_BUCKET, settings.stream_replicas, ttl=settings.lease_ttl_s
        )
        lease = Lease(lease_kv, settings.instance_id, settings.lease_ttl_s)
        state["lease"] = lease
        await lease.acquire()
        # The inventory consumer of the planner active before this one (it would go on where
        # that one stopped): this one starts from the last inventory of every host.
        # Asked again while JetStream does not answer (a server restarting under this start).
        with contextlib.suppress(NotFoundError):
            await until_answered(
                f"deleting the consumer {INVENTORY_DURABLE}",
                lambda: broker.config.connection_state.stream.delete_consumer(
                    subjects.STREAM_NAME, INVENTORY_DURABLE
                ),
            )
        store = RolloutStore(
            await key_value(broker, ROLLOUTS_BUCKET, settings.stream_replicas),
            broker.config.connection_state.stream,
            ROLLOUTS_BUCKET,
        )
        rollout_engine = RolloutEngine(
            store,
            publisher.publish,
            telemetry.tracer("pausepatch.planner"),
            start_timeout_s=settings.start_timeout_s,
            host_grace_s=settings.host_grace_s,
            clock_timeout_s=settings.clock_timeout_s,
            inventory_stale_s=settings.inventory_stale_s,
            reboot_min_notice_s=settings.reboot_min_notice_s,
            max_defer_s=settings.max_defer_s,
            max_defers=settings.max_defers,
            retention_s=settings.rollout_retention_s,
            clock_lookup=lambda rollout_id, host, vms: clock_results_in_stream(
                broker.config.connection_state.stream, rollout_id, host, vms
            ),
            clock_lookup_after_s=settings.clock_lookup_after_s,
        )
        await rollout_engine.load()
        state["engine"] = rollout_engine

    @app.after_startup
    async def started() -> None:
        # Lease first (it must be renewed while we wait), then the fleet as it is now: rollouts
        # only move once the inventory has caught up, so that a host is never taken for gone
        # just because this planner has not heard of it yet.
        lease_task = asyncio.create_task(keep_lease(state["lease"]), name="lease")
        await inventory_caught_up()
        state["tasks"] = [asyncio.create_task(ticker(), name="ticker"), lease_task]

    async def inventory_caught_up(timeout: float = 15.0) -> None:
        js = broker.config.connection_state.stream
        try:
            info = await js.stream_info(
                subjects.STREAM_NAME, subjects_filter=subjects.host_inventory()
            )
            expected = len(info.state.subjects or {})
        except Exception:  # noqa: BLE001 - an older server without subject details: wait a beat
            expected = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(engine().inventory) < expected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("inventory of %d host(s) loaded", len(engine().inventory))

    @app.on_shutdown
    async def shutdown() -> None:
        for task in state.get("tasks", []):
            task.cancel()
        await publisher.stop()
        if "engine" in state:
            await state["lease"].release()
        telemetry.shutdown()

    return app


app = build_app(PlannerSettings())
