"""The documents' snapshot in a real JetStream KV bucket: replicas may all write it, and it only
ever moves forward."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import pytest
from nats.js.api import KeyValueConfig

from services.notifier.document import ScheduledEventsDocument
from services.notifier.snapshots import (
    KEY,
    PART_MARGIN,
    PARTS,
    Manifest,
    SnapshotCadence,
    SnapshotStore,
    decode,
    default_part_size,
    encode,
)
from shared.bus import read_bucket
from shared.client import connect
from shared.devstack import NatsServer
from tests.test_notifier_document import inventory, planned


async def test_a_snapshot_only_moves_forward_and_restores_the_documents(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="pp_notifier_test"))
    replica_a, replica_b = SnapshotStore(kv), SnapshotStore(kv)
    assert await replica_a.load() is None

    document = ScheduledEventsDocument()
    for seq, event in enumerate((inventory("h1"), planned("h1", uuid.uuid4())), start=1):
        document.apply(event)
        document.seq = seq
    newer = document.to_json()
    older = {**newer, "seq": 1}

    assert await replica_a.save(newer)
    assert not await replica_b.save(older)  # a replica behind never overwrites
    assert not await replica_b.save(newer)  # nor one at the same point
    loaded = await replica_b.load()
    assert loaded == newer

    # Writes after one's own go straight on; a write by the other replica in between is seen.
    assert await replica_a.save({**newer, "seq": 5})
    assert await replica_a.save({**newer, "seq": 6})
    assert await replica_b.save({**newer, "seq": 7})
    assert not await replica_a.save({**newer, "seq": 7})
    assert await replica_a.save({**newer, "seq": 8})
    assert (await SnapshotStore(kv).load() or {})["seq"] == 8

    restored = ScheduledEventsDocument()
    restored.load(loaded)
    web1 = restored.caller("10.0.0.1")
    assert restored.render(web1, "2020-07-01") == document.render(
        document.caller("10.0.0.1"), "2020-07-01"
    )
    await nc.close()


def test_a_snapshot_is_due_after_as_many_events_replayed_as_it_holds_not_stream_sequences() -> None:
    """The replay reads the events of hosts and rollouts only: a rollout's thousands of VM events
    move the stream's sequence, not the snapshot's cost per event replayed."""
    cadence = SnapshotCadence(every=100, interval_s=30.0, at=0.0)
    # 60,000 stream sequence numbers later, 99 events replayed: not due (a snapshot of 250
    # records waits for 250 of them), however far the sequence moved.
    cadence.replayed = 99
    assert not cadence.due(seq=60_000, size=50, now=1.0)
    cadence.replayed = 100
    assert cadence.due(seq=60_000, size=50, now=1.0)
    assert not cadence.due(seq=60_000, size=250, now=1.0)
    cadence.replayed = 250
    assert cadence.due(seq=60_000, size=250, now=1.0)

    cadence.taken(seq=60_000, now=1.0)
    assert cadence.replayed == 0 and not cadence.due(seq=60_000, size=50, now=40.0)
    # Or `interval_s` after the last one, once anything was replayed since.
    assert not cadence.due(seq=60_001, size=50, now=30.0)
    assert cadence.due(seq=60_001, size=50, now=31.0)


def noisy(seq: int, size: int) -> dict[str, Any]:
    """A snapshot at `seq` whose `size` random bytes (base64 in the JSON) do not compress."""
    return {"format": 1, "seq": seq, "noise": base64.b64encode(os.urandom(size)).decode()}


async def part_keys(kv: Any) -> set[str]:
    """The part keys holding a value (purged ones left out)."""
    return {key for key in await read_bucket(kv) if key.startswith(PARTS)}


async def stored_manifest(kv: Any) -> Manifest:
    manifest = Manifest.of(decode((await kv.get(KEY)).value))
    assert manifest is not None
    return manifest


async def bucket(nats_server: NatsServer, name: str) -> tuple[Any, Any]:
    nc = await connect(nats_server.url)
    return nc, await nc.jetstream().create_key_value(KeyValueConfig(bucket=name, history=1))


async def test_a_snapshot_larger_than_a_part_is_stored_in_parts_and_replaced_whole(
    nats_server: NatsServer,
) -> None:
    nc, kv = await bucket(nats_server, "pp_notifier_parts")
    replica_a, replica_b = SnapshotStore(kv, part_size=4096), SnapshotStore(kv, part_size=4096)
    first = noisy(1, 18_000)
    assert await replica_a.save(first)
    manifest = await stored_manifest(kv)
    assert manifest.seq == 1 and manifest.size == len(encode(first)) > 4 * 4096
    assert manifest.parts == 5 and len((await kv.get(KEY)).value) < 200  # counted, not listed
    assert await part_keys(kv) == set(manifest.part_keys())
    assert await SnapshotStore(kv, part_size=4096).load() == first

    # A newer one from the other replica replaces it, and the first one's parts are purged.
    second = noisy(2, 9_000)
    assert await replica_b.save(second)
    assert await replica_b.load() == second
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    assert not set(manifest.part_keys()) & await part_keys(kv)

    # An older one is refused and leaves no part behind; so is one at the same `seq`. Both are
    # refused before their parts are written: the bucket's stream takes no message at all.
    js = nc.jetstream()
    last = (await js.stream_info("KV_pp_notifier_parts")).state.last_seq
    assert not await replica_a.save(noisy(1, 12_000))
    assert not await replica_a.save(noisy(2, 12_000))
    assert (await js.stream_info("KV_pp_notifier_parts")).state.last_seq == last
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    assert await SnapshotStore(kv).load() == second

    # A snapshot that fits replaces the parts with itself, as stored before there were parts.
    small = {"format": 1, "seq": 3}
    assert await replica_a.save(small)
    assert decode((await kv.get(KEY)).value) == small
    assert await part_keys(kv) == set()
    assert await SnapshotStore(kv).load() == small
    await nc.close()


async def test_replicas_writing_in_turn_and_at_once_keep_one_snapshot_and_bounded_markers(
    nats_server: NatsServer,
) -> None:
    """Part keys are reused: a store alternates between two generations of its own, so the
    purge markers left behind stay at most two generations' parts per store, however many
    writes."""
    nc, kv = await bucket(nats_server, "pp_notifier_turns")
    replicas = [SnapshotStore(kv, part_size=4096), SnapshotStore(kv, part_size=4096)]
    for seq in range(1, 13):
        assert await replicas[seq % 3 % 2].save(noisy(seq, 9_000))  # b, a, a, b, a, a, ...
        assert (await stored_manifest(kv)).seq == seq
        assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    messages = (await kv.status()).values
    assert messages <= 1 + 2 * 2 * 3, messages  # `documents`, and 2 stores x 2 generations x 3

    # At once: the newer one is stored unless the older one's write came in between the newer
    # one's read and write (a compare-and-set that failed is not retried); parts of the stored
    # one only, either way.
    written = await asyncio.gather(
        replicas[0].save(noisy(20, 9_000)), replicas[1].save(noisy(21, 9_000))
    )
    assert any(written)
    assert (await SnapshotStore(kv).load() or {})["seq"] == (21 if written[1] else 20)
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    await nc.close()


async def test_a_missing_or_corrupt_part_makes_the_snapshot_unreadable_not_an_error(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc, kv = await bucket(nats_server, "pp_notifier_broken")
    writer = SnapshotStore(kv, part_size=4096)
    assert await writer.save(noisy(1, 9_000))
    keys = (await stored_manifest(kv)).part_keys()

    await kv.put(keys[1], os.urandom(4096))  # same length, other bytes
    assert await SnapshotStore(kv).load() is None
    assert "ignoring an unreadable snapshot" in caplog.text

    await kv.purge(keys[2])
    reader = SnapshotStore(kv, part_size=4096)
    assert await reader.load() is None
    # The replica that found it unreadable replaces it, and purges what was left of it.
    assert await reader.save(noisy(2, 9_000))
    assert (await reader.load() or {})["seq"] == 2
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    await nc.close()


class PartsReplacedUnderTheReader:
    """The bucket, where `replace` runs once just before the first part is read."""

    def __init__(self, kv: Any, replace: Callable[[], Awaitable[object]]) -> None:
        self.kv = kv
        self.replace: Callable[[], Awaitable[object]] | None = replace

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    async def get(self, key: str) -> Any:
        if key.startswith(PARTS) and self.replace is not None:
            replace, self.replace = self.replace, None
            await replace()
        return await self.kv.get(key)


async def test_a_reader_whose_parts_are_purged_meanwhile_reads_the_new_manifest(
    nats_server: NatsServer,
) -> None:
    nc, kv = await bucket(nats_server, "pp_notifier_race")
    replica_a = SnapshotStore(kv, part_size=4096)
    assert await replica_a.save(noisy(1, 9_000))
    newer = noisy(2, 9_000)
    reader = SnapshotStore(PartsReplacedUnderTheReader(kv, lambda: replica_a.save(newer)))
    assert await reader.load() == newer
    await nc.close()


async def test_a_snapshot_larger_than_one_message_saves_and_loads_with_the_default_parts(
    nats_server: NatsServer,
) -> None:
    """The test server's `max_payload` is nats-server's default, 1 MB."""
    nc, kv = await bucket(nats_server, "pp_notifier_large")
    snapshot = noisy(1, 1_500_000)
    assert len(encode(snapshot)) > nc.max_payload
    # What the service passes (from its connection) is what a store finds by itself.
    assert default_part_size(nc) == default_part_size(kv) == nc.max_payload - PART_MARGIN
    assert await SnapshotStore(kv, part_size=default_part_size(nc)).save(snapshot)
    manifest = await stored_manifest(kv)
    assert manifest.parts == 2 and await part_keys(kv) == set(manifest.part_keys())
    assert await SnapshotStore(kv).load() == snapshot
    await nc.close()


class ManifestWriteLost:
    """The bucket, where the next write of `documents` raises a timeout, once stored or not;
    `before_write` then runs before each write of `documents`."""

    def __init__(self, kv: Any, stored: bool) -> None:
        self.kv = kv
        self.stored: bool | None = stored
        self.before_write: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if key == KEY and self.stored is not None:
            stored, self.stored = self.stored, None
            if stored:
                await self.kv.update(key, value, last=last)
            raise nats.errors.TimeoutError
        if key == KEY and self.before_write is not None:
            await self.before_write()
        return int(await self.kv.update(key, value, last=last))


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lost"])
async def test_a_manifest_write_of_unknown_outcome_leaves_no_parts_after_the_next_write(
    nats_server: NatsServer, stored: bool
) -> None:
    """The store cannot tell which of its parts the stored manifest names: it writes the next
    ones under a new token (the stored snapshot stays readable meanwhile), then purges the
    parts of its own that no manifest names."""
    nc, kv = await bucket(nats_server, "pp_notifier_unsure")
    bucket_with_a_lost_write = ManifestWriteLost(kv, stored)
    store = SnapshotStore(bucket_with_a_lost_write, part_size=4096)
    assert await store.save(noisy(1, 9_000))
    with pytest.raises(nats.errors.TimeoutError):
        await store.save(noisy(2, 9_000))
    assert (await stored_manifest(kv)).seq == (2 if stored else 1)

    async def the_stored_one_is_readable() -> None:
        assert (await SnapshotStore(kv).load() or {})["seq"] == (2 if stored else 1)

    bucket_with_a_lost_write.before_write = the_stored_one_is_readable
    assert await store.save(noisy(3, 9_000))
    assert (await SnapshotStore(kv).load() or {})["seq"] == 3
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    await nc.close()


async def test_a_stopped_writers_parts_are_purged_once_left_long_enough(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Parts written by a replica killed before its manifest are named by no manifest, and
    nobody's to purge: a store sweeps them after a write, once unwritten for `orphan_age_s`;
    parts written more recently (maybe a live replica's write under way) are left."""
    caplog.set_level(logging.INFO, logger="services.notifier.snapshots")
    nc, kv = await bucket(nats_server, "pp_notifier_orphans")
    first = SnapshotStore(kv, part_size=4096)
    assert await first.save(noisy(1, 9_000))
    stopped = {f"{PARTS}.stoppedwriter-0.{i}" for i in range(3)}
    for key in sorted(stopped):
        await kv.put(key, os.urandom(4096))
    await asyncio.sleep(1.2)  # the stopped writer's parts age past the sweeper's 1 s
    writing = f"{PARTS}.livewriter-1.0"
    await kv.put(writing, os.urandom(4096))

    sweeper = SnapshotStore(kv, part_size=4096, orphan_age_s=1.0)
    assert await sweeper.save(noisy(2, 9_000))
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys()) | {writing}
    assert "purged 3 snapshot part(s) that no manifest names, under 1 token(s)" in caplog.text
    assert (await SnapshotStore(kv).load() or {})["seq"] == 2

    # Left unwritten as long, the other writer's part goes too; the stored snapshot's stay.
    await asyncio.sleep(1.2)
    assert await sweeper.sweep() == [writing]
    assert await part_keys(kv) == set((await stored_manifest(kv)).part_keys())
    assert (await SnapshotStore(kv).load() or {})["seq"] == 2
    await nc.close()
