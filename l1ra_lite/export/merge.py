"""Stream the base weights tensor by tensor and add the adapter's deltas.

Memory: the base safetensors are memory-mapped (`safe_open`) and read one tensor at a
time; each yielded tensor is the only full-size copy alive (plus its NF4 round trip
while it is computed). The writers decide how many of them they hold (hf: one shard,
gguf: one tensor). No model object with real weights is ever built.

`--merge-into dequantized` reproduces the NF4 weights the adapter was trained
against: the 16-bit weight loaded in the run's compute dtype, quantised exactly as
transformers' bitsandbytes loading does (blocksize 64, NF4, double quantisation of
the absmax), and dequantised again. `original` merges into the 16-bit weights. The
merge itself is done in float32: W' = W + (alpha / r_i) * B @ A.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from l1ra_lite.errors import UserError
from l1ra_lite.export.lora import LoraAdapter
from l1ra_lite.finished_run import RunInfo

MERGE_TARGETS = ("dequantized", "original")
NF4_BLOCKSIZE = 64  # bitsandbytes' default, used by transformers' Linear4bit
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    file: Path


@dataclass
class MergePlan:
    base: list[TensorSpec]  # every base tensor, in file order
    adapter: LoraAdapter
    merge_into: str  # "dequantized" | "original"
    compute_dtype: torch.dtype
    nf4_names: frozenset[str]  # weight names that were NF4 during training (empty for original)


def resolve_merge_into(requested: Optional[str], quant: str) -> str:
    """The default is what the adapter was trained against; refuse a contradiction."""
    if requested is None:
        return "dequantized" if quant == "nf4" else "original"
    if requested not in MERGE_TARGETS:
        raise UserError(f"--merge-into must be one of {', '.join(MERGE_TARGETS)} (got {requested!r})")
    if requested == "dequantized" and quant != "nf4":
        raise UserError("--merge-into dequantized needs a run trained on a 4-bit base; this one used quant=none")
    return requested


def base_tensors(base_dir: Path) -> list[TensorSpec]:
    """Names, shapes and files of the base's safetensors weights (sharded or not)."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({base_dir / f for f in weight_map.values()})
    else:
        files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"the base model folder {base_dir} has no .safetensors weights "
            "(export reads safetensors only; pickled .bin checkpoints are not loaded)"
        )
    specs = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                specs.append(TensorSpec(name, tuple(f.get_slice(name).get_shape()), file))
    return specs


def nf4_weight_names(base_dir: Path, trust_remote_code: bool) -> frozenset[str]:
    """The weights transformers quantises to NF4 when loading this base in 4 bit.

    Built on the meta device (no memory), with transformers' own rule for what it keeps
    in 16 bit (the output embeddings, tied weights and the last module).
    """
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return frozenset(
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    )


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """The weight as the 4-bit layer saw it: quantised and dequantised like Linear4bit."""
    import bitsandbytes.functional as bnbf

    # On a GPU machine quantise where training did (and ~100x faster than bitsandbytes'
    # CPU path, which takes ~1 s per 10M weights on 2 cores).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = bnbf.quantize_4bit(
        weight.to(device=device, dtype=compute_dtype).contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
    )
    return bnbf.dequantize_4bit(packed, state).cpu()


def make_plan(run: RunInfo, adapter: LoraAdapter, merge_into: str) -> MergePlan:
    base = base_tensors(run.base_dir)
    _check_adapter_fits(base, adapter)
    nf4 = frozenset()
    if merge_into == "dequantized":
        nf4 = nf4_weight_names(run.base_dir, run.trust_remote_code)
    return MergePlan(base, adapter, merge_into, DTYPES[run.compute_dtype], nf4)


def merged_tensors(plan: MergePlan) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for every base tensor, merged where the adapter has a module."""
    for file, specs in groupby(plan.base, key=lambda spec: spec.file):
        with safe_open(str(file), framework="pt") as f:
            for spec in specs:
                yield spec.name, merge_one(plan, spec.name, f.get_tensor(spec.name))


def merge_one(plan: MergePlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """One base tensor, NF4 round trip if it was 4-bit in training, plus its delta."""
    if name in plan.nf4_names:
        tensor = nf4_round_trip(tensor, plan.compute_dtype)
    tensor = tensor.float()
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in plan.adapter.A:
        tensor += plan.adapter.delta(module)
    return tensor


def _check_adapter_fits(base: list[TensorSpec], adapter: LoraAdapter) -> None:
    shapes = {spec.name: spec.shape for spec in base}
    for module in adapter.A:
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            raise UserError(f"the adapter module {module} has no weight {module}.weight in the base model")
        expected = (adapter.B[module].shape[0], adapter.A[module].shape[1])
        if tuple(shape) != expected:
            raise UserError(f"the adapter module {module} is {expected}, the base weight is {tuple(shape)}")
