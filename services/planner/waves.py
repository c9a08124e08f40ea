"""Wave planning: which hosts are patched together, so that an availability set never has two of
its update domains (UDs) impacted at once and goes through its UDs in increasing order.

Plain, deterministic Python: no bus, no I/O. Words used below:

- a *layer* is one (availability set, UD) pair; a host *carries* a layer when it runs a VM of it
  (standalone VMs carry none; a VM of a set without UD counts as UD 0);
- host A *must precede* host B when they carry (S, u) and (S, u') with u < u';
- a *solo* host carries two UDs of one set (a placement violation): patching it impacts both, so
  it is left out, or, when the request allows it, patched alone in a wave of its own.

**Rules every plan keeps** (checked by `check_plan`; `plan_waves` checks its own result the same
way and raises `PlanningError` rather than return a plan that breaks one):

1. a wave never impacts two UDs of one set (save a solo host alone in its wave);
2. a wave holds at most `max_hosts_in_flight` hosts, and every planned host is in one wave;
3. *UD order*: when host A must precede host B and B is not, even through other hosts, required
   to precede A, A's wave is strictly before B's. On UD-aligned placements this is exactly "all
   hosts of S in UD u come before any host of S in a higher UD". Placement can make these
   requirements cyclic (A carries S/UD0 and T/UD1, B carries S/UD1 and T/UD0): then no plan can
   honour them all. The hosts caught in one cycle (a strongly connected component of the
   must-precede graph) are ordered among themselves by rule 1 only: their sets may visit UDs out
   of order, never two at once (the planner tries increasing UD, see below). The order *between*
   components is always kept. A few misplaced VMs can tie most of a fleet into one component:
   rule 1 still holds, the UD order becomes best effort.

**Algorithm.** Build the must-precede graph (linear in size: between consecutive layers of a set,
edges go through a barrier node when that saves edges), condense its strongly connected
components (Tarjan), and walk the components in a topological order, ready ones by earliest
allowed wave, then longest remaining path. Each host of a component goes to the first wave, from
one after the last of everything it must follow, that has room and impacts none of its sets in
another UD (first-fit colouring; wave sets are int bitmasks, so a host costs a few ORs per
layer). Inside a component, hosts are first taken breadth-first over shared layers: hosts
sharing a layer never conflict on it, so hosts placed by UD groups (even numbered differently in
each set) fall into the same waves. If that plan is above the lower bound, a second pass takes
them in increasing UD (the median of their layers' UDs), which keeps most sets in order when the
cycles come from a few misplaced VMs; it is kept unless it has more waves. Hosts with no ordering
at all (no set VMs, or only layers no other planned host carries in another UD) fill the gaps
last.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from collections import defaultdict, deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from shared.contracts import VMInfo

Inventory = Mapping[str, Sequence[VMInfo]]
"""The fleet: host name -> the VMs it runs."""

DEFAULT_MAX_HOSTS_IN_FLIGHT = 10


@dataclass(frozen=True)
class PlacementViolation:
    """A host that carries VMs of one availability set in two or more update domains."""

    host: str
    availability_set: str
    update_domains: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """`{"host", "availability_set", "update_domains"}`."""
        return {
            "host": self.host,
            "availability_set": self.availability_set,
            "update_domains": list(self.update_domains),
        }


@dataclass(frozen=True)
class WavePlan:
    """Hosts to patch, wave after wave; the hosts of one wave are patched at the same time."""

    waves: list[list[str]]
    """The waves in order, each a list of host names sorted by name."""
    lower_bound: int
    """No plan of these hosts has fewer waves: the most UDs one set spans among them (hosts
    patched alone for a violation aside), and the hosts divided by `max_hosts_in_flight`,
    rounded up."""
    violations: list[PlacementViolation] = field(default_factory=list)
    """Hosts carrying two UDs of one set: left out, or alone in a wave when allowed."""
    unknown_hosts: list[str] = field(default_factory=list)
    """Hosts requested but absent from the inventory."""
    max_hosts_in_flight: int = DEFAULT_MAX_HOSTS_IN_FLIGHT
    """The most hosts one wave may hold."""
    allow_placement_violations: bool = False
    """Whether violating hosts are patched (alone) rather than left out."""

    @property
    def hosts(self) -> list[str]:
        """Every planned host, in wave order."""
        return [host for wave in self.waves for host in wave]

    def to_json(self) -> dict[str, Any]:
        """`{"waves", "lower_bound", "violations", "unknown_hosts"}`, JSON-ready."""
        return {
            "waves": [list(wave) for wave in self.waves],
            "lower_bound": self.lower_bound,
            "violations": [v.to_json() for v in self.violations],
            "unknown_hosts": list(self.unknown_hosts),
        }


class PlanningError(RuntimeError):
    """The planner made a plan that breaks a rule: a bug; the plan must not be run."""


# ---------------------------------------------------------------- public API


def plan_waves(
    inventory: Inventory,
    hosts: Iterable[str] | None = None,
    max_hosts_in_flight: int = DEFAULT_MAX_HOSTS_IN_FLIGHT,
    allow_placement_violations: bool = False,
) -> WavePlan:
    """Plan the patching of `hosts` (None: every host of `inventory`) in as few waves as the rules
    of this module allow. Unknown hosts and placement violations are reported in the plan;
    violating hosts are left out unless `allow_placement_violations`, then patched alone.

    Deterministic: the plan depends only on the names, sets and UDs, not on listing order.
    Raises ValueError for `max_hosts_in_flight` < 1, PlanningError if the plan breaks a rule.
    """
    _check_max_in_flight(max_hosts_in_flight)
    with _paused_gc():
        request = _read_request(inventory, hosts, allow_placement_violations)
        fleet = request.fleet
        order = _Condensation.build(fleet)
        bound = _lower_bound(fleet, max_hosts_in_flight)
        wave_of = _assign(fleet, order, max_hosts_in_flight, _breadth_first_rank(fleet))
        if _wave_count(wave_of) > bound:
            in_ud_order = _assign(fleet, order, max_hosts_in_flight, _update_domain_rank(fleet))
            if _wave_count(in_ud_order) <= _wave_count(wave_of):
                wave_of = in_ud_order
        n_waves = _wave_count(wave_of)
        problems = _problems(
            fleet, order, wave_of, n_waves, max_hosts_in_flight, allow_placement_violations
        )
    if problems:
        raise PlanningError("; ".join(problems))
    return request.plan(_group(fleet.names, wave_of), max_hosts_in_flight)


def naive_plan(
    inventory: Inventory,
    hosts: Iterable[str] | None = None,
    max_hosts_in_flight: int = DEFAULT_MAX_HOSTS_IN_FLIGHT,
    allow_placement_violations: bool = False,
) -> WavePlan:
    """The baseline: one UD index at a time across the whole fleet, with no graph reasoning.

    Step k holds the hosts whose set VMs are all in UD k (hosts with no set VMs join step 0),
    cut into waves of `max_hosts_in_flight` by name. A host whose VMs span several UD indices
    (UD 0 of one set, UD 3 of another, say) is safe in no step: it is patched alone, in a wave of
    its own after the sweep. Unknown and violating hosts are handled as by `plan_waves`.
    It keeps rules 1 and 2, not the UD order of the hosts patched alone.
    """
    _check_max_in_flight(max_hosts_in_flight)
    with _paused_gc():
        request = _read_request(inventory, hosts, allow_placement_violations)
    fleet = request.fleet
    steps: dict[int, list[str]] = {}
    alone: list[str] = []
    for host, layers in zip(fleet.names, fleet.host_layers, strict=True):
        uds = {fleet.layer_ud[layer] for layer in layers}
        if len(uds) > 1:
            alone.append(host)
        else:
            steps.setdefault(min(uds, default=0), []).append(host)
    waves = [
        members[i : i + max_hosts_in_flight]
        for _, members in sorted(steps.items())
        for i in range(0, len(members), max_hosts_in_flight)
    ]
    return request.plan(waves + [[host] for host in alone], max_hosts_in_flight)


def replan(plan: WavePlan, inventory: Inventory, done_hosts: Collection[str]) -> WavePlan:
    """Plan again, on a fresh `inventory`, the hosts of `plan` not yet started.

    `done_hosts`: hosts already started or finished. The others that `plan` covers (planned,
    left out for a violation, or unknown) are planned with the same settings; a host gone from
    the inventory is reported in `unknown_hosts`, a host whose VMs moved is placed by its VMs now.
    """
    done = set(done_hosts)
    covered = plan.hosts + [v.host for v in plan.violations] + plan.unknown_hosts
    return plan_waves(
        inventory,
        hosts=[host for host in covered if host not in done],
        max_hosts_in_flight=plan.max_hosts_in_flight,
        allow_placement_violations=plan.allow_placement_violations,
    )


def check_plan(inventory: Inventory, plan: WavePlan) -> list[str]:
    """The rules `plan` breaks against `inventory`, one sentence each (empty: a valid plan).

    Checks the module's three rules, that planned hosts are known and violating ones allowed and
    reported, that `unknown_hosts` are unknown, and that `lower_bound` is right.
    """
    if plan.max_hosts_in_flight < 1:
        return [f"max_hosts_in_flight is {plan.max_hosts_in_flight}, less than 1"]
    problems: list[str] = []
    seen: set[str] = set()
    for index, wave in enumerate(plan.waves):
        if not wave:
            problems.append(f"wave {index} is empty")
        for host in wave:
            if host in seen:
                problems.append(f"host {host} is planned twice")
            elif host not in inventory:
                problems.append(f"host {host} (wave {index}) is not in the inventory")
            seen.add(host)
    problems += [
        f"host {h} is reported unknown but is known" for h in plan.unknown_hosts if h in inventory
    ]
    reported = {v.host for v in plan.violations}
    known = [host for host in sorted(seen) if host in inventory]
    with _paused_gc():
        fleet = _read_request({h: inventory[h] for h in known}, None, True).fleet
        problems += [
            f"host {host} carries two UDs of a set but is not reported"
            for host, solo in zip(fleet.names, fleet.solo, strict=True)
            if solo and host not in reported
        ]
        position = {host: index for index, wave in enumerate(plan.waves) for host in wave}
        wave_of = [position[host] for host in fleet.names]
        problems += _problems(
            fleet,
            _Condensation.build(fleet),
            wave_of,
            len(plan.waves),
            plan.max_hosts_in_flight,
            plan.allow_placement_violations,
        )
    bound = _lower_bound(fleet, plan.max_hosts_in_flight)
    if plan.lower_bound != bound:
        problems.append(f"lower bound is {plan.lower_bound}, should be {bound}")
    return problems


# ---------------------------------------------------------------- reading the request


def _check_max_in_flight(max_hosts_in_flight: int) -> None:
    if max_hosts_in_flight < 1:
        raise ValueError(f"max_hosts_in_flight must be at least 1, not {max_hosts_in_flight}")


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Planning allocates many small lists while the inventory holds ~10^5 pydantic objects:
    the cyclic collector would rescan those again and again (half the time at 10,000 hosts)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_SET_BITS = 32
"""While reading, a layer is one int, `ud << _SET_BITS | set id`: cheap to hash and sort."""
_SET_MASK = (1 << _SET_BITS) - 1


@dataclass
class _Request:
    """A request read against the inventory: what can be planned, what cannot."""

    fleet: _Fleet
    """The hosts to plan."""
    violations: list[PlacementViolation]
    unknown_hosts: list[str]
    allow_placement_violations: bool

    def plan(self, waves: list[list[str]], max_hosts_in_flight: int) -> WavePlan:
        """The plan of these hosts in `waves`."""
        return WavePlan(
            waves=waves,
            lower_bound=_lower_bound(self.fleet, max_hosts_in_flight),
            violations=self.violations,
            unknown_hosts=self.unknown_hosts,
            max_hosts_in_flight=max_hosts_in_flight,
            allow_placement_violations=self.allow_placement_violations,
        )


def _read_request(
    inventory: Inventory, hosts: Iterable[str] | None, allow_placement_violations: bool
) -> _Request:
    set_ids: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # in reading order
    carried: dict[str, set[int]] = {}
    unknown: list[str] = []
    broken: list[str] = []
    for host in sorted(set(inventory if hosts is None else hosts)):
        vms = inventory.get(host)
        if vms is None:
            unknown.append(host)
            continue
        carried[host] = layers = {
            (vm.update_domain or 0) << _SET_BITS | set_ids[vm.availability_set]
            for vm in vms
            if vm.availability_set is not None
        }
        if len({layer & _SET_MASK for layer in layers}) < len(layers):
            broken.append(host)
    set_names = list(set_ids)
    violations: list[PlacementViolation] = []
    for host in broken:
        uds: dict[str, list[int]] = {}
        for layer in sorted(carried[host]):
            uds.setdefault(set_names[layer & _SET_MASK], []).append(layer >> _SET_BITS)
        violations += [
            PlacementViolation(host, name, tuple(domains))
            for name, domains in sorted(uds.items())
            if len(domains) > 1
        ]
        if not allow_placement_violations:
            del carried[host]
    fleet = _Fleet.build(carried, set_names, set(broken) & set(carried))
    return _Request(fleet, violations, unknown, allow_placement_violations)


def _lower_bound(fleet: _Fleet, max_hosts_in_flight: int) -> int:
    """The most UDs a set spans among the hosts patched with others (a solo host impacts its UDs
    at once anyway), and the hosts divided by the hosts in flight, rounded up."""
    if any(fleet.solo):
        widest = max(
            (
                sum(any(not fleet.solo[h] for h in fleet.layer_hosts[layer]) for layer in layers)
                for layers in fleet.set_layers
            ),
            default=0,
        )
    else:
        widest = max((len(layers) for layers in fleet.set_layers), default=0)
    return max(widest, math.ceil(len(fleet.names) / max_hosts_in_flight))


def _wave_count(wave_of: Sequence[int]) -> int:
    return max(wave_of, default=-1) + 1


def _group(names: Sequence[str], wave_of: Sequence[int]) -> list[list[str]]:
    """Hosts by wave; `names` being sorted, so is each wave."""
    waves: list[list[str]] = [[] for _ in range(_wave_count(wave_of))]
    for name, wave in zip(names, wave_of, strict=True):
        waves[wave].append(name)
    return waves


# ---------------------------------------------------------------- the problem in integers


@dataclass
class _Fleet:
    """The planned hosts (index: position in the sorted `names`) and their layers, as integers.
    Ids follow sorted names and UDs, so the plan never depends on listing or hashing order."""

    names: list[str]
    host_layers: list[list[int]]
    solo: list[bool]
    set_names: list[str]
    set_layers: list[list[int]]
    """Per set, its layers by increasing UD."""
    layer_set: list[int]
    layer_ud: list[int]
    layer_hosts: list[list[int]]
    """Per layer, the hosts carrying it, by index."""

    @classmethod
    def build(cls, carried: Mapping[str, set[int]], set_names: list[str], solo: set[str]) -> _Fleet:
        """From the layers each host carries, as read (see `_SET_BITS`; `set_names` by id)."""
        names = sorted(carried)
        read = set().union(*carried.values())
        set_rank = [0] * len(set_names)
        for rank, read_id in enumerate(sorted(range(len(set_names)), key=set_names.__getitem__)):
            set_rank[read_id] = rank
        span = max(read, default=0) >> _SET_BITS
        layer_id: dict[int, int] = {}
        fleet_sets: list[str] = []
        set_layers: list[list[int]] = []
        layer_set: list[int] = []
        layer_ud: list[int] = []
        for layer in sorted(
            read, key=lambda k: set_rank[k & _SET_MASK] * (span + 1) + (k >> _SET_BITS)
        ):
            name = set_names[layer & _SET_MASK]
            if not fleet_sets or fleet_sets[-1] != name:
                fleet_sets.append(name)
                set_layers.append([])
            layer_id[layer] = len(layer_set)
            set_layers[-1].append(len(layer_set))
            layer_set.append(len(fleet_sets) - 1)
            layer_ud.append(layer >> _SET_BITS)
        host_layers = [sorted([layer_id[layer] for layer in carried[host]]) for host in names]
        layer_hosts: list[list[int]] = [[] for _ in layer_set]
        for index, layers in enumerate(host_layers):
            for layer in layers:
                layer_hosts[layer].append(index)
        return cls(
            names=names,
            host_layers=host_layers,
            solo=[host in solo for host in names],
            set_names=fleet_sets,
            set_layers=set_layers,
            layer_set=layer_set,
            layer_ud=layer_ud,
            layer_hosts=layer_hosts,
        )


# ---------------------------------------------------------------- the order between hosts


def _precedence_graph(fleet: _Fleet) -> list[list[int]]:
    """Successor lists of the must-precede relation; its paths give the transitive relation.
    Nodes are the hosts, then barrier nodes: between consecutive layers of a set, hosts of the
    lower layer point to the hosts of the next one, through a barrier node when that saves edges
    (so the graph stays linear in the number of (host, layer) pairs)."""
    adj: list[list[int]] = [[] for _ in fleet.names]
    for layers in fleet.set_layers:
        for earlier, later in itertools.pairwise(layers):
            before, after = fleet.layer_hosts[earlier], fleet.layer_hosts[later]
            if len(before) * len(after) <= len(before) + len(after):
                for host in before:
                    adj[host] += after
            else:
                barrier = len(adj)
                adj.append(after)
                for host in before:
                    adj[host].append(barrier)
    return adj


def _strong_components(adj: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Tarjan's algorithm without recursion: each node's component, and the number of them.
    Components are numbered sinks first: every edge between two goes to the smaller id."""
    n = len(adj)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    comp = [-1] * n
    stack: list[int] = []
    counter = 0
    n_comp = 0
    for root in range(n):
        if index[root] >= 0:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        calls = [(root, iter(adj[root]))]
        while calls:
            v, successors = calls[-1]
            for w in successors:
                if index[w] < 0:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = True
                    calls.append((w, iter(adj[w])))
                    break
                if on_stack[w] and index[w] < low[v]:
                    low[v] = index[w]
            else:
                calls.pop()
                if calls and low[v] < low[calls[-1][0]]:
                    low[calls[-1][0]] = low[v]
                if low[v] == index[v]:
                    while True:
                        w = stack.pop()
                        on_stack[w] = False
                        comp[w] = n_comp
                        if w == v:
                            break
                    n_comp += 1
    return comp, n_comp


@dataclass
class _Condensation:
    """The must-precede relation between groups of hosts: its strongly connected components
    (inside one, the relation is cyclic and cannot be honoured) and the DAG between them."""

    comp_hosts: list[list[int]]
    """Hosts of each component, by index; none for a component of barriers only."""
    successors: list[list[int]]
    n_predecessors: list[int]
    height: list[int]
    """Host components on the longest path from this component on, itself included."""
    free: list[bool]
    """Per host: in no must-precede pair and not solo, so it fits any wave with room."""

    @classmethod
    def build(cls, fleet: _Fleet) -> _Condensation:
        adj = _precedence_graph(fleet)
        comp, n_comp = _strong_components(adj)
        comp_hosts: list[list[int]] = [[] for _ in range(n_comp)]
        for host in range(len(fleet.names)):
            comp_hosts[comp[host]].append(host)
        successors: list[list[int]] = [[] for _ in range(n_comp)]
        n_predecessors = [0] * n_comp
        for node, targets in enumerate(adj):
            source = comp[node]
            for target in targets:
                other = comp[target]
                if other != source:
                    successors[source].append(other)
                    n_predecessors[other] += 1
        height = [0] * n_comp
        for c in range(n_comp):
            below = max([height[s] for s in successors[c]], default=0)
            height[c] = below + (1 if comp_hosts[c] else 0)
        free = [
            not solo and not adj[host] and n_predecessors[comp[host]] == 0
            for host, solo in enumerate(fleet.solo)
        ]
        return cls(comp_hosts, successors, n_predecessors, height, free)


def _update_domain_rank(fleet: _Fleet) -> list[int]:
    """Each host's position when sorted by the median UD of its layers, then by name."""
    median = [
        sorted([fleet.layer_ud[layer] for layer in layers] or [0]) for layers in fleet.host_layers
    ]
    order = sorted(range(len(median)), key=lambda host: median[host][(len(median[host]) - 1) // 2])
    rank = [0] * len(order)
    for position, host in enumerate(order):
        rank[host] = position
    return rank


def _breadth_first_rank(fleet: _Fleet) -> list[int]:
    """Each host's position in a breadth-first walk from host to host through shared layers.
    Hosts sharing a layer never conflict on it; taken one after another, hosts placed by UD
    groups (a set's UD u on one group of hosts) fill the same waves."""
    rank = [-1] * len(fleet.names)
    layer_seen = [False] * len(fleet.layer_set)
    visited = 0
    for root in range(len(fleet.names)):
        if rank[root] >= 0:
            continue
        rank[root] = visited
        visited += 1
        queue = deque([root])
        while queue:
            host = queue.popleft()
            for layer in fleet.host_layers[host]:
                if layer_seen[layer]:
                    continue
                layer_seen[layer] = True
                for other in fleet.layer_hosts[layer]:
                    if rank[other] < 0:
                        rank[other] = visited
                        visited += 1
                        queue.append(other)
    return rank


# ---------------------------------------------------------------- assigning waves


class _WaveFiller:
    """First-fit assignment of hosts to waves. Wave sets are ints, bit w standing for wave w, so
    the waves a host cannot join are a few ORs away whatever the number of waves."""

    def __init__(self, fleet: _Fleet, max_hosts_in_flight: int) -> None:
        self.fleet = fleet
        self.capacity = max_hosts_in_flight
        self.set_waves = [0] * len(fleet.set_layers)
        """Per set, the waves impacting it."""
        self.layer_waves = [0] * len(fleet.layer_set)
        """Per layer, the waves impacting it."""
        self.used = 0
        self.closed = 0
        """Waves that take no more hosts: full, or holding a solo host."""
        self.sizes: list[int] = []

    def place(self, host: int, earliest: int) -> int:
        """Put `host` in the first wave from `earliest` on that it may join; return that wave."""
        layers = self.fleet.host_layers[host]
        layer_set, set_waves, layer_waves = self.fleet.layer_set, self.set_waves, self.layer_waves
        solo = self.fleet.solo[host]
        # A solo host needs an empty wave; another host, one with room that impacts none of its
        # sets in another UD (the set's waves minus its layer's waves).
        taken = (self.used if solo else self.closed) | ((1 << earliest) - 1)
        if not solo:
            for layer in layers:
                taken |= set_waves[layer_set[layer]] ^ layer_waves[layer]
        bit = ~taken & (taken + 1)
        for layer in layers:
            set_waves[layer_set[layer]] |= bit
            layer_waves[layer] |= bit
        wave = bit.bit_length() - 1
        if wave == len(self.sizes):
            self.sizes.append(0)
        self.sizes[wave] += 1
        self.used |= bit
        if solo or self.sizes[wave] >= self.capacity:
            self.closed |= bit
        return wave


def _assign(
    fleet: _Fleet, order: _Condensation, max_hosts_in_flight: int, rank: Sequence[int]
) -> list[int]:
    """The wave of each host: components in a topological order of the condensation (ready ones
    by earliest allowed wave, then longest remaining path, then first host), each starting one
    wave after the last of everything before it; within one, hosts by `rank`, first-fit. Free
    hosts go last and fill the gaps."""
    filler = _WaveFiller(fleet, max_hosts_in_flight)
    wave_of = [-1] * len(fleet.names)
    after = [-1] * len(order.comp_hosts)  # per component: last wave of all it must follow
    pending = list(order.n_predecessors)
    barriers: list[int] = []
    ready: list[tuple[int, int, int, int]] = []

    def release(c: int) -> None:
        hosts = order.comp_hosts[c]
        if not hosts:
            barriers.append(c)
        elif not order.free[hosts[0]]:
            heapq.heappush(ready, (after[c] + 1, -order.height[c], hosts[0], c))

    for c, count in enumerate(pending):
        if count == 0:
            release(c)
    while barriers or ready:
        if barriers:
            c = barriers.pop()
            last = after[c]
        else:
            earliest, _, _, c = heapq.heappop(ready)
            last = after[c]
            for host in sorted(order.comp_hosts[c], key=rank.__getitem__):
                wave_of[host] = filler.place(host, earliest)
                last = max(last, wave_of[host])
        for s in order.successors[c]:
            after[s] = max(after[s], last)
            pending[s] -= 1
            if pending[s] == 0:
                release(s)
    for host, free in enumerate(order.free):
        if free:
            wave_of[host] = filler.place(host, 0)
    return wave_of


# ---------------------------------------------------------------- checking


def _problems(
    fleet: _Fleet,
    order: _Condensation,
    wave_of: Sequence[int],
    n_waves: int,
    max_hosts_in_flight: int,
    allow_placement_violations: bool,
) -> list[str]:
    """The rules broken by putting each host of `fleet` in wave `wave_of[host]` of `n_waves`."""
    problems: list[str] = []
    names = fleet.names
    sizes = [0] * n_waves
    for host, wave in enumerate(wave_of):
        if not 0 <= wave < n_waves:
            problems.append(f"host {names[host]} is in no wave")
        else:
            sizes[wave] += 1
    problems += [f"wave {w} is empty" for w, size in enumerate(sizes) if size == 0]
    problems += [
        f"wave {w} has {size} hosts, more than {max_hosts_in_flight} in flight"
        for w, size in enumerate(sizes)
        if size > max_hosts_in_flight
    ]
    if problems:
        return problems
    n_sets = len(fleet.set_layers)
    impacted: dict[int, int] = {}  # wave * n_sets + set -> the first layer seen there
    for host, layers in enumerate(fleet.host_layers):
        wave = wave_of[host]
        if fleet.solo[host]:
            if not allow_placement_violations:
                problems.append(f"host {names[host]} carries two UDs of a set (not allowed)")
            elif sizes[wave] > 1:
                problems.append(
                    f"host {names[host]} carries two UDs of a set, not alone in wave {wave}"
                )
            continue
        for layer in layers:
            set_id = fleet.layer_set[layer]
            other = impacted.setdefault(wave * n_sets + set_id, layer)
            if other != layer:
                first = next(h for h in fleet.layer_hosts[other] if wave_of[h] == wave)
                problems.append(
                    f"wave {wave} impacts UDs {fleet.layer_ud[other]} and {fleet.layer_ud[layer]} "
                    f"of set {fleet.set_names[set_id]} (hosts {names[first]}, {names[host]})"
                )
    return problems + _order_problems(fleet, order, wave_of)


def _order_problems(fleet: _Fleet, order: _Condensation, wave_of: Sequence[int]) -> list[str]:
    """Rule 3: every component starts after the last wave of everything that must precede it."""
    problems: list[str] = []
    n_comp = len(order.comp_hosts)
    before = [-1] * n_comp
    witness = [-1] * n_comp
    for c in reversed(range(n_comp)):
        last, last_host = before[c], witness[c]
        hosts = order.comp_hosts[c]
        if hosts:
            first = min(hosts, key=wave_of.__getitem__)
            if wave_of[first] <= before[c]:
                problems.append(
                    f"host {fleet.names[first]} (wave {wave_of[first]}) must come after "
                    f"host {fleet.names[witness[c]]} (wave {before[c]}): UD order"
                )
            latest = max(hosts, key=wave_of.__getitem__)
            if wave_of[latest] > last:
                last, last_host = wave_of[latest], latest
        for s in order.successors[c]:
            if last > before[s]:
                before[s], witness[s] = last, last_host
    return problems
