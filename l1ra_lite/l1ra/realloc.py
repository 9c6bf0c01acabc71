"""Apply a reallocation: physically resize A, B, c, their gradients and optimiser state.

Each parameter keeps its identity (the optimiser tracks the same nn.Parameter objects);
only its `.data`, `.grad` and state tensors are replaced by new, smaller or larger
tensors. Nothing keeps a reference to the old ones, so their memory is freed (on CUDA
it returns to the caching allocator: `memory_allocated` drops, `memory_reserved` may not).

Kept ranks keep their values and moments exactly; new ranks start with c = 1, a fresh
row of A, a zero column of B (so the model's output does not change), zero moments and
a step count of 0 (their own bias correction).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from l1ra_lite.l1ra.layer import L1RALinear, fresh_rows
from l1ra_lite.l1ra.optim import FISHER_BETA, RANK_DIM
from l1ra_lite.l1ra.policy import RankEvidence, Verdict, paper_rule, plan_moves
from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord


@torch.no_grad()
def resize_adapter(
    adapter: L1RALinear,
    keep: list[int],
    n_new: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Keep the ranks at `keep` (in that order) and append `n_new` fresh ones.

    Call it between steps with no autograd graph alive (release the loss after
    backward): a graph that is still referenced holds the parameters' gradient
    accumulators, which remember the old shapes and would reject the next backward.
    """
    device = adapter.gate.device
    index = torch.tensor(keep, dtype=torch.long, device=device)
    new_rows = fresh_rows(n_new, adapter.in_features, generator).to(device)
    fills = {
        "A": new_rows,
        "B": torch.zeros(adapter.out_features, n_new, device=device),
        "gate": torch.ones(n_new, device=device),
    }
    for kind, param in (("A", adapter.lora_A), ("B", adapter.lora_B), ("gate", adapter.gate)):
        dim = RANK_DIM[kind]
        old_shape = param.shape
        param.data = torch.cat([param.data.index_select(dim, index), fills[kind].to(param.dtype)], dim)
        if param.grad is not None:
            param.grad = _resized(param.grad, dim, index, n_new)
        if optimizer is not None and param in optimizer.state:
            state = optimizer.state[param]
            for key, value in state.items():
                if key == "step" and value.dim() == 1:  # per-rank step counts
                    state[key] = _resized(value, 0, index, n_new)
                elif torch.is_tensor(value) and value.shape == old_shape:  # the moments
                    state[key] = _resized(value, dim, index, n_new)


def _resized(t: torch.Tensor, dim: int, index: torch.Tensor, n_new: int) -> torch.Tensor:
    """t sliced to `index` along `dim`, then zero-padded by n_new along it."""
    kept = t.index_select(dim, index)
    pad_shape = list(t.shape)
    pad_shape[dim] = n_new
    return torch.cat([kept, t.new_zeros(pad_shape)], dim)


def rank_evidence(adapters: dict[str, L1RALinear], optimizer: Optional[torch.optim.Optimizer]) -> list[RankEvidence]:
    """Per adapter: its gates, their bias-corrected squared-gradient mean and their ages
    (zeros where the optimiser has not stepped yet)."""
    evidence = []
    for adapter in adapters.values():
        gate = adapter.gate.detach().float().cpu()
        state = optimizer.state.get(adapter.gate, {}) if optimizer is not None else {}
        age = state.get("step", torch.zeros_like(gate)).float().cpu()
        fisher = state.get("fisher", torch.zeros_like(gate)).float().cpu()
        fisher = fisher / (1 - FISHER_BETA**age).clamp_min(1e-12) * (age > 0)
        evidence.append(RankEvidence(gate.tolist(), fisher.tolist(), age.int().tolist()))
    return evidence


Rule = Callable[[list[RankEvidence]], Verdict]


def reallocate(
    adapters: dict[str, L1RALinear],
    rank_state: RankState,
    step: int,
    threshold: float,
    optimizer: Optional[torch.optim.Optimizer] = None,
    generator: Optional[torch.Generator] = None,
    rule: Optional[Rule] = None,
) -> ReallocationRecord:
    """Cut the ranks `rule` names (default: the paper's, gates below `threshold`), hand
    the freed ranks out, resize, record."""
    paths = list(adapters)
    evidence = rank_evidence(adapters, optimizer)
    plan = plan_moves(rule(evidence) if rule is not None else paper_rule(evidence, threshold))
    for path, keep, n_new in zip(paths, plan.keep, plan.added):
        if len(keep) != adapters[path].rank or n_new:
            resize_adapter(adapters[path], list(keep), n_new, optimizer, generator)
    ranks = {p: adapters[p].rank for p in paths}
    pruned = {p: n for p, n in zip(paths, plan.pruned) if n}
    added = {p: n for p, n in zip(paths, plan.added) if n}
    return rank_state.record(step, pruned, added, ranks)
