"""The adapter methods a run can train, behind one set of hooks.

Each method (L1RA in l1ra_lite.l1ra.method, stock peft LoRA / AdaLoRA in
l1ra_lite.baselines) holds the model with its adapters, the optimiser and the rank
record, and answers the same calls; the training loop calls them and never asks which
method it trains. Adding a method is one class with these hooks, one entry in METHODS
and the choice in config.CHOICES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from l1ra_lite.baselines import PeftAdaLoRA, PeftLoRA
from l1ra_lite.config import FinetuneConfig, resolve_l1_lambda, shrink_steps
from l1ra_lite.l1ra.inject import default_budget, find_targets, initial_ranks
from l1ra_lite.l1ra.method import L1RAMethod
from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord
from l1ra_lite.rank_pattern import check_rank_pattern


class AdapterMethod(Protocol):
    model: torch.nn.Module  # the model with its adapters (for peft methods, the PeftModel)
    optimizer: torch.optim.Optimizer
    rank_state: RankState
    alpha: float
    moves_rank: bool  # whether rank moves during training (the dashboard shows when)

    def after_optimizer_step(self, step: int) -> None:
        """Right after the optimiser step, before the gradients are zeroed."""

    def reallocate(self, step: int) -> Optional[ReallocationRecord]:
        """Move rank at a scheduled step; the record of what moved, None if nothing can."""

    def current_ranks(self) -> dict[str, int]: ...

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Training state beyond parameters and optimiser, as (tensors, JSON data)."""

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None: ...

    def extra_state_bytes(self) -> int: ...

    def rank_snapshot(self) -> dict[str, torch.Tensor]:
        """Per-rank evidence to log at each reallocation ({} when there is none)."""

    def rank_summary(self) -> str:
        """One sentence for the end of the run: what moved, or why nothing did ("" if rank
        does not move in this method)."""

    def save_adapter(self, folder: Path, base_model: str, dropout: float, target_modules: list[str], tokenizer) -> None:
        """The finished adapter as a folder stock peft loads."""


def _l1ra(
    model,
    config: FinetuneConfig,
    common: dict,
    total_steps: int,
    warmup_steps: int,
    update_every: int,
    saved_ranks: Optional[dict[str, int]],
) -> L1RAMethod:
    window_end = shrink_steps(config, total_steps) if config.shrink_until < 1 else None
    return L1RAMethod.attach(
        model,
        common["paths"],
        common["budget"],
        common["alpha"],
        config.dropout,
        config.seed,
        config.lr,
        config.weight_decay,
        config.eta_c,
        resolve_l1_lambda(config, total_steps),
        saved_ranks,
        rule=config.realloc_rule,
        shrink_until=window_end,
        grace=max(1, update_every),
        window_steps=shrink_steps(config, total_steps),
    )


def _lora(
    model,
    config: FinetuneConfig,
    common: dict,
    total_steps: int,
    warmup_steps: int,
    update_every: int,
    saved_ranks: Optional[dict[str, int]],
) -> PeftLoRA:
    torch.manual_seed(config.seed)  # peft draws its init from the global generator
    paths = common["paths"]
    ranks = [saved_ranks[p] for p in paths] if saved_ranks else initial_ranks(common["budget"], len(paths))
    return PeftLoRA.attach(
        model, common["paths"], ranks, common["alpha"], config.dropout, config.lr, config.weight_decay
    )


def _adalora(
    model,
    config: FinetuneConfig,
    common: dict,
    total_steps: int,
    warmup_steps: int,
    update_every: int,
    saved_ranks: Optional[dict[str, int]],
) -> PeftAdaLoRA:
    torch.manual_seed(config.seed)
    return PeftAdaLoRA.attach(
        model,
        common["paths"],
        common["budget"],
        common["alpha"],
        config.dropout,
        config.lr,
        config.weight_decay,
        total_steps,
        warmup_steps,
        max(1, update_every),
    )


METHODS: dict[str, Callable[..., AdapterMethod]] = {"l1ra": _l1ra, "lora": _lora, "adalora": _adalora}


def attach_method(
    model, config: FinetuneConfig, schedule, saved_ranks: Optional[dict[str, int]] = None
) -> AdapterMethod:
    """Put `config.method`'s adapters on `model` at the run's budget (default 8 a module,
    or the total of --ranks-from) and alpha (default: the mean rank, so the scale is 1).
    `saved_ranks`: the ranks to start from (a checkpoint's, or the --ranks-from layout).
    `schedule` is the run's l1ra_lite.train.Schedule (total, warmup and update steps)."""
    paths = find_targets(model, config.target_modules)
    if config.ranks_from and saved_ranks:
        budget = config.budget if config.budget is not None else sum(saved_ranks.values())
        check_rank_pattern(saved_ranks, paths, budget, config.ranks_from)
    else:
        budget = config.budget if config.budget is not None else default_budget(len(paths))
    initial_ranks(budget, len(paths))  # refuses a budget below one rank per module
    alpha = config.alpha if config.alpha is not None else budget / len(paths)
    common = {"paths": paths, "budget": budget, "alpha": alpha}
    return METHODS[config.method](
        model, config, common, schedule.total_steps, schedule.warmup_steps, schedule.update_every, saved_ranks
    )
