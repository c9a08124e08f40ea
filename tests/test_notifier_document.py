"""The Scheduled Events documents as plain Python: what each VM sees, and when the incarnation
moves. Bus events are built here exactly as the planner, host-agents and clock-sync publish them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier.document import (
    API_VERSIONS,
    Caller,
    DeferPolicy,
    ScheduledEventsDocument,
)
from shared.contracts import (
    Event,
    HostClockSynced,
    HostInventory,
    MaintenanceApproved,
    MaintenanceCancelled,
    MaintenanceCompleted,
    MaintenanceDeferred,
    MaintenancePlanned,
    MaintenanceStarted,
    PatchSpec,
    RolloutStatus,
    VMClock,
    VMInfo,
    VMWindowOutcome,
)

T0 = datetime(2026, 4, 11, 22, 0, 0, tzinfo=UTC)
ROLLOUT = "r1"

# host -> [(vm, availability set, ip)]
FLEET = {
    "h1": [("web-1", "web", "10.0.0.1"), ("db-1", "db", "10.0.0.2"), ("solo", None, "10.0.0.3")],
    "h2": [("web-2", "web", "10.0.0.4"), ("db-2", "db", "10.0.0.5"), ("other", None, "10.0.0.6")],
}


def inventory(host: str, at: datetime = T0) -> HostInventory:
    return HostInventory(
        host=host,
        occurred_at=at,
        vms=[
            VMInfo(vm=vm, uuid=vm, availability_set=aset, update_domain=0, ip=ip, state="running")
            for vm, aset, ip in FLEET[host]
        ],
    )


def planned(
    host: str, event_id: uuid.UUID, not_before: datetime = T0 + timedelta(minutes=15), **kw: Any
) -> MaintenancePlanned:
    fields: dict[str, Any] = {
        "host": host,
        "rollout_id": ROLLOUT,
        "update_id": "u1",
        "scheduled_event_id": event_id,
        "wave": 0,
        "event_type": "Freeze",
        "not_before": not_before,
        "expected_pause_s": 4.2,
        "pause_budget_s": 10,
        "vms": [vm for vm, _, _ in FLEET[host]],
        "occurred_at": T0,
    }
    fields.update(kw)
    return MaintenancePlanned(**fields)


def started(host: str, event_id: uuid.UUID) -> MaintenanceStarted:
    return MaintenanceStarted(
        host=host,
        rollout_id=ROLLOUT,
        scheduled_event_id=event_id,
        patch=PatchSpec(duration_s=1),
        pause_budget_s=10,
        occurred_at=T0 + timedelta(minutes=1),
    )


def completed(host: str, event_id: uuid.UUID, at: datetime | None = None) -> MaintenanceCompleted:
    return MaintenanceCompleted(
        host=host,
        rollout_id=ROLLOUT,
        scheduled_event_id=event_id,
        ok=True,
        window_ms=1000,
        patch_ms=999,
        overhead_ms=1,
        vms=[VMWindowOutcome(vm=vm, outcome="resumed", paused_ms=1000) for vm, _, _ in FLEET[host]],
        occurred_at=at or T0 + timedelta(minutes=2),
    )


def clock(**kw: Any) -> VMClock:
    fields: dict[str, Any] = {
        "ok": True,
        "skew_before_ms": -1000.0,
        "skew_after_ms": 0.4,
        "method": "host-time",
        "attempts": 1,
    }
    fields.update(kw)
    return VMClock(**fields)


def fed(*events: Event, **kw: Any) -> ScheduledEventsDocument:
    document = ScheduledEventsDocument(**kw)
    for event in events:
        document.apply(event)
    return document


def caller(document: ScheduledEventsDocument, ip: str) -> Caller | None:
    return document.caller(ip)


def test_every_version_returns_exactly_the_fields_of_its_version() -> None:
    e1 = uuid.uuid4()
    document = fed(inventory("h1"), planned("h1", e1))
    base = {
        "EventId",
        "EventType",
        "ResourceType",
        "Resources",
        "EventStatus",
        "NotBefore",
    }
    expected = {
        "2017-08-01": base,
        "2017-11-01": base,
        "2019-01-01": base,
        "2019-04-01": base | {"Description"},
        "2019-08-01": base | {"Description", "EventSource"},
        "2020-07-01": base | {"Description", "EventSource", "DurationInSeconds"},
    }
    assert set(expected) == set(API_VERSIONS)
    for version, fields in expected.items():
        (event,) = document.render(caller(document, "10.0.0.1"), version)["Events"]
        assert set(event) == fields, version


def test_an_event_goes_scheduled_then_started_then_disappears_with_a_stable_event_id() -> None:
    e1 = uuid.uuid4()
    document = fed(inventory("h1"), planned("h1", e1))
    web1 = caller(document, "10.0.0.1")
    seen = [document.render(web1, "2020-07-01")]
    for event in (started("h1", e1), completed("h1", e1)):
        document.apply(event)
        seen.append(document.render(web1, "2020-07-01"))
    scheduled, running, done = seen
    (s,) = scheduled["Events"]
    assert s["EventStatus"] == "Scheduled" and s["EventType"] == "Freeze"
    assert s["ResourceType"] == "VirtualMachine" and s["EventSource"] == "Platform"
    # The host also runs db-1 and a standalone VM: web-1 is shown its own set's VMs only.
    assert s["Resources"] == ["web-1"]
    assert s["NotBefore"] == "Sat, 11 Apr 2026 22:15:00 GMT"
    assert parsedate_to_datetime(s["NotBefore"]) == T0 + timedelta(minutes=15)
    assert s["DurationInSeconds"] == 5  # 4.2 s expected: rounded up, never under-announced
    (r,) = running["Events"]
    assert r["EventStatus"] == "Started" and r["NotBefore"] == "" and r["EventId"] == str(e1)
    assert done["Events"] == []
    assert [d["DocumentIncarnation"] for d in seen] == [1, 2, 3]


def test_duration_is_minus_one_when_unknown_or_for_a_reboot() -> None:
    e1, e2 = uuid.uuid4(), uuid.uuid4()
    document = fed(
        inventory("h1"),
        inventory("h2"),
        planned("h1", e1, expected_pause_s=0),
        planned("h2", e2, event_type="Reboot"),
    )
    for ip in ("10.0.0.3", "10.0.0.6"):
        (event,) = document.render(caller(document, ip), "2020-07-01")["Events"]
        assert event["DurationInSeconds"] == -1


def test_set_members_see_their_sets_events_standalone_vms_only_their_own_strangers_nothing() -> (
    None
):
    e1, e2 = uuid.uuid4(), uuid.uuid4()
    document = fed(inventory("h1"), inventory("h2"), planned("h1", e1))
    ids = {
        ip: [e["EventId"] for e in document.render(caller(document, ip), "2020-07-01")["Events"]]
        for ip in ("10.0.0.1", "10.0.0.4", "10.0.0.2", "10.0.0.5", "10.0.0.3", "10.0.0.6")
    }
    # web-2 and db-2 (on h2) see h1's event through their sets; `other` (standalone, h2) not.
    assert ids == {
        "10.0.0.1": [str(e1)],
        "10.0.0.4": [str(e1)],
        "10.0.0.2": [str(e1)],
        "10.0.0.5": [str(e1)],
        "10.0.0.3": [str(e1)],
        "10.0.0.6": [],
    }
    assert document.render(None, "2020-07-01") == {"DocumentIncarnation": 0, "Events": []}
    assert document.find(None, str(e1)) is None
    assert document.find(caller(document, "10.0.0.6"), str(e1)) is None
    document.apply(planned("h2", e2, vms=["other"]))
    assert [
        e["EventId"] for e in document.render(caller(document, "10.0.0.6"), "2020-07-01")["Events"]
    ] == [str(e2)]
    assert str(e2) not in str(document.render(caller(document, "10.0.0.3"), "2020-07-01"))


def test_heartbeats_and_other_scopes_changes_never_move_an_incarnation() -> None:
    e1 = uuid.uuid4()
    document = fed(inventory("h1"), inventory("h2"), planned("h2", e1, vms=["other"]))
    solo = caller(document, "10.0.0.3")
    before = document.render(solo, "2020-07-01")
    for minute in range(5):
        document.apply(inventory("h1", T0 + timedelta(minutes=minute)))
    document.apply(started("h2", e1))
    assert document.render(solo, "2020-07-01") == before == {"DocumentIncarnation": 0, "Events": []}


def test_a_repeated_inventory_changes_nothing_yet_takes_back_an_address_as_a_full_read_does() -> (
    None
):
    document = fed(inventory("h1"), inventory("h2"))
    document.take_moved_scopes()
    web_1 = Caller("web-1", "h1", ("set", "web"))
    document.apply(inventory("h1", T0 + timedelta(seconds=10)))  # a heartbeat
    assert document.take_moved_scopes() == set()
    assert caller(document, "10.0.0.1") == web_1
    # h2 now reports web-1's address for a VM of its own (h1 has not reported since).
    newcomer = VMInfo(
        vm="web-3", uuid="web-3", availability_set="web", update_domain=1, ip="10.0.0.1",
        state="running",
    )  # fmt: skip
    h2 = inventory("h2", T0 + timedelta(seconds=11))
    document.apply(h2.model_copy(update={"vms": [*h2.vms, newcomer]}))
    assert caller(document, "10.0.0.1") == Caller("web-3", "h2", ("set", "web"))
    document.take_moved_scopes()
    # h1's next heartbeat lists what its last one did: read in full, it takes the address back.
    document.apply(inventory("h1", T0 + timedelta(seconds=20)))
    assert caller(document, "10.0.0.1") == web_1
    assert ("set", "web") in document.take_moved_scopes()


def test_an_aborted_rollout_removes_its_events_and_a_reannounce_moves_not_before() -> None:
    e1 = uuid.uuid4()
    document = fed(inventory("h1"), planned("h1", e1))
    web1 = caller(document, "10.0.0.1")
    later = T0 + timedelta(minutes=25)
    document.apply(planned("h1", e1, not_before=later))
    (event,) = document.render(web1, "2020-07-01")["Events"]
    assert parsedate_to_datetime(event["NotBefore"]) == later
    document.apply(
        MaintenanceCancelled(host="h1", rollout_id=ROLLOUT, scheduled_event_id=e1, reason="abort")
    )
    assert document.render(web1, "2020-07-01") == {"DocumentIncarnation": 3, "Events": []}


def test_a_finished_rollout_closes_an_event_whose_host_never_reported() -> None:
    e1 = uuid.uuid4()
    document = fed(inventory("h1"), planned("h1", e1), started("h1", e1))
    document.apply(
        RolloutStatus(
            rollout_id=ROLLOUT,
            state="completed",
            waves_total=1,
            waves_done=1,
            hosts_ok=0,
            hosts_failed=1,
        )
    )
    assert document.render(caller(document, "10.0.0.1"), "2020-07-01")["Events"] == []


def test_extended_view_keeps_ended_events_with_measurements_then_ages_them_out() -> None:
    e1 = uuid.uuid4()
    document = fed(
        inventory("h1"),
        planned("h1", e1),
        MaintenanceApproved(host="h1", rollout_id=ROLLOUT, scheduled_event_id=e1, vm="web-1"),
        started("h1", e1),
        extended_retention_s=600,
    )
    end = T0 + timedelta(minutes=2)
    document.apply(
        completed("h1", e1, at=end).model_copy(
            update={"vms": [VMWindowOutcome(vm="web-1", outcome="resumed", paused_ms=812.5)]}
        )
    )
    document.apply(
        HostClockSynced(
            host="h1",
            rollout_id=ROLLOUT,
            clocks={"web-1": clock(skew_before_ms=-812.0)},
            occurred_at=end + timedelta(seconds=1),
        )
    )
    web1 = caller(document, "10.0.0.1")
    assert document.render(web1, "2020-07-01")["Events"] == []
    view = document.render_extended(web1, "2020-07-01", end + timedelta(minutes=5))
    (event,) = view["Events"]
    assert event["EventStatus"] == "Completed" and event["Outcome"] == "Succeeded"
    assert event["ApprovedBy"] == ["web-1"]
    web = next(m for m in event["Measurements"] if m["Resource"] == "web-1")
    assert web["ActualPauseMs"] == 812.5 and web["ClockSkewMs"] == 0.4 and web["ClockSynced"]
    # Every extended change counted: planned, approved, started, blackout, completed, clock.
    assert view["DocumentIncarnation"] == 6
    aged = document.render_extended(web1, "2020-07-01", end + timedelta(minutes=11))
    assert aged == {"DocumentIncarnation": 7, "Events": [], "Extended": True}
    document.prune(end + timedelta(hours=2))
    assert document.events == {} and document.by_scope == {}  # the index forgets them too
    assert document.render_extended(web1, "2020-07-01", end + timedelta(hours=2)) == aged


def test_each_vms_blackout_and_clock_come_from_its_hosts_events_and_change_it_once() -> None:
    """The documents read no VM's own events: a VM's blackout comes from its host's
    `MaintenanceCompleted`, its clock from its host's `HostClockSynced`, whose VMs may come in
    more than one, and again grouped otherwise (a resume delivered twice): that changes
    nothing."""
    e1 = uuid.uuid4()
    end = T0 + timedelta(minutes=2)
    done = completed("h1", e1, at=end).model_copy(
        update={
            "vms": [
                VMWindowOutcome(vm="web-1", outcome="resumed", paused_ms=812.5, forced=True),
                VMWindowOutcome(vm="db-1", outcome="resumed", paused_ms=640.0),
                VMWindowOutcome(vm="solo", outcome="failed", detail="could not pause"),
            ]
        }
    )
    first = HostClockSynced(
        host="h1",
        rollout_id=ROLLOUT,
        clocks={"web-1": clock(skew_after_ms=0.4), "stranger": clock()},
        occurred_at=end + timedelta(seconds=1),
    )
    rest = HostClockSynced(
        host="h1",
        rollout_id=ROLLOUT,
        clocks={
            "db-1": clock(skew_after_ms=-0.2),
            "solo": clock(ok=False, method="none", skew_before_ms=None, skew_after_ms=None),
        },
        occurred_at=end + timedelta(seconds=1),
    )
    regrouped = HostClockSynced(
        host="h1",
        rollout_id=ROLLOUT,
        clocks={"web-1": first.clocks["web-1"], "db-1": rest.clocks["db-1"]},
        occurred_at=end + timedelta(seconds=2),
    )

    def replay() -> tuple[ScheduledEventsDocument, list[Any]]:
        document = fed(inventory("h1"), planned("h1", e1), started("h1", e1))
        changes = [document.apply(e) for e in (done, first, rest, regrouped)]
        return document, changes

    document, (at_done, at_first, at_rest, at_regrouped) = replay()
    assert [(c.kind, c.vm) for c in at_done] == [
        ("measured", "web-1"),
        ("measured", "db-1"),
        ("completed", None),
    ]
    assert [(c.kind, c.vm) for c in at_first + at_rest] == [
        ("measured", "web-1"),
        ("measured", "db-1"),
        ("measured", "solo"),
    ]
    assert at_regrouped == []
    measured = document.events[e1].measurements
    assert (measured["web-1"].actual_pause_ms, measured["web-1"].forced) == (812.5, True)
    assert (measured["web-1"].clock_synced, measured["web-1"].skew_after_ms) == (True, 0.4)
    assert (measured["db-1"].actual_pause_ms, measured["db-1"].forced) == (640.0, False)
    assert measured["db-1"].skew_after_ms == -0.2
    assert measured["solo"].actual_pause_ms is None
    assert (measured["solo"].clock_synced, measured["solo"].clock_method) == (False, "none")
    assert "stranger" not in measured  # not a VM of the event

    # Each change has a cause of its own (its webhook's id), the same in every replica.
    causes = [c.cause_id for c in at_done + at_first + at_rest]
    assert len(set(causes)) == len(causes)
    _, again = replay()
    assert [c.cause_id for c in again[0] + again[1] + again[2]] == causes


def test_extended_view_shows_deferrals_and_what_is_left() -> None:
    e1 = uuid.uuid4()
    document = fed(
        inventory("h1"),
        planned("h1", e1),
        MaintenanceDeferred(
            host="h1", rollout_id=ROLLOUT, scheduled_event_id=e1, vm="db-1", defer_s=120
        ),
        policy=DeferPolicy(max_defers=2, max_defer_s=300),
    )
    (event,) = document.render_extended(caller(document, "10.0.0.2"), "2020-07-01", T0)["Events"]
    assert event["Deferrals"] == [{"Resource": "db-1", "DeferSeconds": 120}]
    assert event["DefersRemaining"] == 1 and event["MaxDeferSeconds"] == 300


def test_a_snapshot_restores_the_same_documents_and_incarnations() -> None:
    e1, e2 = uuid.uuid4(), uuid.uuid4()
    document = fed(
        inventory("h1"),
        inventory("h2"),
        planned("h1", e1),
        started("h1", e1),
        completed("h1", e1),
        planned("h2", e2),
    )
    document.seq = 42
    restored = ScheduledEventsDocument()
    restored.load(document.to_json())
    assert restored.seq == 42
    now = T0 + timedelta(minutes=3)
    for ip in ("10.0.0.1", "10.0.0.3", "10.0.0.6", "10.9.9.9"):
        for version in API_VERSIONS:
            assert restored.render(restored.caller(ip), version) == document.render(
                document.caller(ip), version
            )
        assert restored.render_extended(restored.caller(ip), "2020-07-01", now) == (
            document.render_extended(document.caller(ip), "2020-07-01", now)
        )


def _bus_events() -> st.SearchStrategy[list[Event]]:
    ids = [uuid.UUID(int=i + 1) for i in range(3)]
    hosts = ["h1", "h2"]
    one = st.one_of(
        st.builds(inventory, st.sampled_from(hosts)),
        st.builds(
            lambda h, i, m: planned(h, i, not_before=T0 + timedelta(minutes=m)),
            st.sampled_from(hosts),
            st.sampled_from(ids),
            st.integers(0, 3),
        ),
        st.builds(started, st.sampled_from(hosts), st.sampled_from(ids)),
        st.builds(completed, st.sampled_from(hosts), st.sampled_from(ids)),
        st.builds(
            lambda h, i: MaintenanceCancelled(host=h, rollout_id=ROLLOUT, scheduled_event_id=i),
            st.sampled_from(hosts),
            st.sampled_from(ids),
        ),
        st.builds(
            lambda h, i, vm: MaintenanceApproved(
                host=h, rollout_id=ROLLOUT, scheduled_event_id=i, vm=vm
            ),
            st.sampled_from(hosts),
            st.sampled_from(ids),
            st.sampled_from(["web-1", "db-2"]),
        ),
    )
    return st.lists(one, max_size=25)


@settings(max_examples=150, deadline=None)
@given(_bus_events())
def test_incarnation_moves_by_exactly_one_per_change_of_the_events_array(
    events: list[Event],
) -> None:
    document = ScheduledEventsDocument()
    replica = ScheduledEventsDocument()
    ips = [ip for vms in FLEET.values() for _, _, ip in vms]
    before = {ip: document.render(document.caller(ip), "2020-07-01") for ip in ips}
    for event in events:
        known = {ip for ip in ips if document.caller(ip) is not None}
        document.apply(event)
        replica.apply(event)
        for ip in ips:
            after = document.render(document.caller(ip), "2020-07-01")
            if ip not in known:  # it just became known: it reads its set's document from now on
                before[ip] = after
                continue
            changed = after["Events"] != before[ip]["Events"]
            step = after["DocumentIncarnation"] - before[ip]["DocumentIncarnation"]
            assert step == (1 if changed else 0), (ip, event.type, before[ip], after)
            before[ip] = after
    # Two replicas fed the same stream serve the same documents.
    for ip in ips:
        assert replica.render(replica.caller(ip), "2020-07-01") == document.render(
            document.caller(ip), "2020-07-01"
        )
