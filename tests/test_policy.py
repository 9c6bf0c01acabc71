"""The reallocation policy as a pure function of gate values."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l1ra_lite.l1ra.policy import plan_reallocation

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
