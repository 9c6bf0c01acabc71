"""Stock peft LoRA and AdaLoRA, set up to compare with L1RA at the same total rank.

LoRA gets the same initial per-module ranks as L1RA (`rank_pattern` by full path).
AdaLoRA gets a target rank of budget / adapters (rounded) and starts at 1.5x that, as
peft recommends; its own `update_and_allocate` moves the rank by masking.
"""

from __future__ import annotations

from typing import Any

import torch


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


def peft_ranks(model, method: str) -> dict[str, int]:
    """Current rank per adapted module path (AdaLoRA: the unmasked singular values)."""
    ranks = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if method == "adalora" and hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            ranks[name.removeprefix(prefix)] = int((module.lora_E["default"] != 0).sum())
        elif method == "lora" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
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
