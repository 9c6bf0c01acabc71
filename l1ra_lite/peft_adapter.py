"""Write L1RA adapters as a standard peft LoRA folder (layout: docs/CONTRACTS.md).

The gate and the scale are folded into B,  B' = B diag(c) (s r_i / alpha),  so that
peft's and llama.cpp's scale alpha / r_i gives back  s B diag(c) A.  The folder has one
global lora_alpha, a rank_pattern keyed by full module path (peft matches keys as
suffixes and the first match wins, so short keys would be ambiguous), and only
lora_A / lora_B tensors (llama.cpp rejects anything else).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from l1ra_lite.module_paths import module_type, peft_path
from l1ra_lite.l1ra.layer import L1RALinear


def peft_tensors(adapters: dict[str, L1RALinear], lora_alpha: float) -> dict[str, torch.Tensor]:
    tensors = {}
    with torch.no_grad():
        for path, adapter in adapters.items():
            fold = adapter.gate.float() * (adapter.scale * adapter.rank / lora_alpha)
            key = peft_path(path)
            tensors[f"{key}.lora_A.weight"] = adapter.lora_A.detach().float().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = (adapter.lora_B.float() * fold).cpu().contiguous()
    return tensors


def target_names(paths: list[str], all_linear_paths: list[str]) -> list[str]:
    """Module type names when they pick exactly `paths`, else the full paths."""
    types = sorted({module_type(p) for p in paths})
    same = sorted(p for p in all_linear_paths if module_type(p) in types) == sorted(paths)
    return types if same else sorted(paths)


def save_peft_adapter(
    adapters: dict[str, L1RALinear],
    out_dir: Path,
    base_model: str,
    lora_alpha: float,
    dropout: float,
    target_modules: list[str],
    tokenizer=None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ tokenizer) to out_dir."""
    from peft import LoraConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {path: adapter.rank for path, adapter in adapters.items()}
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=common_rank,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        rank_pattern=ranks,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out_dir))
    try:
        save_file(peft_tensors(adapters, lora_alpha), str(out_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    except SafetensorError as err:  # safetensors reports a full disk this way
        raise OSError(str(err)) from None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
