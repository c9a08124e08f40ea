"""Exactly one active planner: a lease in a KV bucket whose entries expire after the TTL.

The holder renews it (compare-and-set on its revision) every third of the TTL; a standby tries to
create it and succeeds only once the holder's entry has expired (or was deleted on shutdown).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js.errors import KeyWrongLastSequenceError

log = logging.getLogger(__name__)

LEASE_KEY = "leader"


class Lease:
    """The planner lease held by `holder` (a unique instance id)."""

    def __init__(self, kv: Any, holder: str, ttl_s: float) -> None:
        self.kv = kv
        self.holder = holder
        self.ttl_s = ttl_s
        self.revision: int | None = None

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        try:
            self.revision = await self.kv.create(LEASE_KEY, self.holder.encode())
        except Exception:  # noqa: BLE001 - KeyWrongLastSequenceError: somebody holds it
            # ...or an earlier attempt of ours landed and only its ack was lost.
            try:
                entry = await self.kv.get(LEASE_KEY)
            except Exception:  # noqa: BLE001 - expired meanwhile, or the server is away
                return False
            if entry.value != self.holder.encode():
                return False
            self.revision = entry.revision
        return True

    async def acquire(self) -> None:
        """Wait until this instance holds the lease."""
        announced = False
        while not await self.try_acquire():
            if not announced:
                current = await self.holder_now()
                log.info("standing by: the active planner is %s", current)
                announced = True
            await asyncio.sleep(self.ttl_s / 4)
        log.info("lease acquired: this planner (%s) is active", self.holder)

    async def holder_now(self) -> str | None:
        """Who holds the lease, if anybody."""
        try:
            entry = await self.kv.get(LEASE_KEY)
        except Exception:  # noqa: BLE001 - not found or deleted
            return None
        return entry.value.decode() if entry.value else None

    async def renew(self) -> None:
        """Extend the lease; raises `KeyWrongLastSequenceError` if someone else took it."""
        self.revision = await self.kv.update(LEASE_KEY, self.holder.encode(), last=self.revision)

    async def keep(self) -> None:
        """Renew forever; returns (after logging) only when the lease is lost."""
        failures = 0
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew()
                failures = 0
            except KeyWrongLastSequenceError:
                # A renewal whose ack was lost (a node failing over) did land: still ours.
                if await self.holder_now() == self.holder:
                    self.revision = (await self.kv.get(LEASE_KEY)).revision
                    failures = 0
                    continue
                log.error("planner lease lost: another planner holds it")
                return
            except Exception as exc:  # noqa: BLE001 - transient (server restarting): retry
                # while the lease may still be ours.
                failures += 1
                log.warning("could not renew the planner lease (%s)", exc)
                if failures * self.ttl_s / 3 >= self.ttl_s:
                    log.error("planner lease lost: not renewed within its TTL")
                    return

    async def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except Exception:  # noqa: BLE001 - already expired or taken
            pass
