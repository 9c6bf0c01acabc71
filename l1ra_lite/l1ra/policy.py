"""Which ranks to prune and where the freed ranks go: pure functions of what the
optimiser knows about each rank (no tensors, no model).

A rule looks at the evidence of every rank (its gate, its age, and how much the loss
depends on it) and says which ranks go (`cut`) and how much each adapter deserves more
(`priority`); `plan_moves` then turns that into a plan that keeps the budget exact:

1. cut the ranks the rule names, but never an adapter's last one: if all of its ranks
   are cut, it keeps the one with the highest score;
2. candidates = adapters that lost nothing, by priority, highest first (if there are
   none, all adapters in that order: the budget never shrinks);
3. hand out the freed ranks one at a time, round-robin over the candidates.

Rules:
- `paper_rule` (arXiv 2509.04884): cut every gate below the threshold eta_c * lambda;
  priority = the adapter's smallest gate.
- `relative_gate_rule` (for comparison, in bench/realloc_replay.py): cut gates below a
  fraction of their adapter's largest gate.
- `importance_rule` (ours): score = c^2 * F, F the running mean of the gate's squared
  gradient (a Fisher estimate of the loss curvature along c). To second order, removing
  rank i raises the loss by about c_i^2 F_i / 2; unlike the gate alone, the score does
  not change when c and B trade scale (c -> a c, B -> B / a), so it measures the rank,
  not the parametrisation. Cut the dead gates (below the threshold) and the ranks whose
  score is far below the median, at most `max_moves` an event, never a rank younger
  than `grace` steps (its B starts at zero and has not learned yet); priority = the
  adapter's smallest score among its grown-up ranks.
"""

from __future__ import annotations

import statistics
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


@dataclass(frozen=True)
class RankEvidence:
    """What the optimiser knows of one adapter's ranks, one entry per rank."""

    gate: Sequence[float]
    fisher: Sequence[float]  # running mean of the gate's squared gradient (bias-corrected)
    age: Sequence[int]  # optimiser steps the rank has lived


@dataclass(frozen=True)
class Verdict:
    """A rule's answer: per adapter, per rank, whether it goes and its score (the
    higher, the more it matters); per adapter, its priority for new ranks."""

    scores: tuple[tuple[float, ...], ...]
    cut: tuple[tuple[bool, ...], ...]
    priority: tuple[float, ...]


def plan_moves(verdict: Verdict) -> ReallocationPlan:
    scores, cut = verdict.scores, verdict.cut
    if any(len(s) == 0 for s in scores):
        raise ValueError("every adapter must have at least one rank")
    keep = []
    for s, c in zip(scores, cut):
        kept = tuple(j for j in range(len(s)) if not c[j])
        keep.append(kept or (max(range(len(s)), key=lambda j: s[j]),))  # never zero ranks
    spare = sum(len(s) - len(k) for s, k in zip(scores, keep))
    by_priority = sorted(range(len(scores)), key=lambda i: (-verdict.priority[i], i))
    candidates = [i for i in by_priority if len(keep[i]) == len(scores[i])] or by_priority
    added = [0] * len(scores)
    for n in range(spare):
        added[candidates[n % len(candidates)]] += 1
    return ReallocationPlan(tuple(len(s) for s in scores), tuple(keep), tuple(added))


def paper_rule(evidence: Sequence[RankEvidence], threshold: float) -> Verdict:
    gates = [tuple(e.gate) for e in evidence]
    return Verdict(
        tuple(gates), tuple(tuple(g < threshold for g in gs) for gs in gates), tuple(min(gs) for gs in gates)
    )


def plan_reallocation(gates: Sequence[Sequence[float]], threshold: float) -> ReallocationPlan:
    """The paper's rule on gate values alone."""
    evidence = [RankEvidence(g, [0.0] * len(g), [0] * len(g)) for g in gates]
    return plan_moves(paper_rule(evidence, threshold))


def importance_rule(
    evidence: Sequence[RankEvidence], threshold: float, ratio: float = 0.05, max_moves: int = 8, grace: int = 10
) -> Verdict:
    """Cut gates below `threshold`, and the ranks scoring below `ratio` x the median
    score of all grown-up ranks: the lowest scores first, `max_moves` at most."""
    scores = tuple(tuple(g * g * f for g, f in zip(e.gate, e.fisher)) for e in evidence)
    grown = [[e.age[j] >= grace for j in range(len(e.gate))] for e in evidence]
    pool = [s for ss, gs in zip(scores, grown) for s, g in zip(ss, gs) if g]
    line = ratio * statistics.median(pool) if pool else 0.0
    dead = [(i, j) for i, e in enumerate(evidence) for j, g in enumerate(e.gate) if g < threshold]
    weak = sorted(
        (
            (scores[i][j], i, j)
            for i, e in enumerate(evidence)
            for j in range(len(e.gate))
            if grown[i][j] and scores[i][j] < line and e.gate[j] >= threshold
        )
    )
    chosen = set(dead) | {(i, j) for _, i, j in weak[: max(0, max_moves - len(dead))]}
    cut = tuple(tuple((i, j) in chosen for j in range(len(e.gate))) for i, e in enumerate(evidence))
    priority = tuple(min((s for s, g in zip(ss, gs) if g), default=0.0) for ss, gs in zip(scores, grown))
    return Verdict(scores, cut, priority)


def relative_gate_rule(evidence: Sequence[RankEvidence], threshold: float, fraction: float = 0.1) -> Verdict:
    """Cut gates below `threshold` or below `fraction` x their adapter's largest gate."""
    gates = [tuple(e.gate) for e in evidence]
    cut = tuple(tuple(g < max(threshold, fraction * max(gs)) for g in gs) for gs in gates)
    return Verdict(tuple(gates), cut, tuple(min(gs) / max(max(gs), 1e-12) for gs in gates))
