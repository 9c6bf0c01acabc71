"""The L1RA adapter layer.

    y = W x + s * B (c * (A x))

W is the frozen base layer (torch.nn.Linear or bitsandbytes Linear4bit), A is r x in,
B is out x r, c is the per-rank gate and s one scale shared by every adapter of the run.
The adapter parameters are kept in fp32 (master weights); under autocast the two small
matmuls run in the autocast dtype, as peft's LoRA does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def fresh_rows(rows: int, in_features: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """New rows of A, drawn like peft's default LoRA init (kaiming-uniform with a=sqrt(5),
    i.e. uniform in +-1/sqrt(in)), so that A x has the same size as in stock LoRA."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rows, in_features, generator=generator) * 2 - 1) * bound


class L1RALinear(nn.Module):
    """A frozen linear layer plus a gated low-rank update whose rank can change.

    Rank changes go through `l1ra_lite.l1ra.realloc`, which replaces the `.data` of
    the three parameters (the Parameter objects stay, so optimisers keep tracking them).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError("an adapter needs at least one rank")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.scale = float(scale)
        device = _device_of(base)
        self.lora_A = nn.Parameter(fresh_rows(rank, self.in_features, generator).to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.gate = nn.Parameter(torch.ones(rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.lora_A, self.lora_B
        x = self.dropout(x)
        # Under autocast the matmul casts for itself (as in peft); an explicit cast to
        # the fp32 master dtype would make an fp32 copy of every adapted layer's input,
        # kept by checkpointing for the backward pass.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        h = nn.functional.linear(x, a)
        # The gate and the scale are r numbers: multiply them once into the rank
        # dimension instead of scaling the (tokens x out) result.
        h = h * (self.gate * self.scale).to(h.dtype)
        return y + nn.functional.linear(h, b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(c) A: what the adapter adds to W (out x in, fp32)."""
        return (self.lora_B * (self.gate * self.scale)) @ self.lora_A

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
