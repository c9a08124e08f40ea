"""The documents' snapshot in a real JetStream KV bucket: replicas may all write it, and it only
ever moves forward."""

from __future__ import annotations

import uuid

from nats.js.api import KeyValueConfig

from services.notifier.document import ScheduledEventsDocument
from services.notifier.snapshots import SnapshotCadence, SnapshotStore
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
