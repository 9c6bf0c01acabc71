"""Stock peft LoRA and AdaLoRA, set up to compare with L1RA at the same total rank.

LoRA gets the same initial per-module ranks as L1RA (`rank_pattern` by full path).
AdaLoRA gets a target rank of budget / adapters (rounded) and starts at 1.5x that, as
peft recommends; its own `update_and_allocate` moves the rank by masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from l1ra_lite.l1ra.rank_state import RankState, ReallocationRecord
from l1ra_lite.module_paths import PEFT_PREFIX


def peft_lora(model, paths: list[str], ranks: list[int], alpha: float, dropout: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=max(set(ranks), key=ranks.count),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=paths,
        rank_pattern=dict(zip(paths, ranks)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def adalora_target_rank(budget: int, n_adapters: int) -> int:
    return max(1, round(budget / n_adapters))


def peft_adalora(model, paths: list[str], budget: int, alpha: float, dropout: float,
                 total_steps: int, warmup_steps: int, update_every: int):
    from peft import AdaLoraConfig, get_peft_model

    target_r = adalora_target_rank(budget, len(paths))
    # peft needs tinit < total_step - tfinal; keep the last 10% of the run for fine-tuning
    # the final allocation, as its docs suggest.
    tfinal = max(1, total_steps // 10)
    tinit = min(warmup_steps, max(0, total_steps - tfinal - 2))
    config = AdaLoraConfig(
        target_r=target_r,
        init_r=max(target_r + 1, round(1.5 * target_r)),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, update_every),
        total_step=total_steps,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=paths,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def peft_ranks(model) -> dict[str, int]:
    """Current rank per adapted module path (AdaLoRA: the singular values not masked)."""
    ranks = {}
    prefix = PEFT_PREFIX
    for name, module in model.named_modules():
        if "default" in getattr(module, "lora_E", {}):
            ranks[name.removeprefix(prefix)] = int((module.lora_E["default"] != 0).sum())
        elif "default" in getattr(module, "lora_A", {}):
            ranks[name.removeprefix(prefix)] = module.lora_A["default"].weight.shape[0]
    return ranks


def adalora_allocator_state(model) -> dict[str, torch.Tensor]:
    """AdaLoRA's importance scores (part of its training state), for checkpoints."""
    allocator = model.base_model.rankallocator
    tensors = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for name, value in getattr(allocator, kind).items():
            tensors[f"adalora.{kind}.{name}"] = value
    return tensors


def load_adalora_allocator_state(model, tensors: dict[str, Any]) -> None:
    allocator = model.base_model.rankallocator
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for key, value in tensors.items():
        if key.startswith("adalora."):
            _, kind, name = key.split(".", 2)
            getattr(allocator, kind)[name] = value.to(device)


# ------------------------------------------------------------------ the methods' hooks
# The same hooks as l1ra_lite.l1ra.method.L1RAMethod (see l1ra_lite.methods.AdapterMethod).


@dataclass
class PeftLoRA:
    """Stock peft LoRA, trained with torch's AdamW."""

    model: Any  # the PeftModel
    optimizer: torch.optim.Optimizer
    rank_state: RankState
    alpha: float

    moves_rank = False

    @classmethod
    def attach(cls, model, paths: list[str], ranks: list[int], alpha: float, dropout: float, lr: float,
               weight_decay: float) -> "PeftLoRA":
        model = peft_lora(model, paths, ranks, alpha, dropout)
        return cls(model, _adamw(model, lr, weight_decay), RankState(sum(ranks), peft_ranks(model)), alpha)

    def after_optimizer_step(self, step: int) -> None:
        pass

    def reallocate(self, step: int) -> Optional[ReallocationRecord]:
        return None

    def current_ranks(self) -> dict[str, int]:
        return peft_ranks(self.model)

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pass

    def extra_state_bytes(self) -> int:
        return 0

    def save_adapter(self, folder: Path, base_model: str, dropout: float, target_modules: list[str],
                     tokenizer) -> None:
        self.model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))


@dataclass
class PeftAdaLoRA(PeftLoRA):
    """Stock peft AdaLoRA: its own `update_and_allocate` masks singular values after each
    optimiser step; its importance scores are training state and are checkpointed."""

    moves_rank = True

    @classmethod
    def attach(cls, model, paths: list[str], budget: int, alpha: float, dropout: float, lr: float,
               weight_decay: float, total_steps: int, warmup_steps: int, update_every: int) -> "PeftAdaLoRA":
        model = peft_adalora(model, paths, budget, alpha, dropout, total_steps, warmup_steps, update_every)
        final_total = adalora_target_rank(budget, len(paths)) * len(paths)  # the total AdaLoRA ends at
        return cls(model, _adamw(model, lr, weight_decay), RankState(final_total, peft_ranks(model)), alpha)

    def after_optimizer_step(self, step: int) -> None:
        # peft: after the optimiser step, before the gradients are zeroed (it reads them).
        self.model.base_model.update_and_allocate(step)
        self.rank_state.ranks = self.current_ranks()

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return adalora_allocator_state(self.model), {
            "adalora_rank_pattern": self.model.peft_config["default"].rank_pattern}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        load_adalora_allocator_state(self.model, tensors)
        self.model.peft_config["default"].rank_pattern = state.get("adalora_rank_pattern")

    def extra_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in adalora_allocator_state(self.model).values())


def _adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
