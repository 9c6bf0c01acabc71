"""The standard peft LoRA folder: written from L1RA adapters, read back by `inspect` and
`export` (layout: docs/CONTRACTS.md).

Writing: the gate and the scale are folded into B,  B' = B diag(c) (s r_i / alpha),  so
that peft's and llama.cpp's scale alpha / r_i gives back  s B diag(c) A.  The folder has
one global lora_alpha, a rank_pattern keyed by full module path (peft matches keys as
suffixes and the first match wins, so short keys would be ambiguous), and only
lora_A / lora_B tensors (llama.cpp rejects anything else).

Reading: adapter_config.json as JSON and the tensors with safetensors (never pickle);
what a reader accepts beyond that (inspect shows what it can, export refuses what
llama.cpp cannot express) is its own business.
torch is imported where tensors are made, so that `inspect`, which reads only the
tensors' shapes, does not load it.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from l1ra_lite.errors import UserError
from l1ra_lite.module_paths import matches_target, model_path, module_type, peft_path

if TYPE_CHECKING:
    import torch

    from l1ra_lite.l1ra.layer import L1RALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_KINDS = ("lora_A", "lora_B")  # A: (r x in), B: (out x r)


def lora_key(path: str, kind: str) -> str:
    """The tensor name of a module's lora_A or lora_B: 'base_model.model.<path>.lora_A.weight'."""
    return f"{peft_path(path)}.{kind}.weight"


def split_lora_key(key: str) -> Optional[tuple[str, str]]:
    """'base_model.model.<path>.lora_A.weight' -> (<path>, 'lora_A'); None for a tensor
    that is not a lora_A / lora_B weight."""
    for kind in LORA_KINDS:
        suffix = f".{kind}.weight"
        if key.endswith(suffix):
            return model_path(key[: -len(suffix)]), kind
    return None


# ----------------------------------------------------------------------------------------
# Writing


def peft_tensors(adapters: dict[str, L1RALinear], lora_alpha: float) -> dict[str, torch.Tensor]:
    import torch

    tensors = {}
    with torch.no_grad():
        for path, adapter in adapters.items():
            fold = adapter.gate.float() * (adapter.scale * adapter.rank / lora_alpha)
            tensors[lora_key(path, "lora_A")] = adapter.lora_A.detach().float().cpu().contiguous()
            tensors[lora_key(path, "lora_B")] = (adapter.lora_B.float() * fold).cpu().contiguous()
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

    from l1ra_lite.atomic import save_tensors

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
    save_tensors(peft_tensors(adapters, lora_alpha), out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------------------
# Reading


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json as a dict; a UserError when it is unreadable or not a JSON object."""
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file}: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a valid adapter config: the top level must be an object")
    return config


def configured_rank(config: dict[str, Any], path: str) -> Any:
    """The rank adapter_config.json gives the module at `path`: the first rank_pattern key
    that picks it (peft's rule, `matches_target`), else the global r (None if absent)."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if matches_target(path, key):
            return rank
    return config.get("r")


@contextmanager
def _open_weights(folder: Path, framework: str) -> Iterator[Any]:
    from safetensors import SafetensorError, safe_open

    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise UserError(f"{folder} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(file), framework=framework) as weights:
            yield weights
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file} is not a readable safetensors file: {err}") from None


def read_lora_ranks(folder: Path) -> dict[str, int]:
    """Module path -> rank, from the shapes of the lora_A tensors (r x in). Only the
    header is read: no tensor data is loaded, and other tensors are left alone."""
    ranks: dict[str, int] = {}
    with _open_weights(folder, "numpy") as weights:
        for key in weights.keys():
            parts = split_lora_key(key)
            if parts is not None and parts[1] == "lora_A":
                ranks[parts[0]] = int(weights.get_slice(key).get_shape()[0])
    if not ranks:
        raise UserError(f"{folder / ADAPTER_WEIGHTS} has no lora_A tensors: not a LoRA adapter")
    return ranks


def read_lora_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"lora_A": {module path: tensor}, "lora_B": {...}}; a UserError for any other tensor."""
    tensors: dict[str, dict[str, Any]] = {kind: {} for kind in LORA_KINDS}
    with _open_weights(folder, "pt") as weights:
        for key in weights.keys():
            parts = split_lora_key(key)
            if parts is None:
                raise UserError(f"unexpected tensor {key!r} in the adapter: only lora_A / lora_B weights are supported")
            tensors[parts[1]][parts[0]] = weights.get_tensor(key)
    if not tensors["lora_A"]:
        raise UserError(f"{folder / ADAPTER_WEIGHTS} has no lora_A tensors: not a LoRA adapter")
    return tensors
