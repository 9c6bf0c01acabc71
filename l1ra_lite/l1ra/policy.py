"""Which ranks to prune and where the freed ranks go: a pure function of the gates.

The reallocation step of L1RA (README, "How L1RA is implemented here"):
1. note each adapter's smallest gate (before pruning);
2. prune every rank whose gate is below the threshold, but never an adapter's last
   one: if all of its gates are below, keep the largest;
3. candidates = adapters that pruned nothing, by smallest gate, largest first (if
   there are none, all adapters in that order: the budget never shrinks);
4. hand out the freed ranks one at a time, round-robin over the candidates.

The total rank is conserved exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ReallocationPlan:
    old_ranks: tuple[int, ...]  # per adapter: ranks before
    keep: tuple[tuple[int, ...], ...]  # per adapter: indices of the ranks kept, ascending
    added: tuple[int, ...]  # per adapter: ranks added

    @property
    def pruned(self) -> tuple[int, ...]:
        return tuple(old - len(k) for old, k in zip(self.old_ranks, self.keep))

    @property
    def new_ranks(self) -> tuple[int, ...]:
        return tuple(len(k) + a for k, a in zip(self.keep, self.added))


def plan_reallocation(gates: Sequence[Sequence[float]], threshold: float) -> ReallocationPlan:
    """gates[i] are adapter i's gate values."""
    if any(len(g) == 0 for g in gates):
        raise ValueError("every adapter must have at least one rank")
    min_gate = [min(g) for g in gates]

    keep = []
    spare = 0
    for g in gates:
        kept = [j for j, value in enumerate(g) if value >= threshold]
        if not kept:  # never zero ranks: keep the strongest
            kept = [max(range(len(g)), key=lambda j: g[j])]
        keep.append(tuple(kept))
        spare += len(g) - len(kept)

    by_min_gate = sorted(range(len(gates)), key=lambda i: (-min_gate[i], i))
    candidates = [i for i in by_min_gate if len(keep[i]) == len(gates[i])] or by_min_gate

    added = [0] * len(gates)
    for n in range(spare):  # round-robin
        added[candidates[n % len(candidates)]] += 1
    return ReallocationPlan(old_ranks=tuple(len(g) for g in gates), keep=tuple(keep), added=tuple(added))
