"""Placement advice (``plan_placement``, DeepSeek EPLB's algorithm): the core against a sequential Python
reference of the same greedy rules, written here; the invariants of every plan; what the greedy packing does
and does not guarantee against the contiguous layout; errors; ``rank_loads``; ``LoadBalancer.suggest_placement``."""

from __future__ import annotations

import doctest
import pickle
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from conftest import needs_real_router

# ---------------------------------------------------------------------------------------------- the reference


def ref_total(load) -> List[float]:
    """[E] or [layers, E] -> [E], summed from 0.0 in layer order."""
    rows = np.asarray(load, dtype=np.float64)
    rows = rows[None] if rows.ndim == 1 else rows
    total = [0.0] * rows.shape[1]
    for row in rows:
        for e, x in enumerate(row.tolist()):
            total[e] += x
    return total


def ref_replicate(load: Sequence[float], experts: Sequence[int], slots: int, cap: int) -> List[int]:
    """One copy each, then each further slot to the highest load per copy (ties: lower id), below ``cap`` copies."""
    copies = [1] * len(experts)
    for _ in range(slots - len(experts)):
        best: Optional[int] = None
        for i, e in enumerate(experts):  # ascending ids: the first maximum is the lower id
            if copies[i] < cap and (best is None or load[e] / copies[i] > load[experts[best]] / copies[best]):
                best = i
        assert best is not None
        copies[best] += 1
    return copies


def ref_pack(items: Sequence[Tuple[int, float]], bins: int, per_bin: int, swaps: Optional[list] = None) -> List[List[int]]:
    """Items in the given order, each to the lightest non-full bin without its key (ties: lower bin); when every
    non-full bin has the key, it goes to the lightest bin without it, whose lightest item (ties: lower key) that
    the lightest non-full bin lacks moves to that non-full bin."""
    held: List[List[Tuple[int, float]]] = [[] for _ in range(bins)]
    load = [0.0] * bins

    def keys(b):
        return [k for k, _ in held[b]]

    for key, w in items:
        open_bins = [b for b in range(bins) if len(held[b]) < per_bin]
        free = [b for b in open_bins if key not in keys(b)]
        if free:
            b = min(free, key=lambda b: (load[b], b))
            held[b].append((key, w))
            load[b] += w
            continue
        stuck = min(open_bins, key=lambda b: (load[b], b))
        full = min((b for b in range(bins) if key not in keys(b)), key=lambda b: (load[b], b))
        i = min((i for i, (k, _) in enumerate(held[full]) if k not in keys(stuck)),
                key=lambda i: (held[full][i][1], held[full][i][0]))
        out_key, out_w = held[full][i]
        held[full][i] = (key, w)
        load[full] = load[full] - out_w + w
        held[stuck].append((out_key, out_w))
        load[stuck] += out_w
        if swaps is not None:
            swaps.append((key, stuck, full, out_key))
    assert all(len(h) == per_bin for h in held)
    return [keys(b) for b in range(bins)]


def ref_plan(load, num_ranks, num_replicas=None, num_nodes=1, num_groups=None, swaps=None):
    """(physical [P], rank loads after [R], contiguous rank loads [R] or None), sequentially."""
    w = ref_total(load)
    E, R, N = len(w), num_ranks, num_nodes
    P = E if num_replicas is None else num_replicas
    G = E if num_groups is None else num_groups
    if N == 1:
        nodes = [list(range(E))]
    else:
        size = E // G
        group_load = []
        for g in range(G):
            s = 0.0
            for x in w[g * size:(g + 1) * size]:
                s += x
            group_load.append((g, s))
        order = sorted(group_load, key=lambda t: -t[1])
        nodes = [[e for g in sorted(gs) for e in range(g * size, (g + 1) * size)] for gs in ref_pack(order, N, G // N)]
    per_rank, ranks_per_node = P // R, R // N
    physical: List[int] = []
    for experts in nodes:
        copies = ref_replicate(w, experts, P // N, ranks_per_node)
        items = [(e, w[e] / c) for e, c in zip(experts, copies) for _ in range(c)]
        items.sort(key=lambda t: -t[1])
        for held in ref_pack(items, ranks_per_node, per_rank, swaps):
            physical.extend(sorted(held))
    count = [physical.count(e) for e in range(E)]
    after = []
    for r in range(R):
        s = 0.0
        for e in sorted(physical[r * per_rank:(r + 1) * per_rank]):
            s += w[e] / count[e]
        after.append(s)
    before = None
    if E % R == 0:
        before = []
        for r in range(R):
            s = 0.0
            for x in w[r * E // R:(r + 1) * E // R]:
                s += x
            before.append(s)
    return physical, after, before


def ref_imbalance(rank_load):
    total = sum(rank_load)
    return 1.0 if total <= 0 else max(rank_load) / (total / len(rank_load))


# ---------------------------------------------------------------------------------------------- problems


@st.composite
def placement_problems(draw, max_ranks_per_node=4, max_nodes=3):
    """(load [E] or [L, E], R, P or None, N, G or None) with a valid placement."""
    nodes = draw(st.integers(1, max_nodes))
    ranks = nodes * draw(st.integers(1, max_ranks_per_node))
    groups = nodes * draw(st.integers(1, 4))
    experts = groups * draw(st.integers(1, 4))
    per_rank = draw(st.integers(-(-experts // ranks), experts // nodes))
    replicas = ranks * per_rank
    if replicas == experts and draw(st.booleans()):
        replicas = None
    group_arg = groups if nodes > 1 or draw(st.booleans()) else None
    if nodes > 1 and draw(st.booleans()):
        group_arg = None  # every expert its own group
    kind = draw(st.sampled_from(["int", "float", "ties"]))
    layers = draw(st.sampled_from([0, 0, 1, 3]))  # 0: a 1-D load
    n = experts * max(layers, 1)
    if kind == "int":
        values = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    elif kind == "ties":
        values = draw(st.lists(st.sampled_from([0, 1, 2, 4]), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=n, max_size=n))
    load = np.array(values, dtype=np.float64)
    if layers:
        load = load.reshape(layers, experts)
    return load, ranks, replicas, nodes, group_arg


def plan_of(problem):
    load, R, P, N, G = problem
    return mr.plan_placement(load, R, num_replicas=P, num_nodes=N, num_groups=G)


# ---------------------------------------------------------------------------------------------- the core = the reference


@settings(deadline=None, max_examples=400)
@given(placement_problems())
def test_the_core_equals_the_sequential_reference(problem):
    load, R, P, N, G = problem
    placement = plan_of(problem)
    physical, after, before = ref_plan(load, R, P, N, G)
    assert placement.physical.tolist() == physical
    assert placement.rank_load_after.tolist() == after
    assert placement.imbalance_after == ref_imbalance(after)
    if before is None:
        assert placement.rank_load_before is None and placement.imbalance_before is None
    else:
        assert placement.rank_load_before.tolist() == before
        assert placement.imbalance_before == ref_imbalance(before)
    assert placement.planned_load.tolist() == ref_total(load)


@settings(deadline=None, max_examples=400)
@given(placement_problems())
def test_every_plan_is_a_valid_balanced_layout(problem):
    load, R, P, N, G = problem
    placement = plan_of(problem)
    w = np.asarray(ref_total(load))
    E = w.size
    P = E if P is None else P
    counts = placement.replica_counts
    assert (counts >= 1).all() and counts.sum() == P, "every expert placed, copies fill the slots"
    assert counts.max() <= R // N, "at most one copy per rank of the node"
    per = P // R
    for r in range(R):
        local = placement.local_experts(r)
        assert len(local) == per, "an equal number of physical experts per rank"
        assert len(set(local.tolist())) == per, "no rank holds an expert twice"
    assert mr.ExpertPlacement.from_physical(placement.physical, R, num_experts=E) == placement
    np.testing.assert_array_equal(placement.rank_load_after, placement.rank_loads(load))
    assert placement.rank_load_after.sum() == pytest.approx(w.sum(), rel=1e-12, abs=1e-9)
    # the best any placement of these copies can do
    assert placement.rank_load_after.max() >= (w / counts).max() * (1 - 1e-12)
    assert placement.rank_load_after.max() >= w.sum() / R * (1 - 1e-12)
    if N > 1:
        size = E // (G or E)
        for e in range(E):
            node = {r // (R // N) for r in placement.expert_ranks[e]}
            group_home = {r // (R // N) for x in range(e - e % size, e - e % size + size)
                          for r in placement.expert_ranks[x]}
            assert len(node) == 1 and node == group_home, "copies and whole groups stay on one node"
    else:
        # more load never gets fewer copies (replication by highest load per copy)
        order = np.argsort(-w, kind="stable")
        assert all(counts[a] >= counts[b] for a, b in zip(order, order[1:]) if w[a] > w[b])


@settings(deadline=None, max_examples=300)
@given(placement_problems(max_nodes=1))
def test_greedy_packing_is_no_worse_than_contiguous_where_that_is_guaranteed(problem):
    """With no replicas and at most two experts per rank, the greedy packing is the optimal pairing (heaviest
    with lightest: the first R go one per rank, then each next-heaviest fills the lightest rank), so it is never
    worse than the contiguous layout; with one expert per rank both are permutations and equal."""
    load, R, P, N, G = problem
    E = np.asarray(load).shape[-1]
    if (P not in (None, E)) or E // R > 2 or E % R:
        return
    placement = plan_of(problem)
    assert placement.rank_load_after.max() <= placement.rank_load_before.max()
    if E == R:
        assert placement.rank_load_after.max() == placement.rank_load_before.max()


@pytest.mark.parametrize("load, R, P, after, before", [
    ([6, 6, 8, 2, 8, 9], 2, None, 21.0, 20.0),  # three experts per rank: greedy 9+6+6 / 8+8+2, contiguous 20 / 19
    ([2, 8, 1, 9], 2, 6, 10.5, 10.0),           # replicas of 9 and 8, packed 4.5+4+2 / 4.5+4+1
])
def test_greedy_can_be_worse_than_contiguous_beyond_that(load, R, P, after, before):
    placement = mr.plan_placement(load, R, num_replicas=P)
    assert placement.rank_load_after.max() == after and placement.rank_load_before.max() == before
    assert placement.imbalance_after > placement.imbalance_before


def test_the_repair_swap_matches_the_reference():
    """A load (found by a random search with the reference) where a copy of expert 6 finds every open rank
    already holding expert 6: it goes to the full rank without it, whose lightest copy of an expert the open
    rank lacks (expert 0) moves over."""
    load = [0.1, 0.1, 1.2, 5.9, 0.1, 0.2, 0.2, 1.0, 0.3, 0.7, 0.2]
    swaps: list = []
    physical, after, _ = ref_plan(load, 2, 18, swaps=swaps)
    assert swaps == [(6, 0, 1, 0)]
    placement = mr.plan_placement(load, 2, num_replicas=18)
    assert placement.physical.tolist() == physical and placement.rank_load_after.tolist() == after
    assert all(len(set(placement.local_experts(r).tolist())) == 9 for r in range(2))


def test_known_plans():
    # 90 gets three copies (30 each), 40 and 40 two each: every rank expects 50
    p = mr.plan_placement([90, 10, 10, 10, 40, 40, 0, 0], num_ranks=4, num_replicas=12)
    assert p.replica_counts.tolist() == [3, 1, 1, 1, 2, 2, 1, 1]
    assert p.rank_load_after.tolist() == [50.0] * 4 and p.rank_load_before.tolist() == [100.0, 20.0, 80.0, 0.0]
    assert p.imbalance_before == 2.0 and p.imbalance_after == 1.0
    # one copy of each: a permutation of the experts onto ranks, heaviest first
    q = mr.plan_placement(np.array([1, 5, 3, 4]), 4)
    assert q.expert_ranks == [[3], [0], [2], [1]]
    # hierarchical: groups {0,1} {2,3} {4,5} {6,7}, loads 19 2 10 2 -> node 0 gets groups 0 and 3
    h = mr.plan_placement([10, 9, 1, 1, 5, 5, 2, 0], 4, num_replicas=12, num_nodes=2, num_groups=4)
    assert [sorted({r // 2 for r in ranks}) for ranks in h.expert_ranks] == [[0], [0], [1], [1], [1], [1], [0], [0]]
    # [layers, E] is planned on the sum over layers
    two = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]])
    assert mr.plan_placement(two, 2) == mr.plan_placement([1.5, 2.5, 3.5, 4.5], 2)
    assert mr.plan_placement(two, 2).planned_load.tolist() == [1.5, 2.5, 3.5, 4.5]
    # all-zero loads are balanced; E not a multiple of R has no contiguous figure
    z = mr.plan_placement(np.zeros(6), 4, num_replicas=8)
    assert z.imbalance_after == 1.0 and z.rank_load_before is None and z.imbalance_before is None
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(mr.plan_placement, "plan_placement", globs={}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_planning_figures_are_not_part_of_the_layout():
    p = mr.plan_placement([5, 1, 1, 1], 2, num_replicas=6)
    same = mr.ExpertPlacement.from_physical(p.physical, 2)
    assert same == p and hash(same) == hash(p) and same.imbalance_after is None and same.planned_load is None
    back = pickle.loads(pickle.dumps(p))
    assert back == p and back.imbalance_after is None
    assert "imbalance_after=" in repr(p) and "imbalance" not in repr(same)


def test_rank_loads_of_any_placement():
    p = mr.ExpertPlacement(4, 2, mapping=[0, 0, 1, 1], replicas={0: [1]})
    assert p.rank_loads([8, 1, 2, 3]).tolist() == [4.0 + 1.0, 4.0 + 2.0 + 3.0]
    assert p.rank_loads(np.array([[8, 1, 2, 3], [0, 1, 0, 0]])).tolist() == [4.0 + 2.0, 9.0]
    assert mr.ExpertPlacement(3, 2, mapping=[0, 1, 1]).physical is None  # unequal ranks have no phy2log
    with pytest.raises(mr.InputError, match="expert_load"):
        p.rank_loads([1, 2, 3])
    with pytest.raises(mr.InputError, match=r"expert_load\[2\]"):
        p.rank_loads([1, 2, np.nan, 3])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(expert_load=[1, -1, 0, 0], num_ranks=2), mr.InputError, r"expert_load\[1\] is -1"),
    (dict(expert_load=[[1, 1], [np.nan, 1]], num_ranks=2), mr.InputError, r"expert_load\[1, 0\] is NaN"),
    (dict(expert_load=[1, np.inf], num_ranks=2), mr.InputError, r"expert_load\[1\] is inf"),
    (dict(expert_load=[1e308, 1e308], num_ranks=2), mr.InputError, "expert_load's total"),
    (dict(expert_load=[], num_ranks=1), mr.InputError, "expert_load has shape"),
    (dict(expert_load=np.ones((2, 2, 2)), num_ranks=1), mr.InputError, "expert_load has shape"),
    (dict(expert_load=[True, False], num_ranks=1), TypeError, "expert_load"),
    (dict(expert_load=["a", "b"], num_ranks=1), TypeError, "expert_load"),
    (dict(expert_load=[1, 2], num_ranks=0), mr.ConfigError, "num_ranks"),
    (dict(expert_load=[1, 2], num_ranks=-1), mr.ConfigError, "num_ranks"),
    (dict(expert_load=[1, 2], num_ranks=1.5), mr.ConfigError, "num_ranks"),
    (dict(expert_load=[1, 2, 3], num_ranks=2), mr.ConfigError, "num_replicas.*multiple of num_ranks"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=2, num_replicas=2), mr.ConfigError, "num_replicas"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=2, num_replicas=7), mr.ConfigError, "num_replicas.*multiple"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=2, num_replicas=10), mr.ConfigError, "num_replicas.*at most one copy"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=4, num_replicas=12, num_nodes=2), mr.ConfigError, "num_replicas"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=2, num_replicas=2 ** 25), mr.ConfigError, "num_replicas"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=4, num_nodes=3), mr.ConfigError, "num_nodes"),
    (dict(expert_load=[1, 2, 3, 4], num_ranks=4, num_nodes=0), mr.ConfigError, "num_nodes"),
    (dict(expert_load=[1] * 6, num_ranks=4, num_replicas=8, num_nodes=4), mr.ConfigError, "num_nodes"),
    (dict(expert_load=[1] * 6, num_ranks=2, num_nodes=2, num_groups=3), mr.ConfigError, "num_groups"),
    (dict(expert_load=[1] * 6, num_ranks=2, num_groups=4), mr.ConfigError, "num_groups"),
    (dict(expert_load=[1] * 6, num_ranks=2, num_groups=0), mr.ConfigError, "num_groups"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        mr.plan_placement(**kwargs)


# ---------------------------------------------------------------------------------------------- the balancer


def test_suggest_placement_plans_on_the_ema_load():
    lb = mr.LoadBalancer(8, ema_decay=0.5)
    with pytest.raises(mr.InputError, match="no load observed"):
        lb.suggest_placement(4)
    lb.update(np.array([50, 10, 10, 10, 5, 5, 5, 5]))
    lb.update(np.array([30, 30, 10, 10, 5, 5, 5, 5]))
    got = lb.suggest_placement(4, num_replicas=12)
    want = mr.plan_placement(lb.expert_loads, 4, num_replicas=12)
    assert got == want and got.planned_load.tolist() == lb.expert_loads.tolist()
    assert got.rank_load_after.sum() == pytest.approx(1.0)
    h = lb.suggest_placement(4, num_replicas=16, num_nodes=2, num_groups=4)
    assert h == mr.plan_placement(lb.expert_loads, 4, num_replicas=16, num_nodes=2, num_groups=4)
    with pytest.raises(mr.ConfigError, match="num_replicas"):
        lb.suggest_placement(3)


# ---------------------------------------------------------------------------------------------- real data


@needs_real_router
@pytest.mark.parametrize("experts, k", [(64, 2), (256, 8)])
def test_real_loads_plan_better_than_contiguous(real_logits, experts, k):
    """On the skewed real loads the plan lowers the busiest rank's load, and replicas lower it further."""
    for layer in ("minilm_l3.npz", "minilm_l5.npz"):
        dec = mr.route_logits(real_logits(layer, experts),
                              mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=None))
        load = dec.tokens_per_expert
        for R in (4, 8, 16):
            plain = mr.plan_placement(load, R)
            replicated = mr.plan_placement(load, R, num_replicas=experts + R)
            physical, after, before = ref_plan(load, R, experts + R)
            assert replicated.physical.tolist() == physical and replicated.rank_load_after.tolist() == after
            assert plain.imbalance_after < plain.imbalance_before
            assert replicated.imbalance_after <= plain.imbalance_after
