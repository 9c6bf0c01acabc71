"""The optimiser step of L1RA adapters.

- A and B: AdamW with the scheduled learning rate and weight decay.
- c (the gates): Adam with its own constant learning rate eta_c and no weight decay,
  then the decoupled L1 shrink  c <- c - eta_c * lambda * sign_dz(c)  (no shrink inside
  the dead zone |c| <= eta_c * lambda), then a clamp to [0, 1]. Each gate also keeps a
  fast running mean of its squared gradient ("fisher", beta FISHER_BETA): the evidence
  the importance rule (policy.py) weighs a rank by. Adam's own second moment forgets too
  slowly (beta2 0.999: a thousand steps) to say what a rank does now.

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
FISHER_BETA = 0.95  # about the last 20 steps


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
            {
                "params": [a.gate for a in adapters],
                "kind": "gate",
                "lr": eta_c,
                "weight_decay": 0.0,
                "l1_lambda": l1_lambda,
            },
        ]
        super().__init__(groups, {"betas": betas, "eps": eps})

    @property
    def prune_threshold(self) -> float:
        """Gates below this (eta_c * lambda, the L1 shrink's dead zone) are pruned at the next
        reallocation (l1ra_lite.l1ra.policy)."""
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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rank_dim = RANK_DIM[group["kind"]]
            states = [self._state(p, rank_dim) for p in params]
            grads = [p.grad for p in params]
            if group["kind"] == "gate":
                torch._foreach_lerp_([s["fisher"] for s in states], torch._foreach_mul(grads, grads), 1 - FISHER_BETA)
            _adam_per_rank(params, grads, states, group, rank_dim)
            if group["kind"] == "gate":
                _l1_shrink_and_clamp(params, group["lr"] * group["l1_lambda"])
        return None

    def _state(self, p: torch.Tensor, rank_dim: int) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[rank_dim], dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if rank_dim == 0 and p.dim() == 1 and "fisher" not in state:  # a gate (also of an older checkpoint)
            state["fisher"] = torch.zeros_like(p)
        return state


# The updates below use torch's multi-tensor (_foreach) operations: one kernel per
# operation for all adapters of a group, instead of one per adapter (224 adapters make
# thousands of small launches per step on a GPU otherwise).


def _adam_per_rank(params, grads, states, group, rank_dim):
    """One AdamW update where the bias correction uses each rank's own step count."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    steps = [s["step"] for s in states]
    exp_avg = [s["exp_avg"] for s in states]
    exp_avg_sq = [s["exp_avg_sq"] for s in states]
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    # Per-rank corrections 1 - beta^t, shaped to broadcast along the rank dimension.
    correction1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(correction1)
    torch._foreach_add_(correction1, 1.0)
    correction2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(correction2_sqrt)
    torch._foreach_add_(correction2_sqrt, 1.0)
    torch._foreach_sqrt_(correction2_sqrt)

    def along_rank(vectors):
        shapes = [[-1 if d == rank_dim else 1 for d in range(p.dim())] for p in params]
        return [v.view(shape) for v, shape in zip(vectors, shapes)]

    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, along_rank(correction2_sqrt))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, torch._foreach_div(exp_avg, along_rank(correction1)), denom, value=-lr)


def _l1_shrink_and_clamp(gates: list[torch.Tensor], shrink: float) -> None:
    """c <- clamp(c - shrink * sign_dz(c), 0, 1), sign_dz being 0 inside |c| <= shrink.

    Below -shrink the shrink adds `shrink`, which leaves c negative, and the clamp then
    gives 0 either way; so it is c - shrink where c > shrink, else c, then the clamp.
    All gates are done at once on one flat copy."""
    flat = torch.cat(gates)
    flat = (flat - shrink * (flat > shrink).to(flat.dtype)).clamp_(0.0, 1.0)
    torch._foreach_copy_(gates, list(flat.split([g.numel() for g in gates])))
