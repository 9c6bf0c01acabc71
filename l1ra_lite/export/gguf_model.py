"""`--format gguf`: the whole merged model as one GGUF file, for llama and mistral
(the llama.cpp-quantised types go through l1ra_lite.export.gguf_quantize).

Written in one pass without holding the model: the tensor list (names, shapes,
types) is known from the safetensors headers, so the GGUF header and tensor index are
written first, then each merged tensor is converted and appended as it streams by.
Memory: one tensor (and its converted copy) at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from l1ra_lite.errors import UserError
from l1ra_lite.export.gguf_quantize import LLAMA_CPP_DTYPES
from l1ra_lite.export.gguf_vocab import add_vocab
from l1ra_lite.export.llama_gguf import GGUF_MODEL_ARCHS, DecoderLayout, layout_for
from l1ra_lite.export.lora import read_adapter
from l1ra_lite.export.merge import MergePlan, make_plan, merged_tensors, resolve_merge_into
from l1ra_lite.export.modelfile import write_modelfile
from l1ra_lite.export.output import atomic_path, check_target
from l1ra_lite.finished_run import RunInfo

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; llama.cpp computes them


@dataclass
class GgufTensor:
    hf_name: Optional[str]  # None for tensors we compute (rope_freqs)
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType


def export_gguf(
    run: RunInfo,
    out: Path,
    dtype: str = "f16",
    merge_into: Optional[str] = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the merged model to `out` (.gguf) and an Ollama Modelfile next to it; return both."""
    modelfile = modelfile_path(out)
    check_target(modelfile, overwrite)  # before minutes of writing, not after
    write_gguf(run, out, dtype, merge_into, overwrite)
    write_modelfile(modelfile, out.name, run.tokenizer_dir, overwrite)
    return out, modelfile


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.parent / f"{gguf_path.stem}.Modelfile"


def write_gguf(
    run: RunInfo,
    out: Path,
    dtype: str = "f16",
    merge_into: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """The merged model as one GGUF file of a type the gguf package writes (GGUF_DTYPES)."""
    import gguf
    from transformers import AutoConfig

    if dtype not in GGUF_DTYPES:
        raise UserError(
            f"--dtype for --format gguf must be one of {', '.join(GGUF_DTYPES + LLAMA_CPP_DTYPES)} (got {dtype!r})"
        )
    base_config = json.loads((run.base_dir / "config.json").read_text(encoding="utf-8"))
    layout = layout_for(base_config, run.model_type, GGUF_MODEL_ARCHS)
    config = AutoConfig.from_pretrained(run.base_dir, trust_remote_code=run.trust_remote_code)
    check_target(out, overwrite)
    plan = make_plan(run, read_adapter(run.adapter_dir), resolve_merge_into(merge_into, run.quant))
    rope_factors = llama3_rope_factors(config)
    tensors = tensor_list(plan, layout, dtype, rope_factors)

    with atomic_path(out, overwrite) as temp:
        writer = gguf.GGUFWriter(str(temp), layout.arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(run.run_dir.name)
        add_hyperparameters(writer, config, dtype)
        add_vocab(writer, run.tokenizer_dir, int(config.vocab_size))
        for t in tensors:
            add_info(writer, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        write_data(writer, plan, layout, tensors, rope_factors)
        writer.close()
    return out


def add_hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise UserError(
            f"rope scaling {rope_type!r} is not written by l1ra-lite; use --format hf and llama.cpp's converter"
        )
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (older configs: rope_theta / rope_scaling)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def llama3_rope_factors(config) -> Optional[np.ndarray]:
    """Llama 3.1's rope scaling as llama.cpp wants it: per-frequency divisors (rope_freqs.weight)."""
    if rope_parameters(config).get("rope_type") != "llama3":
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(rope_parameters(config)["rope_theta"])
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float().numpy()


def tensor_list(plan: MergePlan, layout: DecoderLayout, dtype: str, rope_factors) -> list[GgufTensor]:
    """Every tensor of the file, in the order its data is written."""
    import gguf

    Q = gguf.GGMLQuantizationType
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    tensors = []
    for spec in plan.base:
        if spec.name.endswith(SKIPPED):
            continue
        qtype = wanted
        if len(spec.shape) == 1:
            qtype = Q.F32  # norms stay in float32, as llama.cpp's converter keeps them
        elif qtype == Q.Q8_0 and spec.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
            qtype = Q.F16  # rows that are not whole Q8_0 blocks
        tensors.append(GgufTensor(spec.name, layout.tensor_name(spec.name), spec.shape, qtype))
    if rope_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        tensors.append(GgufTensor(None, name, tuple(rope_factors.shape), Q.F32))
    return tensors


def add_info(writer, t: GgufTensor) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.qtype in (Q.F32, Q.F16):
        np_dtype = np.float32 if t.qtype == Q.F32 else np.float16
        writer.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), int(np.prod(t.shape)) * np.dtype(np_dtype).itemsize)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t.qtype)


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """float32 values -> the bytes (or float array) GGUF stores for `qtype`."""
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def write_data(writer, plan: MergePlan, layout: DecoderLayout, tensors: list[GgufTensor], rope_factors) -> None:
    expected = iter(tensors)
    for hf_name, tensor in merged_tensors(plan):
        if hf_name.endswith(SKIPPED):
            continue
        t = next(expected)
        assert t.hf_name == hf_name  # stream and tensor list walk the same base list
        rows = layout.to_gguf_rows(hf_name, tensor.numpy())
        writer.write_tensor_data(encode(rows, t.qtype))
        del tensor, rows
    if rope_factors is not None:
        t = next(expected)
        writer.write_tensor_data(encode(rope_factors, t.qtype))
