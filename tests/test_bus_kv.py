"""Reading a whole KV bucket (what a planner does when it starts or takes over), on a real
nats-server: every key with its latest value and revision, deleted keys left out, an empty bucket
empty, a bucket larger than the watcher's queue read whole, every time."""

from __future__ import annotations

import asyncio

from nats.js.api import KeyValueConfig

from shared.bus import read_bucket
from shared.client import connect
from shared.devstack import NatsServer


async def test_a_bucket_is_read_whole_with_latest_values_and_revisions(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket="pp_read_test", history=1))
        assert await read_bucket(kv) == {}

        revisions = {}
        for i in range(600):  # more than the watcher's queue (256)
            revisions[f"h.k{i:03d}"] = await kv.put(f"h.k{i:03d}", f"v{i}".encode())
        revisions["h.k007"] = await kv.put("h.k007", b"newer")
        await kv.delete("h.k011")
        await kv.put("h.gone", b"x")
        await kv.purge("h.gone")
        del revisions["h.k011"]

        for _ in range(20):  # the same answer every time
            read = await read_bucket(kv)
            assert set(read) == set(revisions)
            assert {k: e.revision for k, e in read.items()} == revisions
            assert read["h.k007"].value == b"newer" and read["h.k599"].value == b"v599"

        # Writes going on meanwhile: whatever was there before the read is in it.
        async def writer() -> None:
            for i in range(200):
                await kv.put(f"h.new{i:03d}", b"n")

        for _ in range(3):
            writing = asyncio.ensure_future(writer())
            read = await read_bucket(kv)
            await writing
            assert set(revisions) <= set(read)

        # Only deletions left: nothing to read, and it says so at once.
        only_deleted = await js.create_key_value(KeyValueConfig(bucket="pp_read_gone"))
        await only_deleted.put("a", b"1")
        await only_deleted.delete("a")
        assert await read_bucket(only_deleted, timeout=5) == {}
    finally:
        await nc.close()
