"""A finished run's adapter as export merges it: each module's weight change (read with
l1ra_lite.peft_adapter; folder layout: docs/CONTRACTS.md).

The L1RA gates and scale are already folded into lora_B, so each module's weight
change is the plain LoRA one: delta = (lora_alpha / r_i) * B @ A, with r_i the rows
of that module's A. Only what llama.cpp can also express is accepted: one global
alpha, no rsLoRA, no DoRA, nothing but lora_A / lora_B tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from l1ra_lite.errors import UserError
from l1ra_lite.peft_adapter import ADAPTER_CONFIG, configured_rank, read_adapter_config, read_lora_tensors


@dataclass
class LoraAdapter:
    alpha: float
    A: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> (r, in)
    B: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> (out, r)

    def rank(self, module: str) -> int:
        return int(self.A[module].shape[0])

    def scale(self, module: str) -> float:
        """peft's (and llama.cpp's) per-module scale: alpha / r_i."""
        return self.alpha / self.rank(module)

    def delta(self, module: str) -> torch.Tensor:
        """The module's weight change (out x in), in float32."""
        return self.scale(module) * (self.B[module].float() @ self.A[module].float())


def read_adapter(adapter_dir: Path) -> LoraAdapter:
    """Load adapter_config.json and adapter_model.safetensors, checking they are plain LoRA."""
    config = read_adapter_config(adapter_dir)
    _check_config(config, adapter_dir / ADAPTER_CONFIG)
    tensors = read_lora_tensors(adapter_dir)
    adapter = LoraAdapter(alpha=float(config["lora_alpha"]), A=tensors["lora_A"], B=tensors["lora_B"])
    for module in sorted(set(adapter.A) | set(adapter.B)):
        _check_module(adapter, module, config)
    return adapter


def _check_config(config: dict, path: Path) -> None:
    """What llama.cpp can express: one global alpha, no rsLoRA, no DoRA."""
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}, expected LORA")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise UserError(f"{path}: {flag} is set; export supports plain LoRA only")
    if config.get("alpha_pattern"):
        raise UserError(f"{path}: alpha_pattern is set; export needs one global lora_alpha")
    if "lora_alpha" not in config:
        raise UserError(f"{path} has no lora_alpha")


def _check_module(adapter: LoraAdapter, module: str, config: dict) -> None:
    if module not in adapter.A or module not in adapter.B:
        raise UserError(f"adapter module {module} lacks its lora_A or lora_B tensor")
    a, b = adapter.A[module], adapter.B[module]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise UserError(f"adapter module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit")
    expected = configured_rank(config, module)
    if expected is not None and int(expected) != a.shape[0]:
        raise UserError(
            f"adapter module {module}: adapter_config.json says rank {expected}, the tensors have {a.shape[0]}"
        )
