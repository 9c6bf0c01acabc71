"""Read a standard peft LoRA adapter folder as written by l1ra-lite (docs/CONTRACTS.md).

The L1RA gates and scale are already folded into lora_B, so each module's weight
change is the plain LoRA one: delta = (lora_alpha / r_i) * B @ A, with r_i the rows
of that module's A. Only what llama.cpp can also express is accepted: one global
alpha, no rsLoRA, no DoRA, nothing but lora_A / lora_B tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from l1ra_lite.errors import UserError
from l1ra_lite.module_paths import PEFT_PREFIX, matches_target


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
    config = _read_config(adapter_dir / "adapter_config.json")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    adapter = LoraAdapter(alpha=float(config["lora_alpha"]))
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            module, kind = _split_key(key)
            target = adapter.A if kind == "lora_A" else adapter.B
            target[module] = f.get_tensor(key)
    for module in sorted(set(adapter.A) | set(adapter.B)):
        _check_module(adapter, module, config)
    if not adapter.A:
        raise UserError(f"{weights} holds no LoRA tensors")
    return adapter


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}, expected LORA")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise UserError(f"{path}: {flag} is set; export supports plain LoRA only")
    if config.get("alpha_pattern"):
        raise UserError(f"{path}: alpha_pattern is set; export needs one global lora_alpha")
    if "lora_alpha" not in config:
        raise UserError(f"{path} has no lora_alpha")
    return config


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> (<module>, 'lora_A')."""
    for kind in ("lora_A", "lora_B"):
        suffix = f".{kind}.weight"
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
            return key[len(PEFT_PREFIX) : -len(suffix)], kind
    raise UserError(f"unexpected tensor {key!r} in the adapter: only lora_A / lora_B weights are supported")


def _configured_rank(module: str, config: dict):
    """The rank adapter_config.json gives a module: the first rank_pattern key that
    matches it as a suffix (peft's rule; l1ra-lite writes full paths), else the global r."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if matches_target(module, key):
            return rank
    return config.get("r")


def _check_module(adapter: LoraAdapter, module: str, config: dict) -> None:
    if module not in adapter.A or module not in adapter.B:
        raise UserError(f"adapter module {module} lacks its lora_A or lora_B tensor")
    a, b = adapter.A[module], adapter.B[module]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise UserError(f"adapter module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit")
    expected = _configured_rank(module, config)
    if expected is not None and int(expected) != a.shape[0]:
        raise UserError(
            f"adapter module {module}: adapter_config.json says rank {expected}, the tensors have {a.shape[0]}"
        )
