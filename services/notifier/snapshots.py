"""The documents' snapshot in a JetStream KV bucket, so a (re)starting notifier replays only the
stream's tail instead of its whole history (inventory heartbeats included).

Any replica may write it: the documents are a function of the stream up to `seq`, so two
replicas' snapshots at one `seq` are the same, and a write only ever moves `seq` forward
(compare-and-set on the key's revision).
"""

from __future__ import annotations

import json
import logging
import zlib
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


class SnapshotStore:
    """Read and write the snapshot in `kv` (a nats-py KeyValue)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def load(self) -> dict[str, Any] | None:
        """The newest snapshot, or None (none yet, or unreadable: the stream is replayed)."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            return None
        try:
            return decode(entry.value)
        except (ValueError, zlib.error) as exc:
            log.warning("ignoring an unreadable snapshot: %s", exc)
            return None

    async def save(self, snapshot: dict[str, Any]) -> bool:
        """Store `snapshot` unless the stored one is as new; True when written."""
        raw = encode(snapshot)
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None:
                await self.kv.create(KEY, raw)
            else:
                stored = decode(entry.value) if entry.value else {"seq": -1}
                if int(stored.get("seq", -1)) >= int(snapshot["seq"]):
                    return False
                await self.kv.update(KEY, raw, last=entry.revision)
        except KeyWrongLastSequenceError:
            return False  # another replica wrote meanwhile
        except Exception as exc:
            if "wrong last sequence" in str(exc).lower():
                return False
            raise
        return True
