"""Exactly one active planner: a lease in a KV bucket whose entries expire after the TTL.

The holder renews it (compare-and-set on its revision) every third of the TTL; a standby tries to
create it and succeeds only once the holder's entry has expired (or was deleted on shutdown).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

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
        """Renew forever; returns (after logging) only when another planner holds the lease.

        While the servers cannot answer (a node failing over) the renewal is retried; whether
        the lease is still ours is then settled by what the bucket holds, not by the errors.
        The rollout records' compare-and-set writes fence a planner that is wrong about it.
        """
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew()
                continue
            except KeyWrongLastSequenceError:
                pass
            except Exception as exc:  # noqa: BLE001 - transient: retried below
                log.warning("could not renew the planner lease (%s)", exc)
            verdict = await self._reconcile()
            if verdict == "theirs":
                log.error("planner lease lost: another planner holds it")
                return

    async def _reconcile(self) -> str:
        """ "ours", "theirs" or "unknown" (the bucket cannot be read now)."""
        try:
            entry = await self.kv.get(LEASE_KEY)
        except (KeyNotFoundError, KeyDeletedError):
            # Expired while we could not renew: ours again unless a standby was quicker.
            return "ours" if await self.try_acquire() else "theirs"
        except Exception:  # noqa: BLE001 - still unreachable
            return "unknown"
        if entry.value == self.holder.encode():
            self.revision = entry.revision  # a renewal whose ack was lost did land
            return "ours"
        return "theirs"

    async def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except Exception:  # noqa: BLE001 - already expired or taken
            pass
