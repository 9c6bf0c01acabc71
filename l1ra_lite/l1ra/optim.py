"""The optimiser step of L1RA adapters.

- A and B: AdamW with the scheduled learning rate and weight decay.
- c (the gates): Adam with its own constant learning rate eta_c and no weight decay,
  then the decoupled L1 shrink  c <- c - eta_c * lambda * sign_dz(c)  (no shrink inside
  the dead zone |c| <= eta_c * lambda), then a clamp to [0, 1].

Every rank keeps its own step count (a vector per parameter, along the rank
dimension), so a rank added by a reallocation at step 500 gets the bias correction of
a fresh rank rather than that of a 500-step-old one. torch's Adam keeps one count per
tensor, which is why we own this step.

It is a torch.optim.Optimizer, so state_dict(), zero_grad() and LR changes through
param_groups work as usual. The training loop sets the LR of the "A" and "B" groups
each step; the "gate" group keeps eta_c.
"""

from __future__ import annotations

from typing import Iterable

import torch

from l1ra_lite.l1ra.layer import L1RALinear

# Which dimension of each kind of parameter is the rank dimension.
RANK_DIM = {"A": 0, "B": 1, "gate": 0}


class L1RAOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        adapters: Iterable[L1RALinear],
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        eta_c: float = 2e-2,
        l1_lambda: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        adapters = list(adapters)
        groups = [
            {"params": [a.lora_A for a in adapters], "kind": "A", "lr": lr, "weight_decay": weight_decay},
            {"params": [a.lora_B for a in adapters], "kind": "B", "lr": lr, "weight_decay": weight_decay},
            {"params": [a.gate for a in adapters], "kind": "gate", "lr": eta_c, "weight_decay": 0.0,
             "l1_lambda": l1_lambda},
        ]
        super().__init__(groups, {"betas": betas, "eps": eps})

    @property
    def prune_threshold(self) -> float:
        """Gates below this are pruned at the next reallocation (DESIGN.md section 2)."""
        group = self.gate_group
        return group["lr"] * group["l1_lambda"] + 1e-10

    @property
    def gate_group(self) -> dict:
        return next(g for g in self.param_groups if g["kind"] == "gate")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch moves loaded moments to each parameter's device but leaves "step" where it
        was (it expects a CPU scalar); ours is a per-rank vector used with the moments, so
        it must follow them (a checkpoint is read on the CPU, the run may be on CUDA)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            rank_dim = RANK_DIM[group["kind"]]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[rank_dim], dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                _adam_per_rank(p, p.grad, state, group["lr"], beta1, beta2, group["eps"],
                               group["weight_decay"], rank_dim)
                if group["kind"] == "gate":
                    _l1_shrink_and_clamp(p, group["lr"] * group["l1_lambda"])
        return None


def _adam_per_rank(p, grad, state, lr, beta1, beta2, eps, weight_decay, rank_dim):
    """One AdamW update where the bias correction uses each rank's own step count."""
    steps = state["step"]
    steps += 1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # Shape the per-rank corrections so they broadcast along the rank dimension.
    shape = [1] * p.dim()
    shape[rank_dim] = -1
    bias_correction1 = (1 - beta1 ** steps).view(shape)
    bias_correction2_sqrt = (1 - beta2 ** steps).sqrt().view(shape)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg / bias_correction1, denom, value=-lr)


def _l1_shrink_and_clamp(gate: torch.Tensor, shrink: float) -> None:
    """c <- clamp(c - shrink * sign_dz(c), 0, 1); sign_dz is 0 inside |c| <= shrink."""
    sign = torch.where(gate > shrink, 1.0, torch.where(gate < -shrink, -1.0, 0.0))
    gate.sub_(sign * shrink).clamp_(0.0, 1.0)
