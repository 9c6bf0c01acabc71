"""The L1RA method: gated low-rank adapters whose rank moves where the task needs it.

layer.py     the adapter layer  y = W x + s * B (c * (A x))
inject.py    put adapters on a causal LM's linear layers at a total rank budget
optim.py     the optimiser step: AdamW for A/B, Adam + L1 shrink for the gates c
policy.py    which ranks to prune and where the freed ones go (pure function)
realloc.py   apply a plan: physically resize A, B, c, gradients and optimiser state
rank_state.py  the current ranks and the history of reallocations
"""

from l1ra_lite.l1ra.inject import initial_ranks, inject_adapters
from l1ra_lite.l1ra.layer import L1RALinear
from l1ra_lite.l1ra.optim import L1RAOptimizer
from l1ra_lite.l1ra.policy import ReallocationPlan, plan_reallocation
from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord
from l1ra_lite.l1ra.realloc import reallocate

__all__ = [
    "L1RALinear",
    "L1RAOptimizer",
    "RankState",
    "ReallocationPlan",
    "ReallocationRecord",
    "inject_adapters",
    "initial_ranks",
    "plan_reallocation",
    "reallocate",
]
