"""The documents' snapshot in a JetStream KV bucket, so a (re)starting notifier replays only the
stream's tail instead of its whole history (inventory heartbeats included).

Any replica may write it: the documents are a function of the stream up to `seq`, so two
replicas' snapshots at one `seq` are the same, and a write only ever moves `seq` forward
(compare-and-set on the key's revision).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

log = logging.getLogger(__name__)

KEY = "documents"


def encode(snapshot: dict[str, Any]) -> bytes:
    """Compressed JSON."""
    return zlib.compress(json.dumps(snapshot, separators=(",", ":")).encode(), 6)


def decode(raw: bytes) -> dict[str, Any]:
    """The snapshot from its stored bytes."""
    data: dict[str, Any] = json.loads(zlib.decompress(raw))
    return data


@dataclass
class SnapshotCadence:
    """When the next snapshot is due. A snapshot costs its size: written at most once per as
    many events replayed as it holds records (at least `every`), its cost per event stays
    constant however large the fleet, and a restart replays at most that many events after it;
    or `interval_s` after the last one, if anything was replayed since. Counted in events
    replayed, not in stream sequence numbers: most of the stream is VM events, which the replay
    does not read (a thousand-host rollout is 68,000 events, 8,000 of them replayed)."""

    every: int
    interval_s: float
    seq: int = 0
    """The stream sequence of the last snapshot."""
    at: float = field(default_factory=time.monotonic)
    replayed: int = 0
    """Events replayed since the last snapshot."""

    def due(self, seq: int, size: int, now: float) -> bool:
        """A snapshot of `size` records at stream sequence `seq` is due at `now` (monotonic)."""
        return self.replayed >= max(self.every, size) or (
            seq > self.seq and now - self.at >= self.interval_s
        )

    def taken(self, seq: int, now: float) -> None:
        """A snapshot was taken at `seq`."""
        self.seq, self.at, self.replayed = seq, now, 0


class SnapshotStore:
    """Read and write the snapshot in `kv` (a nats-py KeyValue)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.revision: int | None = None
        """The key's revision after our own last write (or the load, which precedes every
        write): while it is still current, nobody wrote since and the next write, always
        newer, needs no read of the stored snapshot."""

    async def load(self) -> dict[str, Any] | None:
        """The newest snapshot, or None (none yet, or unreadable: the stream is replayed)."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            return None
        self.revision = entry.revision
        try:
            return decode(entry.value)
        except (ValueError, zlib.error) as exc:
            log.warning("ignoring an unreadable snapshot: %s", exc)
            return None

    async def save(self, snapshot: dict[str, Any]) -> bool:
        """Store `snapshot` unless the stored one is as new; True when written."""
        raw = await asyncio.to_thread(encode, snapshot)  # zlib lets the event loop go on
        if self.revision is not None:
            try:
                # Still the revision we know (ours, or what we loaded): nobody wrote since.
                self.revision = await self.kv.update(KEY, raw, last=self.revision)
                return True
            except Exception as exc:
                if not _wrong_last_sequence(exc):
                    raise
            # Another replica wrote meanwhile: compare with what it stored.
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None:
                self.revision = await self.kv.create(KEY, raw)
            else:
                stored = decode(entry.value) if entry.value else {"seq": -1}
                if int(stored.get("seq", -1)) >= int(snapshot["seq"]):
                    return False
                self.revision = await self.kv.update(KEY, raw, last=entry.revision)
        except Exception as exc:
            if _wrong_last_sequence(exc):
                return False  # another replica wrote meanwhile
            raise
        return True


def _wrong_last_sequence(exc: Exception) -> bool:
    """The compare-and-set failed: the key has another revision than the one given."""
    return isinstance(exc, KeyWrongLastSequenceError) or "wrong last sequence" in str(exc).lower()
