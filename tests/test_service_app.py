"""Every service's app (`shared.bus.ServiceApp`): it sleeps until told to stop instead of looking
ten times a second, and stops as FastStream's own app does (hooks, then the process ends)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio
import pytest
from faststream.nats import NatsBroker
from nats.js.errors import KeyNotFoundError

from services.planner.lease import LEASE_KEY
from shared.bus import ServiceApp
from shared.client import connect
from shared.devstack import LocalStack, NatsServer, wait_until


def counting_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every `anyio.sleep` from now on (FastStream's own app polls its exit with it)."""
    calls: list[float] = []
    real_sleep = anyio.sleep

    async def sleep(delay: float, *args: Any, **kwargs: Any) -> None:
        calls.append(delay)
        await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(anyio, "sleep", sleep)
    return calls


async def test_an_idle_app_does_not_wake_up_to_look_for_its_exit(
    monkeypatch: pytest.MonkeyPatch, nats_server: NatsServer
) -> None:
    sleeps = counting_sleeps(monkeypatch)
    app = ServiceApp(NatsBroker(nats_server.url))
    started = asyncio.Event()

    @app.after_startup
    async def up() -> None:
        started.set()

    run = asyncio.create_task(app.run())
    await asyncio.wait_for(started.wait(), 5)
    # FastStream's own `run` sleeps 0.1 s at a time: three or four looks in this time.
    await asyncio.sleep(0.35)
    assert sleeps == []
    app.exit()
    await asyncio.wait_for(run, 5)


async def test_exit_from_another_thread_runs_the_shutdown_hooks_and_ends_run(
    nats_server: NatsServer,
) -> None:
    app = ServiceApp(NatsBroker(nats_server.url))
    started = asyncio.Event()
    hooks: list[str] = []

    @app.after_startup
    async def up() -> None:
        started.set()

    @app.on_shutdown
    async def down() -> None:
        hooks.append("on_shutdown")

    run = asyncio.create_task(app.run())
    await asyncio.wait_for(started.wait(), 5)
    threading.Thread(target=app.exit).start()
    await asyncio.wait_for(run, 5)
    assert hooks == ["on_shutdown"]


async def test_an_exit_asked_before_run_stops_the_app_once_started(
    nats_server: NatsServer,
) -> None:
    app = ServiceApp(NatsBroker(nats_server.url))
    hooks: list[str] = []

    @app.on_shutdown
    async def down() -> None:
        hooks.append("on_shutdown")

    app.exit()
    await asyncio.wait_for(app.run(), 5)
    assert hooks == ["on_shutdown"]


async def test_an_exit_asked_while_starting_lets_the_start_finish_first(
    nats_server: NatsServer,
) -> None:
    """A SIGTERM just after a service started used to stop it halfway through its start (the
    connection drained under a subscriber being created: a traceback, exit code 1)."""
    app = ServiceApp(NatsBroker(nats_server.url))
    starting, go_on = asyncio.Event(), asyncio.Event()
    hooks: list[str] = []

    @app.on_startup
    async def up() -> None:
        starting.set()
        await go_on.wait()
        hooks.append("started")

    @app.after_startup
    async def after() -> None:
        hooks.append("after_startup")

    @app.on_shutdown
    async def down() -> None:
        hooks.append("on_shutdown")

    run = asyncio.create_task(app.run())
    await asyncio.wait_for(starting.wait(), 5)
    app.exit()
    go_on.set()
    await asyncio.wait_for(run, 5)
    assert hooks == ["started", "after_startup", "on_shutdown"]


async def test_a_service_process_stops_at_once_on_sigterm(stack: LocalStack) -> None:
    """A real planner process: active (it holds the lease), SIGTERM, gone at once with exit code
    0, and its shutdown hook ran (it gave the lease up)."""
    planner = stack.start_service("planner", "planner")
    await asyncio.to_thread(
        wait_until, lambda: "lease acquired" in planner.log_path.read_text(), 60, "the planner"
    )
    nc = await connect(stack.nats_url)
    try:
        lease = await nc.jetstream().key_value("pp_planner_lease")
        assert (await lease.get(LEASE_KEY)).value
        stopping = time.monotonic()
        code = await asyncio.to_thread(planner.stop, 10.0)
        took = time.monotonic() - stopping
        assert code == 0, planner.log_tail()
        assert took < 5, f"{took:.1f} s to stop"
        with pytest.raises(KeyNotFoundError):  # KeyDeletedError is one
            await lease.get(LEASE_KEY)
    finally:
        await nc.close()
