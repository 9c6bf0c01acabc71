"""Stock peft LoRA and AdaLoRA, set up to compare with L1RA at the same total rank.

LoRA gets the same initial per-module ranks as L1RA (`rank_pattern` by full path).
AdaLoRA gets a target rank of budget / adapters (rounded), so that it ends at the same
total, and is otherwise set up as its authors run it (see ADALORA_* below); its own
`update_and_allocate` moves the rank by masking.
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


# AdaLoRA as its authors run it. Sources: the reference code QingruZhang/AdaLoRA (README
# and the scripts under NLU/scripts and NLG_QA/scripts, which reproduce the paper, arXiv
# 2303.10512) and peft's AdaLoraConfig (defaults and docstring, peft 0.21).
#
# init_r = 1.5 x target_r: the authors' NLG/QA runs (--lora_r 12 --target_rank 8, BART
# XSum/CNN-DM and the SQuAD example of their README), peft's defaults (init_r 12,
# target_r 8) and the L1RA reference's AdaLoRA baseline (24 / 16).
ADALORA_INIT_RANK_RATIO = 1.5
# lora_alpha: the authors pass 16 whatever the rank (GLUE with --lora_r 2 or 3, SQuAD with
# 12; 32 for BART), and peft, like their SVDLinear, scales by lora_alpha / init_r; E starts
# at zero and A, B at std 0.02, so at alpha = the mean rank (scale < 1) AdaLoRA barely
# moves in a few hundred steps. This is the bench's AdaLoRA alpha (bench/run.py), not a
# default of `finetune --method adalora` (whose alpha is the run's, l1ra_lite.methods).
ADALORA_ALPHA = 16.0
# Orthogonality penalty weight: --reg_orth_coef 0.1 in every script of the authors (and
# the default of their compute_orth_regu); peft's default is 0.5.
ADALORA_ORTH_REG_WEIGHT = 0.1
# EMA factors of the importance score and its uncertainty: 0.85 / 0.85 in every script of
# the authors; peft's defaults.
ADALORA_BETAS = (0.85, 0.85)
# Budget schedule: no masking for the first tinit steps, the cubic decrease to the target,
# then the last tfinal steps fine-tune a fixed allocation. The authors' README runs SQuAD
# v2 for 300 steps (our bench's length) with --init_warmup 50 --final_warmup 100
# --mask_interval 10, i.e. 1/6 and 1/3 of the run; their README's RankAllocator example
# is 500 / 1500 of 3000 steps, peft's docstring example 10 / 20 of 100. deltaT (the
# masking interval) is the run's reallocation interval (`--update-every`, 5% of the run
# by default: 15 of 300 in the bench, where the authors use 10), so AdaLoRA moves rank as
# often as L1RA does; the L1RA reference sets its AdaLoRA baseline the same way
# (budget_update_ratio 0.05).
ADALORA_TINIT_FRACTION = 1 / 6
ADALORA_TFINAL_FRACTION = 1 / 3


def adalora_target_rank(budget: int, n_adapters: int) -> int:
    return max(1, round(budget / n_adapters))


def adalora_schedule(total_steps: int, warmup_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of `total_steps`: the fractions above, no masking during
    the LR warmup, and always a budgeting phase (peft needs tinit < total_step - tfinal)."""
    tfinal = int(total_steps * ADALORA_TFINAL_FRACTION)
    tinit = max(warmup_steps, int(total_steps * ADALORA_TINIT_FRACTION))
    return min(tinit, max(0, total_steps - tfinal - 1)), tfinal


def adalora_config(
    paths: list[str], budget: int, alpha: float, dropout: float, total_steps: int, warmup_steps: int, update_every: int
):
    from peft import AdaLoraConfig

    target_r = adalora_target_rank(budget, len(paths))
    tinit, tfinal = adalora_schedule(total_steps, warmup_steps)
    return AdaLoraConfig(
        target_r=target_r,
        init_r=max(target_r + 1, round(ADALORA_INIT_RANK_RATIO * target_r)),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, update_every),
        beta1=ADALORA_BETAS[0],
        beta2=ADALORA_BETAS[1],
        orth_reg_weight=ADALORA_ORTH_REG_WEIGHT,
        total_step=total_steps,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=paths,
        task_type="CAUSAL_LM",
    )


def peft_adalora(
    model,
    paths: list[str],
    budget: int,
    alpha: float,
    dropout: float,
    total_steps: int,
    warmup_steps: int,
    update_every: int,
):
    from peft import get_peft_model

    config = adalora_config(paths, budget, alpha, dropout, total_steps, warmup_steps, update_every)
    model = get_peft_model(model, config)
    penalty_in_training_only(model)
    return model


def penalty_in_training_only(model) -> None:
    """Make peft's AdaLoRA add its orthogonality penalty to the training loss only.

    peft's AdaLoraModel.forward adds `orth_reg_weight` x the penalty to every loss it
    returns, evaluation included, so an eval loss would not be the cross-entropy the other
    methods report (with A, B at their std-0.02 init the penalty is ~2, x 0.5 at peft's
    default weight). The authors add it to the training loss only (compute_orth_regu in
    their training loops). The weight is set to 0 for a forward in eval mode and put back
    after it, so the saved adapter_config.json keeps the weight trained with."""
    adalora = model.base_model
    config = adalora.peft_config[adalora.trainable_adapter_name]
    weight = config.orth_reg_weight

    def before(module, args, kwargs):
        config.orth_reg_weight = weight if module.training else 0.0

    def after(module, args, kwargs, output):
        config.orth_reg_weight = weight

    adalora.register_forward_pre_hook(before, with_kwargs=True)
    adalora.register_forward_hook(after, with_kwargs=True, always_call=True)


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
    def attach(
        cls, model, paths: list[str], ranks: list[int], alpha: float, dropout: float, lr: float, weight_decay: float
    ) -> "PeftLoRA":
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

    def rank_snapshot(self) -> dict[str, torch.Tensor]:
        return {}

    def rank_summary(self) -> str:
        if not self.moves_rank:
            return ""
        started = sum(
            m.lora_E["default"].shape[0] for m in self.model.modules() if "default" in getattr(m, "lora_E", {})
        )
        return f"{sum(self.current_ranks().values())} of the {started} ranks AdaLoRA started with are unmasked"

    def save_adapter(self, folder: Path, base_model: str, dropout: float, target_modules: list[str], tokenizer) -> None:
        self.model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))


@dataclass
class PeftAdaLoRA(PeftLoRA):
    """Stock peft AdaLoRA: its own `update_and_allocate` masks singular values after each
    optimiser step; its importance scores are training state and are checkpointed."""

    moves_rank = True

    @classmethod
    def attach(
        cls,
        model,
        paths: list[str],
        budget: int,
        alpha: float,
        dropout: float,
        lr: float,
        weight_decay: float,
        total_steps: int,
        warmup_steps: int,
        update_every: int,
    ) -> "PeftAdaLoRA":
        model = peft_adalora(model, paths, budget, alpha, dropout, total_steps, warmup_steps, update_every)
        final_total = adalora_target_rank(budget, len(paths)) * len(paths)  # the total AdaLoRA ends at
        return cls(model, _adamw(model, lr, weight_decay), RankState(final_total, peft_ranks(model)), alpha)

    def after_optimizer_step(self, step: int) -> None:
        # peft: after the optimiser step, before the gradients are zeroed (it reads them).
        self.model.base_model.update_and_allocate(step)
        self.rank_state.ranks = self.current_ranks()

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return adalora_allocator_state(self.model), {
            "adalora_rank_pattern": self.model.peft_config["default"].rank_pattern
        }

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        load_adalora_allocator_state(self.model, tensors)
        self.model.peft_config["default"].rank_pattern = state.get("adalora_rank_pattern")

    def extra_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in adalora_allocator_state(self.model).values())


def _adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
