"""Wave planning: the update-domain rule, the order of update domains, hosts in flight, placement
violations, unknown and empty hosts, determinism, re-planning mid-rollout.

Property tests check every plan against rules restated here from scratch (not with the
planner's own code); example tests pin the behaviour an operator relies on.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.waves import (
    PlacementViolation,
    WavePlan,
    check_plan,
    naive_plan,
    plan_waves,
    replan,
)
from shared.contracts import VMInfo

Fleet = dict[str, list[VMInfo]]
Layer = tuple[str, int]

ROOT = Path(__file__).resolve().parent.parent
SETS = ("web", "db", "cache", "queue")
PROPERTY = settings(deadline=None, max_examples=150)


def vm(name: str, availability_set: str | None = None, ud: int | None = None) -> VMInfo:
    """A running VM; `availability_set` None: standalone."""
    return VMInfo(
        vm=name,
        uuid=f"uuid-{name}",
        availability_set=availability_set,
        update_domain=ud,
        state="running",
    )


def carrying(host: str, *layers: tuple[str | None, int | None]) -> list[VMInfo]:
    """The VMs of `host`, one per (availability set, update domain)."""
    return [vm(f"{host}-vm{i}", name, ud) for i, (name, ud) in enumerate(layers)]


# ---------------------------------------------------------------- the rules, restated


def layers_of(vms: list[VMInfo]) -> set[Layer]:
    """(set, UD) pairs a host carries; standalone VMs none, UD None is UD 0."""
    return {(v.availability_set, v.update_domain or 0) for v in vms if v.availability_set}


def carries_two_uds_of_a_set(vms: list[VMInfo]) -> bool:
    layers = layers_of(vms)
    return len({name for name, _ in layers}) < len(layers)


def sets_impacted_in_two_uds(fleet: Fleet, wave: list[str]) -> list[str]:
    """Sets of which `wave` impacts two UDs (a violating host alone in its wave excepted)."""
    if len(wave) == 1 and carries_two_uds_of_a_set(fleet[wave[0]]):
        return []
    uds: dict[str, set[int]] = {}
    for host in wave:
        for name, ud in layers_of(fleet[host]):
            uds.setdefault(name, set()).add(ud)
    return sorted(name for name, domains in uds.items() if len(domains) > 1)


def must_follow(fleet: Fleet, hosts: list[str]) -> set[tuple[str, str]]:
    """(a, b): b must follow a, directly or through other hosts (a carries a lower UD of a set
    that b carries), transitively closed."""
    pairs = {
        (a, b)
        for a in hosts
        for b in hosts
        if a != b
        and any(s == t and u < v for s, u in layers_of(fleet[a]) for t, v in layers_of(fleet[b]))
    }
    for middle in hosts:
        pairs |= {(a, b) for a, m in pairs if m == middle for m2, b in pairs if m2 == middle}
    return pairs


def wave_of(plan: WavePlan) -> dict[str, int]:
    return {host: index for index, wave in enumerate(plan.waves) for host in wave}


# ---------------------------------------------------------------- generated fleets


@st.composite
def fleets(draw: st.DrawFn, max_hosts: int = 9) -> Fleet:
    """Hosts with VMs of 4 sets (UD 0-3 or none), one UD per set, plus up to 2 VMs placed
    anywhere (standalone, or in any set and UD): some hosts carry two UDs of a set, and the
    order between hosts can be cyclic."""
    ud = st.none() | st.integers(0, 3)
    fleet: Fleet = {}
    for i in range(draw(st.integers(0, max_hosts))):
        layers = list(draw(st.dictionaries(st.sampled_from(SETS), ud, max_size=4)).items())
        layers += draw(st.lists(st.tuples(st.sampled_from((*SETS, None)), ud), max_size=2))
        fleet[f"host-{i}"] = carrying(f"host-{i}", *layers)
    return fleet


@dataclass
class Request:
    """An update request against a fleet."""

    fleet: Fleet
    hosts: list[str] | None
    max_hosts_in_flight: int
    allow_placement_violations: bool

    def plan(self) -> WavePlan:
        return plan_waves(
            self.fleet, self.hosts, self.max_hosts_in_flight, self.allow_placement_violations
        )

    def requested(self) -> list[str]:
        return sorted(set(self.fleet if self.hosts is None else self.hosts))


@st.composite
def requests(draw: st.DrawFn) -> Request:
    fleet = draw(fleets())
    hosts = draw(st.none() | st.lists(st.sampled_from([*fleet, "ghost-1", "ghost-2"]), unique=True))
    return Request(fleet, hosts, draw(st.integers(1, 4)), draw(st.booleans()))


@st.composite
def ud_aligned_fleets(draw: st.DrawFn) -> tuple[Fleet, int]:
    """Fleets where host group g carries UD g of every set it carries, each set having VMs in
    all of its UDs 0..n-1; and the number of groups (the most UDs of a set)."""
    groups = draw(st.integers(1, 5))
    members = [[f"g{g}-host-{k}" for k in range(draw(st.integers(1, 3)))] for g in range(groups)]
    fleet: Fleet = {host: [] for hosts in members for host in hosts}
    spans = draw(st.lists(st.integers(1, groups), min_size=1, max_size=4))
    spans[0] = groups
    for number, span in enumerate(spans):
        for ud in range(span):
            for host in draw(st.lists(st.sampled_from(members[ud]), min_size=1, unique=True)):
                fleet[host].append(vm(f"{host}-vm{len(fleet[host])}", f"set-{number}", ud))
    return fleet, groups


# ---------------------------------------------------------------- properties


@PROPERTY
@given(requests())
def test_never_impacts_two_update_domains_of_a_set_in_one_wave(request: Request) -> None:
    plan = request.plan()
    for wave in plan.waves:
        assert sets_impacted_in_two_uds(request.fleet, wave) == []


@PROPERTY
@given(requests())
def test_every_requested_host_is_planned_once_or_reported(request: Request) -> None:
    plan = request.plan()
    planned = plan.hosts
    left_out = {v.host for v in plan.violations} - set(planned)
    assert len(planned) == len(set(planned))
    assert sorted([*planned, *left_out, *plan.unknown_hosts]) == request.requested()
    assert plan.unknown_hosts == [h for h in request.requested() if h not in request.fleet]
    assert all(carries_two_uds_of_a_set(request.fleet[h]) for h in left_out)


@PROPERTY
@given(requests())
def test_host_carrying_two_uds_of_a_set_is_reported_and_patched_alone_only_if_allowed(
    request: Request,
) -> None:
    plan = request.plan()
    violating = {h for h in request.requested() if h in request.fleet}
    violating = {h for h in violating if carries_two_uds_of_a_set(request.fleet[h])}
    assert {v.host for v in plan.violations} == violating
    for wave in plan.waves:
        if any(host in violating for host in wave):
            assert request.allow_placement_violations
            assert len(wave) == 1


@PROPERTY
@given(requests())
def test_no_wave_holds_more_than_max_hosts_in_flight_and_none_is_empty(request: Request) -> None:
    assert all(1 <= len(w) <= request.max_hosts_in_flight for w in request.plan().waves)


@PROPERTY
@given(requests())
def test_never_fewer_waves_than_the_lower_bound(request: Request) -> None:
    plan = request.plan()
    spans: dict[str, set[int]] = {}
    for host in plan.hosts:
        if carries_two_uds_of_a_set(request.fleet[host]):
            continue  # patched alone: impacts its UDs at once anyway
        for name, ud in layers_of(request.fleet[host]):
            spans.setdefault(name, set()).add(ud)
    widest = max((len(uds) for uds in spans.values()), default=0)
    bound = max(widest, math.ceil(len(plan.hosts) / request.max_hosts_in_flight))
    assert plan.lower_bound == bound
    assert len(plan.waves) >= bound


@PROPERTY
@given(requests())
def test_update_domains_go_in_increasing_order_unless_placement_makes_the_order_cyclic(
    request: Request,
) -> None:
    plan = request.plan()
    waves = wave_of(plan)
    pairs = must_follow(request.fleet, plan.hosts)
    for a, b in pairs:
        if (b, a) not in pairs:
            assert waves[a] < waves[b], f"{b} must follow {a}"


@PROPERTY
@given(ud_aligned_fleets())
def test_ud_aligned_fleet_patches_update_domain_k_in_wave_k(aligned: tuple[Fleet, int]) -> None:
    fleet, groups = aligned
    plan = plan_waves(fleet, max_hosts_in_flight=len(fleet))
    assert len(plan.waves) == plan.lower_bound == groups
    waves = wave_of(plan)
    for host, vms in fleet.items():
        for ud in {v.update_domain for v in vms}:
            assert waves[host] == ud


@PROPERTY
@given(requests(), st.randoms(use_true_random=False))
def test_same_request_gives_same_plan_whatever_the_listing_order(
    request: Request, rnd: random.Random
) -> None:
    hosts = list(request.fleet)
    rnd.shuffle(hosts)
    shuffled = {host: rnd.sample(request.fleet[host], len(request.fleet[host])) for host in hosts}
    asked = None if request.hosts is None else rnd.sample(request.hosts, len(request.hosts))
    again = Request(
        shuffled, asked, request.max_hosts_in_flight, request.allow_placement_violations
    )
    assert again.plan() == request.plan()


@PROPERTY
@given(requests())
def test_check_plan_finds_nothing_wrong_with_a_plan(request: Request) -> None:
    assert check_plan(request.fleet, request.plan()) == []


@PROPERTY
@given(requests())
def test_naive_plan_keeps_one_update_domain_per_wave_and_the_hosts_in_flight(
    request: Request,
) -> None:
    plan = naive_plan(
        request.fleet,
        request.hosts,
        request.max_hosts_in_flight,
        request.allow_placement_violations,
    )
    assert sorted(plan.hosts) == sorted(request.plan().hosts)
    for wave in plan.waves:
        assert sets_impacted_in_two_uds(request.fleet, wave) == []
        assert 1 <= len(wave) <= request.max_hosts_in_flight


@PROPERTY
@given(requests(), fleets(), st.data())
def test_replan_plans_again_exactly_the_hosts_not_started(
    request: Request, changed: Fleet, data: st.DataObject
) -> None:
    plan = request.plan()
    started = data.draw(st.integers(0, len(plan.waves)))
    done = [host for wave in plan.waves[:started] for host in wave]
    again = replan(plan, changed, done)
    covered = {*plan.hosts, *(v.host for v in plan.violations), *plan.unknown_hosts}
    left_out = {v.host for v in again.violations} - set(again.hosts)
    assert sorted([*again.hosts, *left_out, *again.unknown_hosts]) == sorted(covered - set(done))
    assert again.unknown_hosts == sorted(h for h in covered - set(done) if h not in changed)
    assert check_plan(changed, again) == []


# ---------------------------------------------------------------- examples


def test_hosts_carrying_a_set_in_different_update_domains_go_in_different_waves() -> None:
    fleet = {"a": carrying("a", ("web", 0)), "b": carrying("b", ("web", 1))}
    assert plan_waves(fleet).waves == [["a"], ["b"]]


def test_hosts_of_one_update_domain_share_a_wave() -> None:
    fleet = {h: carrying(h, ("web", 0), ("db", 2)) for h in ("a", "b", "c")}
    assert plan_waves(fleet).waves == [["a", "b", "c"]]


def test_update_domains_of_a_set_are_patched_in_increasing_order() -> None:
    fleet = {
        "a": carrying("a", ("web", 2)),
        "b": carrying("b", ("web", 0), ("db", 1)),
        "c": carrying("c", ("web", 1)),
        "d": carrying("d", ("db", 0)),
    }
    plan = plan_waves(fleet)
    waves = wave_of(plan)
    assert waves["d"] < waves["b"] < waves["c"] < waves["a"]
    assert len(plan.waves) == 4


def test_cyclic_placement_still_keeps_one_update_domain_per_wave() -> None:
    # a must precede b for web and follow it for db: no order honours both.
    fleet = {"a": carrying("a", ("web", 0), ("db", 1)), "b": carrying("b", ("web", 1), ("db", 0))}
    plan = plan_waves(fleet)
    assert sorted(plan.waves) == [["a"], ["b"]]
    assert check_plan(fleet, plan) == []


def test_vm_without_update_domain_counts_as_update_domain_0() -> None:
    fleet = {"a": carrying("a", ("web", None)), "b": carrying("b", ("web", 0))}
    fleet["c"] = carrying("c", ("web", 1))
    assert plan_waves(fleet).waves == [["a", "b"], ["c"]]


def test_standalone_vms_impose_nothing() -> None:
    fleet = {h: carrying(h, (None, 0), (None, 3)) for h in ("a", "b", "c")}
    assert plan_waves(fleet).waves == [["a", "b", "c"]]


def test_host_carrying_two_update_domains_of_a_set_is_reported_and_left_out() -> None:
    fleet = {"a": carrying("a", ("web", 0), ("web", 1), ("db", 0)), "b": carrying("b", ("db", 1))}
    plan = plan_waves(fleet)
    assert plan.waves == [["b"]]
    assert plan.violations == [PlacementViolation("a", "web", (0, 1))]


def test_host_carrying_two_update_domains_is_patched_alone_when_allowed() -> None:
    fleet = {
        "a": carrying("a", ("web", 0), ("web", 1)),
        "b": carrying("b", ("db", 0)),
        "c": carrying("c", ("db", 0)),
    }
    plan = plan_waves(fleet, allow_placement_violations=True)
    assert ["a"] in plan.waves
    assert ["b", "c"] in plan.waves
    assert plan.violations == [PlacementViolation("a", "web", (0, 1))]


def test_unknown_hosts_are_reported_and_not_planned() -> None:
    fleet = {"a": carrying("a", ("web", 0))}
    plan = plan_waves(fleet, hosts=["a", "ghost"])
    assert plan.waves == [["a"]]
    assert plan.unknown_hosts == ["ghost"]


def test_only_the_requested_hosts_are_planned() -> None:
    fleet = {h: carrying(h, ("web", 0)) for h in ("a", "b", "c")}
    assert plan_waves(fleet, hosts=["c", "a"]).waves == [["a", "c"]]


def test_hosts_without_vms_fill_the_waves() -> None:
    fleet = {"a": carrying("a", ("web", 0)), "b": carrying("b", ("web", 1))}
    fleet |= {h: [] for h in ("e1", "e2", "e3", "e4")}
    plan = plan_waves(fleet, max_hosts_in_flight=3)
    assert plan.waves == [["a", "e1", "e2"], ["b", "e3", "e4"]]
    assert plan.lower_bound == 2


def test_waves_hold_at_most_max_hosts_in_flight() -> None:
    fleet = {h: carrying(h, ("web", 0)) for h in ("a", "b", "c")}
    assert plan_waves(fleet, max_hosts_in_flight=2).waves == [["a", "b"], ["c"]]
    assert plan_waves(fleet, max_hosts_in_flight=1).lower_bound == 3


def test_rejects_fewer_than_one_host_in_flight() -> None:
    with pytest.raises(ValueError, match="max_hosts_in_flight"):
        plan_waves({}, max_hosts_in_flight=0)


def test_empty_request_gives_an_empty_plan() -> None:
    assert plan_waves({}) == WavePlan(waves=[], lower_bound=0)


def test_to_json_gives_waves_lower_bound_violations_and_unknown_hosts() -> None:
    fleet = {"a": carrying("a", ("web", 0), ("web", 2)), "b": carrying("b", ("web", 1))}
    assert plan_waves(fleet, hosts=["a", "b", "x"]).to_json() == {
        "waves": [["b"]],
        "lower_bound": 1,
        "violations": [{"host": "a", "availability_set": "web", "update_domains": [0, 2]}],
        "unknown_hosts": ["x"],
    }


def test_replan_skips_and_reports_a_host_that_disappeared() -> None:
    fleet = {
        "a": carrying("a", ("web", 0)),
        "b": carrying("b", ("web", 1)),
        "c": carrying("c", ("web", 2)),
    }
    plan = plan_waves(fleet)
    del fleet["b"]
    again = replan(plan, fleet, done_hosts=["a"])
    assert again.waves == [["c"]]
    assert again.unknown_hosts == ["b"]


def test_replan_follows_a_vm_that_moved() -> None:
    fleet = {
        "a": carrying("a", ("web", 0)),
        "b": carrying("b", ("web", 1)),
        "c": carrying("c", ("db", 0)),
        "d": carrying("d", ("db", 1)),
    }
    plan = plan_waves(fleet)
    assert plan.waves == [["a", "c"], ["b", "d"]]
    fleet["b"] = carrying("b", ("web", 1), ("db", 0))  # db's UD 0 VM moved from c to b
    fleet["c"] = []
    again = replan(plan, fleet, done_hosts=[])
    waves = wave_of(again)
    assert waves["a"] < waves["b"] < waves["d"]
    assert check_plan(fleet, again) == []


def test_replan_plans_a_host_whose_violation_was_fixed() -> None:
    fleet = {"a": carrying("a", ("web", 0), ("web", 1)), "b": carrying("b", ("db", 0))}
    plan = plan_waves(fleet)
    assert plan.waves == [["b"]]
    fleet["a"] = carrying("a", ("web", 0))
    assert replan(plan, fleet, done_hosts=["b"]).waves == [["a"]]


def test_naive_plan_patches_hosts_of_mixed_update_domains_alone_after_the_sweep() -> None:
    fleet = {
        "a": carrying("a", ("web", 0)),
        "b": carrying("b", ("web", 1), ("db", 1)),
        "c": carrying("c", ("db", 0)),
        "d": carrying("d", ("web", 1), ("db", 0)),
        "e": [],
    }
    assert naive_plan(fleet).waves == [["a", "c", "e"], ["b"], ["d"]]


@pytest.mark.parametrize(
    ("waves", "broken"),
    [
        ([["a", "b"]], "impacts UDs 0 and 1 of set web"),
        ([["b"], ["a"]], "UD order"),
        ([["a", "c", "d"], ["b"]], "more than 2 in flight"),
        ([["a"], ["a"], ["b"]], "planned twice"),
        ([["a"], [], ["b"]], "wave 1 is empty"),
        ([["a"], ["b"], ["ghost"]], "not in the inventory"),
        ([["a"], ["b"], ["v"]], "not allowed"),
        ([["a"], ["b"], ["c"]], "lower bound is 1, should be 2"),
    ],
)
def test_check_plan_reports_each_broken_rule(waves: list[list[str]], broken: str) -> None:
    fleet = {
        "a": carrying("a", ("web", 0)),
        "b": carrying("b", ("web", 1)),
        "c": carrying("c", ("db", 0)),
        "d": carrying("d", ("db", 0)),
        "v": carrying("v", ("db", 0), ("db", 1)),
    }
    bound = 1 if broken.startswith("lower bound") else 2
    plan = WavePlan(waves=waves, lower_bound=bound, max_hosts_in_flight=2)
    assert any(broken in problem for problem in check_plan(fleet, plan)), check_plan(fleet, plan)


def test_check_plan_reports_a_violation_the_plan_does_not_list() -> None:
    fleet = {"v": carrying("v", ("db", 0), ("db", 1))}
    plan = plan_waves(fleet, allow_placement_violations=True)
    problems = check_plan(fleet, replace(plan, violations=[]))
    assert problems == ["host v carries two UDs of a set but is not reported"]


def round_robin_fleet(groups: int = 10, hosts_per_group: int = 6, sets: int = 80) -> Fleet:
    """Hosts in `groups` UD groups; set k puts its UD u on group (u + k) mod `groups`, dealing
    the VMs of each group round-robin over its hosts (UDs numbered differently in each set)."""
    rng = random.Random(7)
    members = [[f"g{g}-host-{i}" for i in range(hosts_per_group)] for g in range(groups)]
    fleet: Fleet = {host: [] for hosts in members for host in hosts}
    dealt = [0] * groups
    for k in range(sets):
        n_ud = rng.randint(2, groups)
        for j in range(rng.randint(n_ud, 3 * n_ud)):
            group = (j % n_ud + k) % groups
            host = members[group][dealt[group] % hosts_per_group]
            dealt[group] += 1
            fleet[host].append(vm(f"set-{k}-vm-{j}", f"set-{k}", j % n_ud))
    return fleet


@pytest.mark.parametrize("in_flight", [3, 60])
def test_round_robin_fleet_is_planned_within_10_percent_of_the_lower_bound(in_flight: int) -> None:
    fleet = round_robin_fleet()
    plan = plan_waves(fleet, max_hosts_in_flight=in_flight)
    assert len(plan.waves) <= 1.1 * plan.lower_bound
    assert len(plan.waves) < len(naive_plan(fleet, max_hosts_in_flight=in_flight).waves)


def test_plan_does_not_depend_on_the_hash_seed() -> None:
    rng = random.Random(3)
    placed = round_robin_fleet()
    fleet: Fleet = {host: [] for host in placed}
    for v in (v for vms in placed.values() for v in vms):  # the same VMs, placed at random
        fleet[rng.choice(list(placed))].append(v)
    script = (
        "import json, sys\n"
        "from shared.contracts import VMInfo\n"
        "from services.planner.waves import plan_waves\n"
        "fleet = {h: [VMInfo(**v) for v in vms] for h, vms in json.load(sys.stdin).items()}\n"
        "print(json.dumps(plan_waves(fleet, None, 1000, True).to_json()))\n"
    )
    document = json.dumps({h: [v.to_json() for v in vms] for h, vms in fleet.items()})
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            input=document,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["waves"]
