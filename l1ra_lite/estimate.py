"""Peak GPU memory of a QLoRA + L1RA training run, predicted from the model config alone.

No weights are loaded: the model is built on the meta device (shapes only) to count the
parameters of every linear layer. The peak of a training step is the sum of these parts:

- weights_4bit     decoder linear layers in NF4 as bitsandbytes stores them: 4 bits a weight
                   packed in bytes, one 8-bit absmax per block of 64 (double quantisation),
                   one fp32 absmax per 256 of those, the two code books and the offset:
                   ~4.127 bits a weight (0.5 + 0.0158 bytes).
- weights_16bit    everything left in the compute dtype: embeddings, lm_head (never
                   quantised), norms, biases (4 bytes each with --dtype fp32).
- adapters         A (r x in), B (out x r) and the gate c (r) in fp32, with their gradients
                   and two AdamW moments (16 bytes a parameter), plus a per-rank step count.
                   Reallocation moves rank between matrices of different sizes, so the
                   adapter memory is a range: low = the budget spread evenly over the
                   adapters (the start), high = every rank on the largest adapted matrix.
                   The total uses the high end.
- checkpoints      gradient checkpointing keeps one 16-bit hidden state per decoder layer,
                   plus the final norm's input and output.
- backward_peak    the larger of the two moments of the backward pass:
                   the loss: 16-bit logits, the fp32 log-softmax saved, the gradient
                   arriving from the loss and the one it produces (14 bytes a logit), for
                   one chunk of positions where the loss is chunked (l1ra_lite.loss: llama,
                   mistral, qwen2/3), for every token otherwise; or
                   one decoder layer recomputed and back-propagated: what it saves (norms in
                   fp32, q/k/v and the sdpa output with no seq x seq matrix, the MLP
                   intermediates, the adapter inputs), the gradients in flight, one
                   dequantised 16-bit weight, and, where the loss is not chunked, the
                   16-bit logits the model output still holds.
- cuda_context     the CUDA context and library handles (not visible to torch's allocator).
- fragmentation    the caching allocator reserves more than it hands out: less with
                   expandable segments (the CLI's default, see
                   l1ra_lite.models.configure_cuda_allocator) than with fixed segments.

The compute dtype sets the size of what is "16-bit" above: bf16 and fp16 (what "auto"
picks on any CUDA card) take 2 bytes, fp32 takes 4 for the activations, the logits, the
16-bit weights and the dequantised weight, while what is fp32 anyway (the log-softmax,
norm statistics, adapters and their optimiser state) stays as it is.

`Estimate.allocated_bytes` leaves the last two out: it is the figure to compare with
`torch.cuda.max_memory_allocated()`.

The adapters counted here follow the injection's rule: every `nn.Linear` inside the
decoder blocks by default, or those whose module path ends with one of `target_modules`
(peft's suffix match); the default budget is 8 ranks an adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from l1ra_lite.aliases import ALIASES, DEFAULT_MODEL, hub_id, looks_like_alias
from l1ra_lite.errors import UserError
from l1ra_lite.module_paths import layer_index, matches_target

if TYPE_CHECKING:  # heavy imports only where used
    from l1ra_lite.config import FinetuneConfig

GIB = 1 << 30
MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"

# bitsandbytes' 4-bit layout (Linear4bit with quant_type nf4, compress_statistics=True).
NF4_BLOCKSIZE = 64  # weights per absmax
NESTED_BLOCKSIZE = 256  # absmax values per fp32 nested absmax (double quantisation)
NF4_CODE_ENTRIES = 16  # fp32 code book of the 4-bit type
NESTED_CODE_ENTRIES = 256  # fp32 code book of the 8-bit absmax
CUDA_BLOCK = 512  # torch's caching allocator rounds every allocation up to this

BYTES_16BIT = 2  # compute dtype bf16 / fp16
FP32_BYTES = 4
ADAPTER_BYTES_PER_PARAM = 4 * 4  # fp32 value, gradient, two Adam moments
RANK_STEP_BYTES = 8  # per-rank step count kept by the optimiser (bias correction)
# 2 (16-bit logits) + 4 (saved log-softmax) + 4 + 4 (gradients); measured 14.0 for
# transformers' ForCausalLMLoss while the model output still holds the logits
LOSS_BYTES_PER_LOGIT = 14

CUDA_CONTEXT_BYTES = int(0.6 * GIB)
# Reserved beyond allocated, as a share of the allocated peak, with the allocator's
# default fixed-size segments: each cudaMalloc'd segment only serves requests that fit
# its free blocks, and padded batches change shape every step.
FRAGMENTATION = 0.08
# The same with expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,
# which the CLI sets unless the user chose allocator settings). The allocator then keeps
# one segment per stream and pool and grows it by mapping more physical pages (20 MiB at
# a time for large blocks), so a freed block merges with its free neighbours and any
# later request that fits reuses it (PyTorch PR #96995 "Expandable blocks in allocator";
# PyTorch DevLog "When does fragmentation occur in the CUDA caching allocator?", 2026-06).
# What stays reserved beyond the peak is the last page's rounding (20 MiB: 0.3% of a
# 6 GiB peak) and holes between long-lived tensors that a step's transients do not fit.
# 3% is a guess, as the 8% above is, until bench/gpu.sh measures
# max_memory_reserved / max_memory_allocated both ways.
EXPANDABLE_FRAGMENTATION = 0.03

PART_LABELS = {
    "weights_4bit": "base weights, 4-bit NF4 + constants",
    "weights_16bit": "embeddings, head, norms (16-bit)",  # part_label names fp32 where it is
    "adapters": "adapters + grads + AdamW (high end)",
    "checkpoints": "checkpointed hidden states",
    "backward_peak": "backward peak",
    "cuda_context": "CUDA context",
    "fragmentation": "allocator fragmentation",  # part_label adds the share
}

# alias -> bundled config file; the instruct models share their base's shapes.
BUNDLED_CONFIGS = {
    "mistral-7b": "mistral-7b.json",  # mistralai/Mistral-7B-v0.3
    "mistral-7b-instruct": "mistral-7b.json",
    "llama-3.1-8b": "llama-3.1-8b.json",  # meta-llama/Llama-3.1-8B
    "llama-3.1-8b-instruct": "llama-3.1-8b.json",
    "qwen2.5-7b": "qwen2.5-7b.json",  # Qwen/Qwen2.5-7B
    "qwen2.5-7b-instruct": "qwen2.5-7b.json",
    "smollm2-135m": "smollm2-135m.json",  # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m-instruct": "smollm2-135m.json",
}


@dataclass(frozen=True)
class LinearShape:
    path: str  # full module path, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its meta-device build."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    quantised: list[LinearShape]  # linear layers stored in 4-bit (empty when quant is none)
    params_16bit: int  # every other parameter, kept in the compute dtype
    buffer_bytes: int  # e.g. rotary inv_freq
    adapted: list[LinearShape]  # linear layers that get an adapter


@dataclass
class Estimate:
    model: str
    budget: int
    n_adapters: int
    seq_len: int
    batch_size: int
    parts: dict[str, int]  # bytes, in PART_LABELS order; they add up to total_bytes
    adapter_range: tuple[int, int]  # (low, high) bytes of adapters + optimiser state
    loss_phase_bytes: int  # the two candidates for backward_peak
    layer_phase_bytes: int
    dtype: str  # the compute dtype asked for (DTYPE_CHOICES)
    expandable_segments: bool  # whether the allocator was taken to use them
    fragmentation_share: float  # reserved beyond allocated, as a share of allocated

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def allocated_bytes(self) -> int:
        """The peak torch's allocator hands out (compare with max_memory_allocated)."""
        return self.total_bytes - self.parts["cuda_context"] - self.parts["fragmentation"]

    def headroom(self, gpu_gib: float) -> float:
        """Share of a card of `gpu_gib` GiB left free at the peak (negative: does not fit)."""
        return 1.0 - self.total_bytes / (gpu_gib * GIB)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "budget": self.budget,
            "n_adapters": self.n_adapters,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "parts": dict(self.parts),
            "parts_gib": {k: round(v / GIB, 4) for k, v in self.parts.items()},
            "adapter_range_bytes": list(self.adapter_range),
            "loss_phase_bytes": self.loss_phase_bytes,
            "layer_phase_bytes": self.layer_phase_bytes,
            "allocated_bytes": self.allocated_bytes,
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_gib, 4),
            "dtype": self.dtype,
            "expandable_segments": self.expandable_segments,
            "fragmentation_share": self.fragmentation_share,
        }


# --- model config ---------------------------------------------------------------------


def bundled_config_path(alias: str) -> Optional[Path]:
    name = BUNDLED_CONFIGS.get(alias)
    return MODEL_CONFIGS_DIR / name if name else None


def resolve_model_config(name: Optional[str], trust_remote_code: bool = False):
    """A transformers config for a model name, without downloading weights.

    None: the embedded default. A folder: its config.json. An alias (or the hub id an
    alias stands for): the config bundled with the package, so no network is needed.
    Anything else is a hub id: its config from the Hugging Face cache, else from the hub.
    """
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return config_from_json(path / "config.json")
    alias = _alias_for(name)
    if alias is not None and bundled_config_path(alias) is not None:
        return config_from_json(bundled_config_path(alias))
    if looks_like_alias(name):
        name = hub_id(name)  # raises the one-line "unknown model alias" error
    from l1ra_lite.models import ModelSource, load_config

    try:  # the hub cache first; one quick request, not a minute of retries, when the hub is down
        return load_config(ModelSource(name, name), trust_remote_code)
    except UserError as err:
        raise UserError(
            f"cannot read the config of {name!r}: {err}; these aliases need no hub: "
            f"{', '.join(sorted(BUNDLED_CONFIGS))}"
        ) from None


def _alias_for(name: str) -> Optional[str]:
    if name in ALIASES:
        return name
    for alias, repo in ALIASES.items():  # a hub id an alias points to: same config
        if repo == name and alias in BUNDLED_CONFIGS:
            return alias
    return None


def config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise UserError(f"{path} is not a model config (no model_type)")
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unsupported model config ({err})") from None


# --- model shape ----------------------------------------------------------------------


def adapted_linears(model, target_modules: Optional[list[str]] = None) -> list[tuple[str, Any]]:
    """The (path, nn.Linear) pairs that get an adapter.

    Default: every nn.Linear inside the decoder blocks (its path has a layer index).
    With `target_modules`: the nn.Linear whose path equals or ends with `.<name>`.
    """
    import torch

    chosen = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if target_modules is None:
            wanted = layer_index(path) is not None
        else:
            wanted = any(matches_target(path, t) for t in target_modules)
        if wanted:
            chosen.append((path, module))
    return chosen


def model_shape(model_config, target_modules: Optional[list[str]] = None, quant: str = "nf4") -> ModelShape:
    """Build the model on the meta device and sort its parameters into 4-bit, 16-bit, adapted."""
    import torch
    from transformers import AutoModelForCausalLM

    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    dims = _decoder_dims(text)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, TypeError, ImportError) as err:
        kind = model_config.model_type
        raise UserError(f"cannot build a causal LM from the {kind!r} config ({err})") from None

    head = model.get_output_embeddings()
    quantised = []
    quantised_weights = set()
    if quant == "nf4":  # transformers' bnb quantiser converts every Linear but the head
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                quantised.append(_shape(path, module))
                quantised_weights.add(id(module.weight))
    params_16bit = sum(p.numel() for p in model.parameters() if id(p) not in quantised_weights)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    adapted = [_shape(path, module) for path, module in adapted_linears(model, target_modules)]
    if not adapted:
        wanted = ", ".join(target_modules) if target_modules else "linear layers in decoder blocks"
        raise UserError(f"no module of {model_config.model_type!r} matches the target modules ({wanted})")
    return ModelShape(
        model_type=model_config.model_type,
        quantised=quantised,
        params_16bit=params_16bit,
        buffer_bytes=buffer_bytes,
        adapted=adapted,
        **dims,
    )


def _shape(path: str, module) -> LinearShape:
    return LinearShape(path, module.in_features, module.out_features)


def _decoder_dims(text_config) -> dict[str, int]:
    names = {
        "hidden": "hidden_size",
        "intermediate": "intermediate_size",
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "vocab": "vocab_size",
    }
    dims = {}
    for key, attr in names.items():
        value = getattr(text_config, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise UserError(
                f"cannot estimate memory for {text_config.model_type!r}: its config has no {attr} "
                "(the estimator knows llama-family decoder configs)"
            )
        dims[key] = value
    return dims


# --- the parts ------------------------------------------------------------------------


def cuda_bytes(nbytes: int) -> int:
    """Bytes the caching allocator hands out for a tensor of `nbytes`."""
    return max(1, math.ceil(nbytes / CUDA_BLOCK)) * CUDA_BLOCK


def nf4_bytes(numel: int) -> int:
    """One weight matrix in bitsandbytes' NF4 with double quantisation, as allocated."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return (
        cuda_bytes(math.ceil(numel / 2))  # packed 4-bit weights, two a byte
        + cuda_bytes(blocks)  # 8-bit absmax a block
        + cuda_bytes(4 * nested_blocks)  # fp32 absmax of the absmax
        + cuda_bytes(4 * NESTED_CODE_ENTRIES)  # 8-bit code book
        + cuda_bytes(4)  # offset (mean absmax)
        + cuda_bytes(4 * NF4_CODE_ENTRIES)  # NF4 code book
    )


def bytes_per_rank(linear: LinearShape) -> int:
    """One rank of an adapter: a row of A, a column of B and a gate, with their optimiser state."""
    return (linear.in_features + linear.out_features + 1) * ADAPTER_BYTES_PER_PARAM + RANK_STEP_BYTES


def adapter_range(adapted: list[LinearShape], budget: int) -> tuple[int, int]:
    """(low, high) bytes: the budget spread evenly, or all of it on the largest matrix."""
    # The split alone, not initial_ranks: an estimate answers even for a budget that
    # training would refuse (fewer ranks than adapters).
    from l1ra_lite.l1ra.inject import even_split

    low = sum(r * bytes_per_rank(lin) for r, lin in zip(even_split(budget, len(adapted)), adapted))
    high = budget * max(bytes_per_rank(lin) for lin in adapted)
    return low, high


def compute_bytes(dtype: str) -> int:
    """Bytes of one value in the compute dtype `dtype` (one of DTYPE_CHOICES): "auto" picks
    bf16 or fp16 on every CUDA card (l1ra_lite.models.compute_dtype), so 2 bytes."""
    from l1ra_lite.models import DTYPE_CHOICES

    if dtype not in DTYPE_CHOICES:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {dtype!r})")
    return FP32_BYTES if dtype == "fp32" else BYTES_16BIT


def _upcast_bytes(value_bytes: int) -> int:
    """Bytes of the fp32 copy that norms and the loss make of a compute-dtype value: none
    when it is fp32 already (`.float()` and `.to(float32)` return the tensor itself)."""
    return FP32_BYTES if value_bytes < FP32_BYTES else 0


def checkpoint_bytes(shape: ModelShape, tokens: int, value_bytes: int = BYTES_16BIT) -> int:
    """One hidden state a layer in the compute dtype, plus the final norm (its input, its
    fp32 copy where the input is 16-bit, its output)."""
    per_layer = shape.layers * tokens * shape.hidden * value_bytes
    final_norm = tokens * shape.hidden * (value_bytes + _upcast_bytes(value_bytes) + value_bytes)
    return per_layer + final_norm


def chunked_loss(shape: ModelShape) -> bool:
    """Whether training computes this model's loss a chunk of positions at a time."""
    from l1ra_lite.loss import PLAIN_HEAD_MODEL_TYPES

    return shape.model_type in PLAIN_HEAD_MODEL_TYPES


def loss_phase_bytes(shape: ModelShape, tokens: int, value_bytes: int = BYTES_16BIT) -> int:
    """The loss on the logits: logits in the compute dtype, fp32 log-softmax saved, two fp32
    gradients, for every token, or for one chunk plus the gathered hidden states and their
    gradient."""
    per_logit = LOSS_BYTES_PER_LOGIT - BYTES_16BIT + value_bytes  # fp32 logits: 16 bytes
    if not chunked_loss(shape):
        return tokens * shape.vocab * per_logit
    from l1ra_lite.loss import chunk_tokens

    chunk = min(tokens, chunk_tokens(shape.vocab))
    return chunk * shape.vocab * per_logit + 2 * tokens * shape.hidden * value_bytes


def layer_phase_bytes(shape: ModelShape, tokens: int, quant: str, value_bytes: int = BYTES_16BIT) -> int:
    """One decoder layer recomputed and back-propagated (with the logits still held where
    the loss is not chunked); `value_bytes`: the compute dtype's size.

    The saved tensors are those autograd keeps for a transformers Llama / Mistral / Qwen2
    layer under 16-bit autocast (counted with saved_tensors_hooks on a small model with
    fp32 peft LoRA adapters); k and v are taken at full width, as when a padding mask makes
    sdpa repeat them. bitsandbytes dequantises a 4-bit weight to the compute dtype for each
    matmul, one at a time: the largest one is counted once.

    In fp32 (no autocast) two things differ beyond the size of a value: an RMSNorm's
    `.to(float32)` returns its input itself, which the norm then keeps (only the
    post-attention norm's is new: the input norm's is the checkpoint); and an adapter's
    `x.to(fp32)` is x itself, so the adapters keep no copies of their inputs. Checked
    against the training step traced on fake tensors (bench/memory_trace.py's counter,
    2026-11-29): Mistral-7B, budget 512, 2048 x 1, traced peak over estimated allocation
    0.942 in fp32 against 0.949 in bf16; the step's transient part 0.86 of the estimate's
    checkpoints + backward peak in both.
    """
    h, i, c = shape.hidden, shape.intermediate, value_bytes
    upcast = _upcast_bytes(c)
    saved_per_token = (
        (2 * upcast * h if upcast else c * h)  # two RMSNorms' fp32 inputs: copies, or the one new input
        + 2 * c * h  # the two norms' outputs (kept by the projections after them)
        + 5 * c * h  # q, k, v (repeated to every head), sdpa output, o_proj input
        + 4 * shape.heads  # sdpa's fp32 log-sum-exp, no seq x seq matrix
        + 4 * c * i  # MLP: gate, up, silu(gate), their product
        + (c * (2 * h + i) if upcast else 0)  # the adapters' copies of their inputs (autocast's casts)
    )
    grads_per_token = 3 * c * i + 2 * 4 * h  # MLP gradients in flight, fp32 norm gradients
    dequantised = c * max(lin.numel for lin in shape.quantised) if quant == "nf4" else 0
    held_logits = 0 if chunked_loss(shape) else tokens * shape.vocab * c
    return tokens * (saved_per_token + grads_per_token) + dequantised + held_logits


# --- the estimate ---------------------------------------------------------------------


def _check_settings(quant: str, seq_len: int, batch_size: int) -> None:
    from l1ra_lite.models import QUANT_CHOICES

    if quant not in QUANT_CHOICES:
        raise UserError(f"quant must be one of {', '.join(QUANT_CHOICES)} (got {quant!r})")
    for key, value in (("seq-len", seq_len), ("batch-size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{key} must be a positive integer (got {value!r})")


def estimate(
    model_config,
    *,
    budget: Optional[int],
    seq_len: int,
    batch_size: int,
    target_modules: Optional[list[str]] = None,
    quant: str = "nf4",
    model_name: Optional[str] = None,
    dtype: str = "auto",
    expandable_segments: Optional[bool] = None,
) -> Estimate:
    """Peak GPU memory of training with these settings (budget None: 8 ranks an adapter).

    `dtype`: the requested compute dtype (DTYPE_CHOICES; "auto" is 16-bit on CUDA).
    `expandable_segments`: whether the allocator uses them; None: what the CLI would set
    up in this process's environment (l1ra_lite.models.uses_expandable_segments).
    """
    from l1ra_lite.l1ra.inject import default_budget
    from l1ra_lite.models import uses_expandable_segments

    _check_settings(quant, seq_len, batch_size)
    value_bytes = compute_bytes(dtype)
    if expandable_segments is None:
        expandable_segments = uses_expandable_segments()
    fragmentation = EXPANDABLE_FRAGMENTATION if expandable_segments else FRAGMENTATION
    shape = model_shape(model_config, target_modules, quant)
    n_adapters = len(shape.adapted)
    budget = default_budget(n_adapters) if budget is None else budget
    if not isinstance(budget, int) or budget <= 0:
        raise UserError(f"budget must be a positive integer (got {budget!r})")
    tokens = seq_len * batch_size

    weights_4bit = sum(nf4_bytes(lin.numel) for lin in shape.quantised)
    weights_16bit = cuda_bytes(shape.params_16bit * value_bytes) + shape.buffer_bytes
    low, high = adapter_range(shape.adapted, budget)
    loss_phase = loss_phase_bytes(shape, tokens, value_bytes)
    layer_phase = layer_phase_bytes(shape, tokens, quant, value_bytes)
    parts = {
        "weights_4bit": weights_4bit,
        "weights_16bit": weights_16bit,
        "adapters": high,
        "checkpoints": checkpoint_bytes(shape, tokens, value_bytes),
        "backward_peak": max(loss_phase, layer_phase),
    }
    allocated = sum(parts.values())
    parts["cuda_context"] = CUDA_CONTEXT_BYTES
    parts["fragmentation"] = int(fragmentation * allocated)
    return Estimate(
        model=model_name or getattr(model_config, "_name_or_path", "") or shape.model_type,
        budget=budget,
        n_adapters=n_adapters,
        seq_len=seq_len,
        batch_size=batch_size,
        parts=parts,
        adapter_range=(low, high),
        loss_phase_bytes=loss_phase,
        layer_phase_bytes=layer_phase,
        dtype=dtype,
        expandable_segments=expandable_segments,
        fragmentation_share=fragmentation,
    )


def estimate_for_config(config: "FinetuneConfig", dtype: Optional[str] = None) -> Estimate:
    """The estimate for a finetune configuration (its model resolved without weights).

    `dtype` wins over the configuration's own `dtype` (a finetune option where the
    configuration has it), which wins over "auto".
    """
    model_config = resolve_model_config(config.model, config.trust_remote_code)
    return estimate(
        model_config,
        budget=config.budget,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        target_modules=config.target_modules,
        quant=config.quant,
        model_name=config.model or DEFAULT_MODEL,
        dtype=dtype or getattr(config, "dtype", None) or "auto",
    )


def part_label(est: Estimate, key: str) -> str:
    """PART_LABELS[key], with what this estimate assumed where a part depends on it."""
    if key == "weights_16bit" and est.dtype == "fp32":
        return "embeddings, head, norms (fp32)"
    if key == "fragmentation":
        return f"{PART_LABELS[key]} ({est.fragmentation_share:.0%})"
    return PART_LABELS[key]


def fit_sentence(est: Estimate, gpu_gib: float) -> str:
    room = est.headroom(gpu_gib)
    if room >= 0:
        return f"fits {gpu_gib:g} GiB with {room:.0%} headroom"
    return f"does NOT fit {gpu_gib:g} GiB: needs {est.total_gib:.2f} GiB"
