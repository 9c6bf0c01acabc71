"""One optimiser step and one evaluation pass: the arithmetic of the loop.

A step runs `grad_accum` micro-batches (each micro-batch's loss weighted by its share of
the step's answer tokens, so accumulation equals one big batch), clips the gradients,
sets the scheduled LR and steps. The host reads from the device once a step: the loss
and the gradient norm together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from l1ra_lite.data import IGNORE_INDEX, collate
from l1ra_lite.loss import causal_lm_loss
from l1ra_lite.train import distributed


@dataclass(frozen=True)
class Precision:
    """How a run computes: `dtype` under autocast (the adapters' master weights stay fp32);
    fp16 also needs loss scaling, bf16 has fp32's range and does not."""

    dtype: torch.dtype
    device_type: str  # "cuda" or "cpu"

    @property
    def autocast(self) -> dict:
        return {
            "device_type": self.device_type,
            "dtype": self.dtype,
            "enabled": self.dtype in (torch.bfloat16, torch.float16),
        }

    def new_scaler(self) -> Optional[torch.amp.GradScaler]:
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None


def label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # the first label is never predicted


def to_device(batch: dict, device: str) -> dict:
    """The batch for the model on `device`; labels stay where they are (on the CPU), so the
    loss finds the labelled positions without making the host wait for the GPU."""
    return {k: v if k == "labels" else v.to(device, non_blocking=True) for k, v in batch.items()}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled LR for every group except L1RA's gates (constant eta_c)."""
    for group in optimizer.param_groups:
        if group.get("kind") != "gate":
            group["lr"] = lr


def forward_backward(
    model, batch, weight: float, autocast: dict, scaler: Optional[torch.amp.GradScaler] = None
) -> torch.Tensor:
    """Loss of one micro-batch (a tensor on the device: reading it would wait for the GPU),
    backward with its weight; the graph dies with this frame (a live graph would pin the
    old shapes of resized parameters)."""
    with torch.autocast(**autocast):
        loss = causal_lm_loss(model, batch) * weight
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def optimizer_step(
    method,
    batches: list[dict],
    lr: float,
    max_grad_norm: float,
    device: str,
    autocast: dict,
    step_number: int,
    scaler: Optional[torch.amp.GradScaler] = None,
    step_tokens: Optional[int] = None,
) -> tuple[Optional[float], float]:
    """Forward/backward over the micro-batches, clip, step, then the method's own
    after-step hook. Returns (loss, grad norm); loss is None when the loss or the
    gradients were not finite, and then nothing was updated. With fp16 loss scaling
    (`scaler`), gradients that overflow are not a fault: the step is skipped, the scale
    lowered, and the loss returned with an infinite grad norm.

    Under several processes `batches` are this process's share of the step and
    `step_tokens` the answer tokens of the whole (global) step: the gradients summed over
    the processes are then those of the global batch."""
    if step_tokens is None:
        step_tokens = sum(label_tokens(b["labels"]) for b in batches)
    loss = torch.zeros((), device=device)
    for batch in batches:
        weight = label_tokens(batch["labels"]) / max(1, step_tokens)
        loss += forward_backward(method.model, to_device(batch, device), weight, autocast, scaler)
    params = [p for group in method.optimizer.param_groups for p in group["params"]]
    loss = distributed.sum_gradients(params, loss)  # no-op in a single process
    if scaler is not None:
        scaler.unscale_(method.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    loss, grad_norm = torch.stack([loss.float(), grad_norm.float().to(loss.device)]).tolist()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        set_lr(method.optimizer, lr)
        method.optimizer.step()
        method.after_optimizer_step(step_number)
    if scaler is not None:
        scaler.update()  # grows the scale after a run of good steps, lowers it after an overflow
    method.optimizer.zero_grad(set_to_none=True)
    if not finite and scaler is not None and math.isfinite(loss):
        return loss, float("inf")
    return (loss if finite else None), grad_norm


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device: str, autocast: dict) -> float:
    """Token-weighted mean loss over the held-out examples. Under several processes each
    evaluates its share (distributed.shard) and the sums are added over them."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        tokens = label_tokens(batch["labels"])
        if tokens:
            with torch.autocast(**autocast):
                total_loss += causal_lm_loss(model, to_device(batch, device)).double() * tokens
            total_tokens += tokens
    model.train(was_training)
    total, tokens = distributed.sum_over_processes([float(total_loss), total_tokens])  # read once, at the end
    return total / max(1, tokens)
