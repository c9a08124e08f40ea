"""Bringing a test fleet up: the services as processes, and waiting until they are ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client

from shared import subjects
from shared.bus import NOT_READY_TIMEOUT_S
from shared.client import CommandError, EventWatcher, PlannerClient, connect
from shared.contracts import RolloutStatus
from shared.devstack import LocalStack, SimVM, free_port

VM_IP_BASE = "127.0.1."
"""Simulated VMs call the notifier from loopback addresses of their own (127.0.1.x)."""


def sim_vms(spec: Sequence[tuple[str, str | None, int | None]], first_ip: int = 1) -> list[SimVM]:
    """VMs from (name, availability set, update domain), each with its own loopback address."""
    return [
        SimVM(name, aset, ud, fault_domain=(ud or 0) % 3, ip=f"{VM_IP_BASE}{first_ip + i}")
        for i, (name, aset, ud) in enumerate(spec)
    ]


def start_core(
    stack: LocalStack, notifier: bool = True, clock_sync: bool = True, **env: str
) -> str:
    """planner, notifier and clock-sync as processes; returns the notifier's base URL."""
    stack.start_service("planner", "planner", (), **env)
    url = ""
    if notifier:
        port = free_port()
        stack.start_service("notifier", "notifier", ["--listen", f"127.0.0.1:{port}"], **env)
        url = f"http://127.0.0.1:{port}"
    if clock_sync:
        stack.start_service("clock-sync", "clock_sync", (), **env)
    return url


async def wait_stream(nc: Client, timeout: float = NOT_READY_TIMEOUT_S) -> None:
    """Wait until the planner declared the stream (as long as the planner itself tries)."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await js.stream_info(subjects.STREAM_NAME)
            return
        except Exception:  # noqa: BLE001 - not there yet
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the planner never declared the stream") from None
            await asyncio.sleep(0.1)


async def wait_hosts(
    client: PlannerClient, hosts: list[str], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Wait until the planner knows every host in `hosts`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            known = await client.hosts()
            if set(hosts) <= {h["host"] for h in known}:
                return known
        except CommandError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"the planner never saw hosts {hosts}")
        await asyncio.sleep(0.1)


async def ready(
    stack: LocalStack, client: PlannerClient, watcher: EventWatcher, hosts: list[str]
) -> None:
    """Stream declared, watcher running, every host known to the planner. On a timeout the
    error carries the planner's log tail (and says whether it is still running)."""
    try:
        await wait_stream(client.nc)
        await watcher.start()
        await wait_hosts(client, hosts)
    except TimeoutError as exc:
        planner = stack.services.get("planner")
        if planner is None:
            raise
        state = "running" if planner.running else f"exited {planner.proc and planner.proc.poll()}"
        raise TimeoutError(f"{exc}; planner {state}, its log ends:\n{planner.log_tail()}") from exc


async def wait_http(base_url: str, timeout: float = 60) -> None:
    """Until the notifier answers (it opens its API once the stream is replayed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(base_url=base_url) as http:
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"notifier at {base_url} never answered")
            await asyncio.sleep(0.1)


def status_reached(rollout_id: str, states: tuple[str, ...] = ("completed",)) -> Any:
    """A watcher predicate: the rollout's `RolloutStatus` events in one of `states`."""

    def check(w: EventWatcher) -> list[RolloutStatus]:
        return [e for e in w.events(RolloutStatus, rollout_id=rollout_id) if e.state in states]

    return check


def processes_with(token: str) -> list[int]:
    """Processes whose command line contains `token`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if token in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (on the loop) until `predicate()` holds; `TimeoutError` naming `what` if it never
    does within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def planner_on_small_messages(
    workdir: Path, max_payload: int = 65536
) -> AsyncIterator[tuple[LocalStack, Client]]:
    """A stack whose nats-server carries at most `max_payload` bytes per message, with the
    planner up and its stream declared: the stack and a connection to it, both stopped after."""
    stack = LocalStack(workdir)
    stack.start_nats(config=f"max_payload: {max_payload}\n")
    nc = None
    try:
        start_core(stack, notifier=False, clock_sync=False)
        nc = await connect(stack.nats_url)
        await wait_stream(nc)
        yield stack, nc
    finally:
        if nc is not None:
            await nc.close()
        stack.stop()
