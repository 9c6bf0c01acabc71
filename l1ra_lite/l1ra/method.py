"""L1RA as a training method: adapters, their optimiser and the rank record, behind the
hooks every method offers the training loop (see l1ra_lite.methods.AdapterMethod).

The loop calls the hooks; it never asks which method it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from l1ra_lite.l1ra.inject import inject_adapters
from l1ra_lite.l1ra.layer import L1RALinear
from l1ra_lite.l1ra.optim import L1RAOptimizer
from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord
from l1ra_lite.l1ra.realloc import reallocate


@dataclass
class L1RAMethod:
    model: torch.nn.Module
    adapters: dict[str, L1RALinear]
    optimizer: L1RAOptimizer
    rank_state: RankState
    alpha: float
    seed: int

    moves_rank = True

    @classmethod
    def attach(cls, model, paths: list[str], budget: int, alpha: float, dropout: float, seed: int, lr: float,
               weight_decay: float, eta_c: float, l1_lambda: float,
               saved_ranks: Optional[dict[str, int]] = None) -> "L1RAMethod":
        adapters = inject_adapters(model, budget, paths, alpha, dropout, seed=seed, ranks=saved_ranks)
        optimizer = L1RAOptimizer(adapters.values(), lr=lr, weight_decay=weight_decay, eta_c=eta_c,
                                  l1_lambda=l1_lambda)
        state = RankState(budget, {p: a.rank for p, a in adapters.items()})
        return cls(model, adapters, optimizer, state, alpha, seed)

    def after_optimizer_step(self, step: int) -> None:
        """Nothing: the gates' L1 shrink is part of the optimiser step."""

    def reallocate(self, step: int) -> Optional[ReallocationRecord]:
        # The generator of new A rows follows (seed, step): a resumed run draws the same rows.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return reallocate(self.adapters, self.rank_state, step, self.optimizer.prune_threshold, self.optimizer,
                          generator)

    def current_ranks(self) -> dict[str, int]:
        return {p: a.rank for p, a in self.adapters.items()}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Checkpoint state beyond parameters and optimiser: none (ranks are in rank_state)."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pass

    def extra_state_bytes(self) -> int:
        return 0

    def save_adapter(self, folder: Path, base_model: str, dropout: float, target_modules: list[str],
                     tokenizer) -> None:
        """A standard peft LoRA folder: the gates and the scale folded into B."""
        from l1ra_lite.peft_adapter import save_peft_adapter

        save_peft_adapter(self.adapters, folder, base_model, lora_alpha=max(1, round(self.alpha)),
                          dropout=dropout, target_modules=target_modules, tokenizer=tokenizer)
