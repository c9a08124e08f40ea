"""The documents' snapshot in a JetStream KV bucket, so a (re)starting notifier replays only the
stream's tail instead of its whole history (inventory heartbeats included).

Any replica may write it: the documents are a function of the stream up to `seq`, so two
replicas' snapshots at one `seq` are the same, and a write only ever moves `seq` forward
(compare-and-set on the key's revision).

A snapshot that fits in one message is the value of `documents` itself. A larger one (past about
1,200 hosts of 20 VMs with a `max_payload` of 1 MB) is cut into parts of at most `part_size`
bytes under keys of their own, `documents.parts.<token>.<i>`, and `documents` then holds a small
manifest (its `parts` field, a count, tells it from a snapshot) with the parts' total length and
SHA-256, written with the same compare-and-set once every part is stored. Whoever replaces a
manifest purges its parts; a refused writer purges its own.

Part keys are reused so that the purge markers stay bounded. Each store writes its parts under a
token of its own, drawn when it starts, in two alternating generations (`<token>-0` and
`<token>-1`): no other store writes under its token, and it never writes into the generation
named by the manifest it last wrote, so the parts of two snapshots are never mixed (a reader
also checks the length and SHA-256). A purge rolls a key's history up into one marker, which
stays until the key is written again (the bucket, `shared.bus.key_value`, keeps one message per
key, `history=1`, and has no `ttl`), so the markers are at most two generations' parts per token
ever used: one token per start, and one more after each write whose outcome is unknown. They
grow with restarts, not with writes. A token per write would leave as many markers as parts at
every write, for good: nats-server 2.9 has no per-message TTL, and the notifier may not purge
the bucket's stream. The bucket has no `max_bytes` either; one would need room for the stored
snapshot and for one being written by each replica.

A writer stopped between its parts and its manifest (a replica killed) leaves parts that no
manifest names and that no one else would purge: each store sweeps them, after a write and at
most once per `ORPHAN_AGE_S`, once they have been left unwritten that long (a write takes
seconds; a snapshot being written by a live replica is never that old).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import DEFAULT_MAX_PAYLOAD_SIZE
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from shared.bus import read_bucket

log = logging.getLogger(__name__)

KEY = "documents"
PARTS = f"{KEY}.parts"
"""The part keys' prefix: `documents.parts.<token>.<i>`."""
PART_MARGIN = 64 * 1024
"""What the default part size leaves of the server's `max_payload` for the subject and headers."""
LOAD_ATTEMPTS = 3
"""Reads of the manifest before parts that are missing or do not match make the snapshot
unreadable: another replica may replace the manifest and purge its parts under a reader."""
TOKEN = re.compile(r"[A-Za-z0-9_-]+")
ORPHAN_AGE_S = 600.0
"""Parts no manifest names, unwritten for this long, are a stopped writer's: purged."""


def encode(snapshot: dict[str, Any]) -> bytes:
    """Compressed JSON."""
    return zlib.compress(json.dumps(snapshot, separators=(",", ":")).encode(), 6)


def decode(raw: bytes) -> dict[str, Any]:
    """The snapshot from its stored bytes."""
    data: dict[str, Any] = json.loads(zlib.decompress(raw))
    return data


@dataclass(frozen=True)
class Manifest:
    """What `documents` holds instead of a snapshot too large for one message: the snapshot's
    `seq`, and the key token, count, total length and SHA-256 of its parts (a count, never a
    list, so that the manifest stays small however large the snapshot)."""

    seq: int
    token: str
    parts: int
    size: int
    sha256: str

    @classmethod
    def of(cls, data: dict[str, Any]) -> Manifest | None:
        """The manifest stored as `data`; None when `data` is a snapshot. Raises KeyError,
        TypeError or ValueError when it is a malformed manifest."""
        if "parts" not in data:
            return None
        manifest = cls(
            int(data["seq"]),
            str(data["token"]),
            int(data["parts"]),
            int(data["size"]),
            str(data["sha256"]),
        )
        if not TOKEN.fullmatch(manifest.token) or manifest.parts < 1:
            raise ValueError(f"a malformed manifest: {data}")
        return manifest

    def part_keys(self) -> list[str]:
        """The keys of the parts, in order."""
        return [f"{PARTS}.{self.token}.{i}" for i in range(self.parts)]


class UnreadableParts(Exception):
    """A part is missing, or the parts do not make the snapshot the manifest describes."""


def default_part_size(connection: Any) -> int:
    """The largest message the server announced to `connection` (a nats-py client; or a
    KeyValue, whose JetStream context holds its client), less `PART_MARGIN`."""
    nc = getattr(getattr(connection, "_js", None), "_nc", connection)
    max_payload = int(
        getattr(nc, "max_payload", DEFAULT_MAX_PAYLOAD_SIZE) or DEFAULT_MAX_PAYLOAD_SIZE
    )
    return max_payload - min(PART_MARGIN, max_payload // 2)


def _encoded(snapshot: dict[str, Any], part_size: int) -> tuple[bytes, str | None]:
    """The snapshot's stored bytes, and their SHA-256 when they need more than one part."""
    raw = encode(snapshot)
    return raw, hashlib.sha256(raw).hexdigest() if len(raw) > part_size else None


def _joined(chunks: list[bytes], manifest: Manifest) -> dict[str, Any]:
    """The snapshot from its parts, checked against its manifest."""
    raw = b"".join(chunks)
    if len(raw) != manifest.size or hashlib.sha256(raw).hexdigest() != manifest.sha256:
        raise UnreadableParts(
            f"its {manifest.parts} parts ({manifest.token}) make {len(raw)} bytes that do not "
            f"match the manifest's {manifest.size} and SHA-256"
        )
    return decode(raw)


def _stored(value: bytes | None) -> tuple[int, Manifest | None]:
    """The `seq` of a stored value and the manifest it is, if one; -1 when it is unreadable,
    so that any snapshot replaces it."""
    try:
        data = decode(value or b"")
        return int(data.get("seq", -1)), Manifest.of(data)
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        log.warning("replacing an unreadable snapshot: %s", exc)
        return -1, None


def _new_token() -> str:
    return uuid.uuid4().hex[:12]


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
    """Read and write the snapshot in `kv` (a nats-py KeyValue), in parts of at most
    `part_size` bytes when it needs more than one (by default, what one message carries).
    One save at a time per store: its parts' generations assume it."""

    def __init__(
        self, kv: Any, part_size: int | None = None, orphan_age_s: float = ORPHAN_AGE_S
    ) -> None:
        self.kv = kv
        self.part_size = part_size
        self.orphan_age_s = orphan_age_s
        self.swept_at: float | None = None
        """When this store last swept stopped writers' parts (`sweep`; monotonic)."""
        self.revision: int | None = None
        """The key's revision after our own last write (or the load, which precedes every
        write): while it is still current, nobody wrote since and the next write, always
        newer, needs no read of the stored snapshot."""
        self.manifest: Manifest | None = None
        """The manifest stored at `revision` (None: a snapshot), whose parts a write replacing
        it purges."""
        self.token = _new_token()
        """This store's part keys' token (see the module's docstring)."""
        self.unsure: list[Manifest] = []
        """This store's manifests whose parts may be named by none, after a write whose outcome
        is unknown: purged after its next write, when the stored manifest is its newest."""

    async def load(self) -> dict[str, Any] | None:
        """The newest snapshot, or None (none yet, or unreadable: the stream is replayed)."""
        problem: Exception | None = None
        for _ in range(LOAD_ATTEMPTS):
            try:
                entry = await self.kv.get(KEY)
            except KeyNotFoundError:
                return None
            if entry.revision == self.revision and problem is not None:
                break  # the same manifest as before: its parts are missing or wrong for good
            self.revision, self.manifest = entry.revision, None
            try:
                data = await asyncio.to_thread(decode, entry.value or b"")
                self.manifest = Manifest.of(data)
                if self.manifest is None:
                    return data
                return await self._read_parts(self.manifest)
            except UnreadableParts as exc:
                problem = exc  # maybe replaced meanwhile, and the parts purged: read it again
            except (KeyError, TypeError, ValueError, zlib.error) as exc:
                problem = exc
                break
        log.warning("ignoring an unreadable snapshot: %s", problem)
        return None

    async def _read_parts(self, manifest: Manifest) -> dict[str, Any]:
        """The snapshot from the parts `manifest` names."""
        chunks: list[bytes] = []
        for key in manifest.part_keys():
            try:
                chunks.append((await self.kv.get(key)).value or b"")
            except KeyNotFoundError:
                raise UnreadableParts(f"its part {key} is missing") from None
        return await asyncio.to_thread(_joined, chunks, manifest)

    async def save(self, snapshot: dict[str, Any]) -> bool:
        """Store `snapshot` unless the stored one is as new; True when written. After a write,
        the parts of stopped writers are swept when due (`sweep`)."""
        written = await self._save(snapshot)
        if written:
            await self._sweep_when_due()
        return written

    async def _save(self, snapshot: dict[str, Any]) -> bool:
        part_size = self.part_size or default_part_size(self.kv)
        # zlib and SHA-256 let the event loop go on.
        raw, sha256 = await asyncio.to_thread(_encoded, snapshot, part_size)
        seq = int(snapshot["seq"])
        if sha256 is None:
            return await self._replace(raw, seq, None)
        # The generation that the manifest this store last wrote does not name.
        token = f"{self.token}-0"
        if self.manifest is not None and self.manifest.token == token:
            token = f"{self.token}-1"
        manifest = Manifest(seq, token, -(-len(raw) // part_size), len(raw), sha256)
        if await self._stored_is_as_new(seq):
            return False  # refused before its parts are written, not after
        for i, key in enumerate(manifest.part_keys()):
            await self.kv.put(key, raw[i * part_size : (i + 1) * part_size])
        if await self._replace(encode(asdict(manifest)), seq, manifest):
            return True
        await self._purge(manifest)
        return False

    async def _sweep_when_due(self) -> None:
        now = time.monotonic()
        if self.swept_at is not None and now - self.swept_at < self.orphan_age_s:
            return
        self.swept_at = now
        try:
            await self.sweep()
        except Exception as exc:  # noqa: BLE001 - best effort, never out of save
            log.warning("could not sweep the snapshot parts of stopped writers: %s", exc)

    async def sweep(self) -> list[str]:
        """Purge the parts of writers that stopped between their parts and their manifest: parts
        under a token that neither the stored manifest nor this store's own writes name, none of
        them written in the last `orphan_age_s`. The keys purged."""
        entries = await read_bucket(self.kv)
        keep = {self.manifest.token} if self.manifest is not None else set()
        stored = entries.get(KEY)
        if stored is not None:
            _, manifest = await asyncio.to_thread(_stored, stored.value)
            if manifest is not None:
                keep.add(manifest.token)
        horizon = datetime.now(UTC) - timedelta(seconds=self.orphan_age_s)
        tokens: dict[str, list[str]] = {}
        recent: set[str] = set()
        for key, entry in entries.items():
            if not key.startswith(f"{PARTS}."):
                continue
            token = key[len(PARTS) + 1 :].rpartition(".")[0]
            if token in keep or token.startswith(self.token):
                continue
            tokens.setdefault(token, []).append(key)
            if entry.created is None or entry.created > horizon:
                recent.add(token)
        purged = []
        for token, keys in sorted(tokens.items()):
            if token in recent:
                continue  # being written, maybe
            for key in sorted(keys):
                await self.kv.purge(key)
                purged.append(key)
        if purged:
            log.info(
                "purged %d snapshot part(s) that no manifest names, under %d token(s) of "
                "stopped writers",
                len(purged),
                len(tokens) - len(recent),
            )
        return purged

    async def _stored_is_as_new(self, seq: int) -> bool:
        """Whether another replica stored a snapshot at `seq` or later since this store's last
        write or load (one read, of a manifest when the stored snapshot is in parts): a replica
        that is behind would otherwise write every part only to see its compare-and-set
        refused. An older one is taken as the revision to replace (what the compare-and-set
        would read again after failing on the revision this store knew)."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            return False
        if entry.revision == self.revision:
            return False
        stored_seq, stored = await asyncio.to_thread(_stored, entry.value)  # unreadable: -1
        if stored_seq >= seq:
            return True
        # Its parts are purged once this write replaces it; this store's own were, by whoever
        # replaced them.
        self.revision, self.manifest = entry.revision, stored
        return False

    async def _replace(self, value: bytes, seq: int, manifest: Manifest | None) -> bool:
        """Compare-and-set `value` (the snapshot at `seq`, or `manifest`) unless the stored one
        is as new, then purge the parts of the manifest it replaced; True when written."""
        try:
            written = await self._compare_and_set(value, seq)
        except Exception as exc:
            if _wrong_last_sequence(exc):
                return False  # another replica wrote meanwhile
            # Whether `value` was stored is unknown: the parts of `manifest`, or those of the
            # manifest it would replace, may be named by none; this store's are purged after its
            # next write. A new token, so that it never writes into parts the stored one names.
            self.unsure += [
                m for m in (manifest, self.manifest) if m and m.token.startswith(self.token)
            ]
            if manifest is not None:
                self.token = _new_token()
            raise
        if written is None:
            return False
        self.revision, replaced = written
        self.manifest = manifest
        # None of these is the manifest stored now (that one is ours, under a token of ours).
        stale = {m.token: m for m in (replaced, *self.unsure) if m is not None}
        stale.pop(manifest.token if manifest is not None else "", None)
        self.unsure = []
        for old in stale.values():
            await self._purge(old)
        return True

    async def _compare_and_set(self, value: bytes, seq: int) -> tuple[int, Manifest | None] | None:
        """Store `value` unless the stored snapshot's `seq` is as new: the new revision and the
        manifest replaced, if one; None when the stored one is as new."""
        if self.revision is not None:
            try:
                # Still the revision we know (ours, or what we loaded): nobody wrote since.
                return await self.kv.update(KEY, value, last=self.revision), self.manifest
            except Exception as exc:
                if not _wrong_last_sequence(exc):
                    raise
            # Another replica wrote meanwhile: compare with what it stored.
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            return await self.kv.create(KEY, value), None
        stored_seq, stored = await asyncio.to_thread(_stored, entry.value)
        if stored_seq >= seq:
            return None
        return await self.kv.update(KEY, value, last=entry.revision), stored

    async def _purge(self, manifest: Manifest) -> None:
        """Purge the parts of `manifest`, best effort: one left behind costs room in the bucket,
        not correctness (no manifest names it any more)."""
        for key in manifest.part_keys():
            try:
                await self.kv.purge(key)
            except Exception as exc:  # noqa: BLE001 - best effort, never out of save
                log.warning("could not purge the snapshot part %s: %s", key, exc)
                return


def _wrong_last_sequence(exc: Exception) -> bool:
    """The compare-and-set failed: the key has another revision than the one given."""
    return isinstance(exc, KeyWrongLastSequenceError) or "wrong last sequence" in str(exc).lower()
