"""One request per host instead of one per VM: the VMs of a host resume together, so their
clock syncs are gathered for a few milliseconds and sent to the host's agent at once (it sets
them in parallel)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.contracts import ClockReading

Request = Callable[[str, list[str]], Awaitable[list[ClockReading]]]


class HostBatcher:
    """Gathers clock syncs per host for `gather_s` (or up to `max_batch` VMs)."""

    def __init__(self, request: Request, gather_s: float = 0.005, max_batch: int = 64) -> None:
        self.request = request
        self.gather_s = gather_s
        self.max_batch = max_batch
        self._pending: dict[str, list[tuple[str, asyncio.Future[ClockReading]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def reading(self, host: str, vm: str) -> ClockReading:
        """Sync `vm`'s clock along with whatever else of `host` is asked meanwhile. Raises what
        the request raised (the agent did not answer)."""
        return await self.asked(host, [vm])[0]

    def asked(self, host: str, vms: list[str]) -> list[asyncio.Future[ClockReading]]:
        """Sync the clocks of `vms` (of `host`) along with whatever else of it is asked
        meanwhile: each VM's reading to come, or what the request raised."""
        loop = asyncio.get_running_loop()
        batch = self._pending.setdefault(host, [])
        futures = []
        for vm in vms:
            future: asyncio.Future[ClockReading] = loop.create_future()
            futures.append(future)
            batch.append((vm, future))
            if len(batch) == 1:
                loop.call_later(self.gather_s, self._flush, host)
            elif len(batch) >= self.max_batch:
                self._flush(host)
                batch = self._pending.setdefault(host, [])
        return futures

    def _flush(self, host: str) -> None:
        batch = self._pending.pop(host, None)
        if batch:
            task = asyncio.create_task(self._send(host, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, host: str, batch: list[tuple[str, asyncio.Future[ClockReading]]]) -> None:
        try:
            readings = await self.request(host, [vm for vm, _ in batch])
            if len(readings) != len(batch):
                raise ValueError(f"{len(readings)} readings for {len(batch)} VMs")
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reading in zip(batch, readings, strict=True):
            if not future.done():
                future.set_result(reading)
