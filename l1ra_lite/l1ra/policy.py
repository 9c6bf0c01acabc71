"""Which ranks to prune and where the freed budget goes: a pure function of the gates.

DESIGN.md section 2, "Reallocation":
1. note each adapter's smallest gate (before pruning);
2. prune every rank whose gate is below the threshold, but never an adapter's last
   one: if all of its gates are below, keep the largest;
3. candidates = adapters that pruned nothing, by smallest gate, largest first (if
   there are none, all adapters in that order: the budget never shrinks);
4. hand out the freed budget one rank at a time, round-robin over the candidates.

The budget is counted in `costs` (cost of one rank of each adapter). With the default
cost of 1 it is a rank budget, conserved exactly. With other costs (e.g. parameters per
rank, for a fixed adapter memory) a candidate takes a rank only while its cost fits in
what is left, and what no candidate can take is reported as `unspent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ReallocationPlan:
    old_ranks: tuple[int, ...]  # per adapter: ranks before
    keep: tuple[tuple[int, ...], ...]  # per adapter: indices of the ranks kept, ascending
    added: tuple[int, ...]  # per adapter: ranks added
    unspent: float = 0.0  # freed budget no candidate could take (0 with unit costs)

    @property
    def pruned(self) -> tuple[int, ...]:
        return tuple(old - len(k) for old, k in zip(self.old_ranks, self.keep))

    @property
    def new_ranks(self) -> tuple[int, ...]:
        return tuple(len(k) + a for k, a in zip(self.keep, self.added))


def plan_reallocation(
    gates: Sequence[Sequence[float]],
    threshold: float,
    costs: Optional[Sequence[float]] = None,
) -> ReallocationPlan:
    """gates[i] are adapter i's gate values; costs[i] the cost of one of its ranks."""
    if any(len(g) == 0 for g in gates):
        raise ValueError("every adapter must have at least one rank")
    costs = [1.0] * len(gates) if costs is None else list(costs)
    min_gate = [min(g) for g in gates]

    keep = []
    spare = 0.0
    for g, cost in zip(gates, costs):
        kept = [j for j, value in enumerate(g) if value >= threshold]
        if not kept:  # never zero ranks: keep the strongest
            kept = [max(range(len(g)), key=lambda j: g[j])]
        keep.append(tuple(kept))
        spare += (len(g) - len(kept)) * cost

    by_min_gate = sorted(range(len(gates)), key=lambda i: (-min_gate[i], i))
    candidates = [i for i in by_min_gate if len(keep[i]) == len(gates[i])] or by_min_gate

    added = [0] * len(gates)
    while candidates:
        affordable = [i for i in candidates if costs[i] <= spare + 1e-9]
        if not affordable:
            break
        for i in affordable:
            if costs[i] <= spare + 1e-9:
                added[i] += 1
                spare -= costs[i]
        candidates = affordable
    return ReallocationPlan(
        old_ranks=tuple(len(g) for g in gates),
        keep=tuple(keep),
        added=tuple(added),
        unspent=spare if spare > 1e-9 else 0.0,
    )
