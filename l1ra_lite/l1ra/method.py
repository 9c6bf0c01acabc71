"""L1RA as a training method: adapters, their optimiser and the rank record, behind the
hooks every method offers the training loop (see l1ra_lite.methods.AdapterMethod).

The loop calls the hooks; it never asks which method it trains.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from l1ra_lite.l1ra.inject import inject_adapters
from l1ra_lite.l1ra.layer import L1RALinear
from l1ra_lite.l1ra.optim import L1RAOptimizer
from l1ra_lite.l1ra.policy import importance_rule
from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord, describe_moves, ranks_before_moves
from l1ra_lite.l1ra.realloc import reallocate


@dataclass
class L1RAMethod:
    model: torch.nn.Module
    adapters: dict[str, L1RALinear]
    optimizer: L1RAOptimizer
    rank_state: RankState
    alpha: float
    seed: int
    rule: str = "paper"  # which ranks go (policy.py): "paper" or "importance"
    shrink_until: Optional[int] = None  # last step of the shrink window; None: the whole run
    grace: int = 10  # importance rule: steps a new rank lives before it can be cut
    l1_kappa: float = 0.0  # the most the L1 shrink alone takes off a gate (eta_c x lambda x window steps)
    window_steps: int = 0  # steps of the shrink window

    moves_rank = True

    @classmethod
    def attach(
        cls,
        model,
        paths: list[str],
        budget: int,
        alpha: float,
        dropout: float,
        seed: int,
        lr: float,
        weight_decay: float,
        eta_c: float,
        l1_lambda: float,
        saved_ranks: Optional[dict[str, int]] = None,
        rule: str = "paper",
        shrink_until: Optional[int] = None,
        grace: int = 10,
        window_steps: int = 0,
    ) -> "L1RAMethod":
        adapters = inject_adapters(model, budget, paths, alpha, dropout, seed=seed, ranks=saved_ranks)
        optimizer = L1RAOptimizer(adapters.values(), lr=lr, weight_decay=weight_decay, eta_c=eta_c, l1_lambda=l1_lambda)
        state = RankState(budget, {p: a.rank for p, a in adapters.items()})
        return cls(
            model,
            adapters,
            optimizer,
            state,
            alpha,
            seed,
            rule,
            shrink_until,
            grace,
            eta_c * l1_lambda * window_steps,
            window_steps,
        )

    def after_optimizer_step(self, step: int) -> None:
        """The gates' L1 shrink is part of the optimiser step; at the end of the shrink
        window the gates are folded into B."""
        # >=, not ==: the step that closes the window may have been skipped (not finite).
        if self.shrink_until is not None and step >= self.shrink_until and self.optimizer.gate_group["lr"] > 0:
            fold_gates(self.adapters, self.optimizer)

    def reallocate(self, step: int) -> Optional[ReallocationRecord]:
        if self.shrink_until is not None and step >= self.shrink_until:
            return None  # the window is closed: the ranks have the rest of the run to train
        # The generator of new A rows follows (seed, step): a resumed run draws the same rows.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        threshold = self.optimizer.prune_threshold
        rule = None
        if self.rule == "importance":
            max_moves = max(1, round(IMPORTANCE_MOVES_PER_EVENT * self.rank_state.budget))
            rule = functools.partial(importance_rule, threshold=threshold, max_moves=max_moves, grace=self.grace)
        return reallocate(self.adapters, self.rank_state, step, threshold, self.optimizer, generator, rule)

    def rank_snapshot(self) -> dict[str, torch.Tensor]:
        """Every rank's gate, Adam moments, squared-gradient mean and age, per adapter
        (for --log-gates and bench/realloc_replay.py)."""
        tensors = {}
        for path, adapter in self.adapters.items():
            state = self.optimizer.state.get(adapter.gate, {})
            tensors[f"{path}.gate"] = adapter.gate.detach().float().cpu()
            for key in ("exp_avg", "exp_avg_sq", "fisher", "step"):
                if key in state:
                    tensors[f"{path}.{key}"] = state[key].detach().float().cpu()
            tensors[f"{path}.b_norm"] = adapter.lora_B.detach().float().norm(dim=0).cpu()
        return tensors

    def current_ranks(self) -> dict[str, int]:
        return {p: a.rank for p, a in self.adapters.items()}

    def rank_summary(self) -> str:
        """What moved over the run, or why nothing did (for the end of a run)."""
        state = self.rank_state
        moved = describe_moves(ranks_before_moves(state), state.ranks, state.budget)
        return moved or no_move_reason(self.rule, self.l1_kappa, self.window_steps, self.optimizer.prune_threshold)

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Checkpoint state beyond parameters and optimiser: none (ranks are in rank_state,
        a folded window in the optimiser's gate group)."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pass

    def extra_state_bytes(self) -> int:
        return 0

    def save_adapter(self, folder: Path, base_model: str, dropout: float, target_modules: list[str], tokenizer) -> None:
        """A standard peft LoRA folder: the gates and the scale folded into B."""
        from l1ra_lite.peft_adapter import save_peft_adapter

        save_peft_adapter(
            self.adapters,
            folder,
            base_model,
            lora_alpha=max(1, round(self.alpha)),
            dropout=dropout,
            target_modules=target_modules,
            tokenizer=tokenizer,
        )


def no_move_reason(rule: str, kappa: float, window_steps: int, threshold: float) -> str:
    """Why a run moved no rank, and what changes that, in one sentence."""
    if rule == "paper":
        return (
            f"no rank moved: over {window_steps} steps the L1 shrink alone can lower a gate by at most "
            f"{kappa:.2g} (l1-kappa), so a gate reaches the cut-off {threshold:.2g} only where the loss itself "
            "drives it down; a larger --l1-kappa or a longer run moves rank"
        )
    return (
        "no rank moved: every rank's importance stayed within reach of the median and no gate fell below "
        f"{threshold:.2g}; the task may use every rank where it is, or a larger --l1-kappa moves more"
    )


# The importance rule moves at most this share of the budget an event: enough to move
# 10% of the budget over a dozen events, few enough that one noisy event costs little.
IMPORTANCE_MOVES_PER_EVENT = 0.015


@torch.no_grad()
def fold_gates(adapters: dict[str, L1RALinear], optimizer: L1RAOptimizer) -> None:
    """B <- B diag(c), c <- 1, and the gates stop: the model's function is unchanged, and
    no rank stays throttled by a shrunk gate (a gate at 0.5 halves its rank's step) for
    the rest of the run. B's Adam moments are rescaled to the new parametrisation (its
    gradient is the old one divided by c), so each rank keeps its step size."""
    for adapter in adapters.values():
        gate = adapter.gate.detach().clone()
        adapter.lora_B.mul_(gate)
        state = optimizer.state.get(adapter.lora_B, {})
        safe = gate.clamp_min(1e-3)  # a zero gate's column of B is zero: nothing to rescale
        if "exp_avg" in state:
            state["exp_avg"].div_(safe)
            state["exp_avg_sq"].div_(safe * safe)
        adapter.gate.fill_(1.0)
    group = optimizer.gate_group
    group["lr"], group["l1_lambda"] = 0.0, 0.0
