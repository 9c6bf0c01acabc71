"""The reallocation policy as a pure function of gate values."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l1ra_lite.l1ra.policy import RankEvidence, importance_rule, plan_moves, plan_reallocation

T = 0.01


def test_prunes_below_threshold_and_gives_to_unpruned_adapters_by_min_gate():
    gates = [
        [1.0, 0.001, 0.5],  # prunes one
        [0.9, 0.8],  # candidate, min 0.8
        [0.95, 0.99],  # candidate, min 0.95: served first
    ]
    plan = plan_reallocation(gates, T)
    assert plan.keep == ((0, 2), (0, 1), (0, 1))
    assert plan.pruned == (1, 0, 0)
    assert plan.added == (0, 0, 1)
    assert plan.new_ranks == (2, 2, 3)


def test_round_robin_over_candidates():
    gates = [[0.0, 0.0, 0.0, 0.5], [0.9], [0.7], [0.8]]
    plan = plan_reallocation(gates, T)
    # 3 spare ranks, candidates by min gate: adapter 1 (0.9), 3 (0.8), 2 (0.7)
    assert plan.added == (0, 1, 1, 1)
    gates = [[0.0] * 6 + [0.5], [0.9], [0.7]]
    assert plan_reallocation(gates, T).added == (0, 3, 3)


def test_an_adapter_never_drops_to_zero_ranks():
    plan = plan_reallocation([[0.001, 0.005, 0.002], [0.9]], T)
    assert plan.keep[0] == (1,)  # the largest gate survives
    assert plan.new_ranks == (1, 3)


def test_no_candidate_still_conserves_the_budget():
    # Every adapter prunes something: the spare ranks go to all adapters by min gate.
    gates = [[0.5, 0.0], [0.9, 0.0], [0.2, 0.0]]
    plan = plan_reallocation(gates, T)
    assert sum(plan.new_ranks) == 6
    assert plan.added == (1, 1, 1)
    # The min gate is taken before pruning, so ties go by index.
    assert plan_reallocation([[0.5, 0.0, 0.0], [0.9, 0.0]], T).added == (2, 1)


def test_nothing_to_prune_changes_nothing():
    plan = plan_reallocation([[0.5, 0.6], [1.0]], T)
    assert plan.keep == ((0, 1), (0,)) and plan.added == (0, 0)


def test_empty_adapter_is_rejected():
    with pytest.raises(ValueError):
        plan_reallocation([[]], T)


gate_lists = st.lists(
    st.lists(st.one_of(st.just(0.0), st.floats(0, 1)), min_size=1, max_size=6), min_size=1, max_size=12
)


@settings(max_examples=200, deadline=None)
@given(gate_lists)
def test_budget_is_conserved_and_no_adapter_is_empty(gates):
    plan = plan_reallocation(gates, T)
    assert sum(plan.new_ranks) == sum(len(g) for g in gates)
    assert all(r >= 1 for r in plan.new_ranks)
    for g, keep in zip(gates, plan.keep):
        assert all(g[j] >= T for j in keep) or len(keep) == 1
        assert sorted(keep) == list(keep)


@settings(max_examples=50, deadline=None)
@given(gate_lists, st.integers(1, 8))
def test_budget_is_conserved_over_a_sequence_of_reallocations(gates, rounds):
    import random

    rng = random.Random(len(gates) * 31 + rounds)
    budget = sum(len(g) for g in gates)
    for _ in range(rounds):
        plan = plan_reallocation(gates, T)
        assert sum(plan.new_ranks) == budget and min(plan.new_ranks) >= 1
        # The kept gates survive, new ranks start at 1, then training moves them.
        gates = [[g[j] for j in keep] + [1.0] * n for g, keep, n in zip(gates, plan.keep, plan.added)]
        gates = [[rng.choice([0.0, rng.random(), 1.0]) for _ in g] for g in gates]


# ---------------------------------------------------------------- the importance rule


def evidence(gates, fishers, ages=None):
    return [RankEvidence(g, f, a or [100] * len(g)) for g, f, a in zip(gates, fishers, ages or [None] * len(gates))]


def test_importance_does_not_change_when_gate_and_b_trade_scale():
    """c -> a c with B -> B / a leaves the function alone and scales dL/dc by 1/a, so the
    Fisher F by 1/a^2: the score c^2 F, and the verdict, stay the same."""
    gates, fishers = [[0.5, 0.9, 0.2], [1.0, 0.3]], [[4.0, 0.01, 30.0], [2.0, 9.0]]
    a = [0.25, 2.0]
    scaled_gates = [[g * a[i] for g in gs] for i, gs in enumerate(gates)]
    scaled_fishers = [[f / a[i] ** 2 for f in fs] for i, fs in enumerate(fishers)]
    one = importance_rule(evidence(gates, fishers), threshold=1e-4, ratio=0.5)
    two = importance_rule(evidence(scaled_gates, scaled_fishers), threshold=1e-4, ratio=0.5)
    assert one.cut == two.cut and one.priority == pytest.approx(two.priority)
    flat = lambda scores: [x for row in scores for x in row]  # noqa: E731
    assert flat(one.scores) == pytest.approx(flat(two.scores))


def test_importance_cuts_ranks_far_below_the_median_and_gives_them_to_the_strongest_adapter():
    # adapter 0: one rank the loss ignores (score 1e-6); adapter 1: all strong; adapter 2: middling
    gates = [[1.0, 1.0, 1.0], [1.0, 1.0], [0.5, 0.5]]
    fishers = [[1.0, 1e-6, 1.0], [4.0, 4.0], [2.0, 2.0]]
    verdict = importance_rule(evidence(gates, fishers), threshold=1e-4, ratio=0.05)
    assert verdict.cut == ((False, True, False), (False, False), (False, False))
    plan = plan_moves(verdict)
    assert plan.pruned == (1, 0, 0) and plan.added == (0, 1, 0)  # adapter 1's weakest rank scores highest


def test_importance_spares_young_ranks_and_caps_the_moves():
    gates, fishers = [[1.0] * 6], [[1e-9] * 5 + [1.0]]
    ages = [[100, 100, 100, 3, 100, 100]]
    strong = [[1.0] * 6]  # a second adapter whose ranks all matter sets the median
    verdict = importance_rule(
        evidence(gates + strong, fishers + strong, ages + [[100] * 6]),
        threshold=1e-4,
        ratio=0.05,
        max_moves=2,
        grace=10,
    )
    cut = verdict.cut[0]
    assert sum(cut) == 2 and not cut[3] and not cut[5]


def test_dead_gates_always_go_whatever_the_cap():
    verdict = importance_rule(evidence([[0.0, 0.0, 0.0, 1.0], [1.0]], [[1.0] * 4, [1.0]]), threshold=1e-3, max_moves=1)
    assert verdict.cut[0] == (True, True, True, False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.floats(0, 1), st.floats(0, 10), st.integers(0, 50)), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    )
)
def test_the_importance_rule_conserves_the_budget_and_keeps_every_adapter(ranks):
    ev = [RankEvidence([g for g, _, _ in r], [f for _, f, _ in r], [a for _, _, a in r]) for r in ranks]
    plan = plan_moves(importance_rule(ev, threshold=0.01, ratio=0.2, max_moves=3, grace=5))
    assert sum(plan.new_ranks) == sum(len(r) for r in ranks) and min(plan.new_ranks) >= 1
