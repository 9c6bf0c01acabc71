"""The rank of every adapter now, and the history of how it got there.

This is the record that the dashboard, `inspect`, checkpoints and `ranks.json` read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ReallocationRecord:
    step: int
    pruned: dict[str, int]  # module path -> ranks removed (modules that lost some)
    added: dict[str, int]  # module path -> ranks added (modules that gained some)
    ranks: dict[str, int]  # module path -> rank after the event (every module)
    budget: int


@dataclass
class RankState:
    budget: int
    ranks: dict[str, int]  # module path -> current rank
    history: list[ReallocationRecord] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.ranks.values())

    def record(
        self, step: int, pruned: dict[str, int], added: dict[str, int], ranks: dict[str, int]
    ) -> ReallocationRecord:
        self.ranks = dict(ranks)
        event = ReallocationRecord(step, dict(pruned), dict(added), dict(ranks), self.budget)
        self.history.append(event)
        return event

    def to_json(self) -> dict[str, Any]:
        """The `ranks.json` form: budget, ranks, history (step, pruned, added, ranks)."""
        return {
            "budget": self.budget,
            "total_rank": self.total,
            "ranks": dict(self.ranks),
            "history": [{k: v for k, v in asdict(e).items() if k != "budget"} for e in self.history],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RankState":
        budget = int(data["budget"])
        history = [
            ReallocationRecord(int(e["step"]), dict(e["pruned"]), dict(e["added"]), dict(e["ranks"]), budget)
            for e in data.get("history", [])
        ]
        return cls(budget, {k: int(v) for k, v in data["ranks"].items()}, history)


def ranks_before_moves(state: RankState) -> dict[str, int]:
    """The ranks the run started with: before its first reallocation, or now if none."""
    if not state.history:
        return dict(state.ranks)
    first = state.history[0]
    return {p: r - first.added.get(p, 0) + first.pruned.get(p, 0) for p, r in first.ranks.items()}


def describe_moves(before: dict[str, int], after: dict[str, int], budget: int) -> str:
    """ "84 of 840 ranks moved: up +30, gate +24 ... from k -41, q -27 ...": the net change
    per module type ('_proj' left out), gains first, largest first; "" when none moved."""
    net: dict[str, int] = {}
    for path, rank in after.items():
        kind = path.rsplit(".", 1)[-1].removesuffix("_proj")
        net[kind] = net.get(kind, 0) + rank - before.get(path, rank)
    moved = sum(max(0, after[p] - before.get(p, after[p])) for p in after)
    if not moved:
        return ""
    gains = ", ".join(f"{k} +{v}" for k, v in sorted(net.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0)
    losses = ", ".join(f"{k} {v}" for k, v in sorted(net.items(), key=lambda kv: (kv[1], kv[0])) if v < 0)
    within = " (within module types)" if not gains else ""
    return f"{moved} of {budget} ranks moved{within}" + (f": {gains} from {losses}" if gains else "")
