"""`--format hf`: the merged model as a plain transformers folder ("GGUF-ready").

safetensors weights (sharded above `shard_bytes`, with model.safetensors.index.json),
config.json without quantization_config and with the exported dtype, the base's
generation_config.json, the tokenizer files and chat template. transformers'
`from_pretrained`, vLLM and llama.cpp's convert_hf_to_gguf.py take it as is.

Memory: at most one output shard (5 GB by default) plus the tensor being merged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from l1ra_lite.atomic import save_tensors
from l1ra_lite.errors import UserError
from l1ra_lite.export.lora import read_adapter
from l1ra_lite.export.merge import MergePlan, TensorSpec, make_plan, merged_tensors, resolve_merge_into
from l1ra_lite.export.output import atomic_path
from l1ra_lite.finished_run import RunInfo

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_SHARD_BYTES = 5 * 10**9

# The tokenizer files a model folder may carry; copied as they are into the export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def export_hf(
    run: RunInfo,
    out: Path,
    dtype: str = "f16",
    merge_into: Optional[str] = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the merged model folder to `out` and return it."""
    if dtype not in HF_DTYPES:
        raise UserError(f"--dtype for --format hf must be one of {', '.join(HF_DTYPES)} (got {dtype!r})")
    torch_dtype = HF_DTYPES[dtype]
    merge_into = resolve_merge_into(merge_into, run.quant)
    plan = make_plan(run, read_adapter(run.adapter_dir), merge_into)
    with atomic_path(out, overwrite) as folder:
        folder.mkdir()
        write_weights(plan, folder, torch_dtype, shard_bytes)
        write_config(run.base_dir, folder, torch_dtype)
        copy_tokenizer(run, folder)
    return out


def plan_shards(base: list[TensorSpec], bytes_per_value: int, shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for spec in base:
        nbytes = bytes_per_value * _numel(spec.shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec.name)
        size += nbytes
    return shards


def write_weights(plan: MergePlan, folder: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    bytes_per_value = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(plan.base, bytes_per_value, shard_bytes)
    if len(shards) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = merged_tensors(plan)
    weight_map, total = {}, 0
    for names, file_name in zip(shards, file_names):
        shard = {}
        for name in names:
            streamed_name, tensor = next(stream)
            assert streamed_name == name  # the stream and the plan walk the same list
            shard[name] = tensor.to(dtype).contiguous()
            weight_map[name] = file_name
            total += shard[name].numel() * bytes_per_value
        save_tensors(shard, folder / file_name, metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(base_dir: Path, folder: Path, dtype: torch.dtype) -> None:
    """The base's config.json, minus quantisation, with the exported dtype."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = DTYPE_NAMES[dtype]
    if "torch_dtype" in config:  # older configs: keep the key their readers look for in step
        config["torch_dtype"] = DTYPE_NAMES[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")


def copy_tokenizer(run: RunInfo, folder: Path) -> None:
    """Tokenizer files and chat template as the run used them (adapter/, else the base)."""
    source = run.tokenizer_dir
    copied = 0
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied += 1
    if copied == 0:
        raise UserError(f"no tokenizer files in {source}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
