"""The VRAM estimator: exact byte counts where they are known, sane totals, monotone in
the settings, and the `l1ra-lite estimate` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from l1ra_lite.config import FinetuneConfig
from l1ra_lite.errors import UserError
from l1ra_lite.estimate import (
    GIB,
    adapted_linears,
    cuda_bytes,
    estimate,
    estimate_for_config,
    nf4_bytes,
    resolve_model_config,
)
from tests.tiny import tiny_llama_config  # noqa: E402

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def mistral():
    return resolve_model_config("mistral-7b")


def run_cli(capsys, *argv):
    """`l1ra-lite ARGV` in this process: (exit code, stdout, stderr)."""
    from l1ra_lite.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- exact parts ----------------------------------------------------------------------


def test_nf4_bytes_match_what_bitsandbytes_stores():
    import bitsandbytes.functional as functional
    import torch

    for rows, cols in ((64, 96), (128, 4096), (300, 7)):
        weight = torch.randn(rows, cols, dtype=torch.bfloat16)
        packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        stored = sum(cuda_bytes(t.numel() * t.element_size()) for t in tensors)
        assert nf4_bytes(rows * cols) == stored


def test_mistral_parts_match_hand_counts(mistral):
    est = estimate(mistral, budget=512, seq_len=2048, batch_size=1)
    h, i, layers, vocab, kv = 4096, 14336, 32, 32768, 1024
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # 6.98e9 decoder linear weights
    # 4 bits + one 8-bit absmax per 64 + one fp32 per 64*256, plus < 3 KiB of code books a layer
    bits = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert 0 <= est.parts["weights_4bit"] - bits < 224 * 3 * 1024
    sixteen = 2 * (2 * vocab * h + (2 * layers + 1) * h)  # embeddings, head, norms
    assert 0 <= est.parts["weights_16bit"] - sixteen < 4096
    assert est.n_adapters == 224
    # the high end: every rank on a gate/up/down projection (in + out = 18432), 16 bytes a
    # parameter (value, grad, two moments) and a per-rank step count
    assert est.adapter_range[1] == 512 * ((h + i + 1) * 16 + 8)
    assert est.parts["adapters"] == est.adapter_range[1]
    assert est.adapter_range[0] < est.adapter_range[1]
    assert est.parts["checkpoints"] == layers * 2048 * h * 2 + 2048 * h * 8
    # the loss is chunked (l1ra_lite.loss): 512 positions' logits at a time, 14 bytes a
    # logit, plus the gathered hidden states and their gradient
    assert est.loss_phase_bytes == 512 * vocab * 14 + 2 * 2048 * h * 2


def test_models_whose_loss_is_not_chunked_count_every_logit():
    from transformers import Gemma2Config  # soft-capped logits: the model's own loss

    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=128,
    )
    est = estimate(config, budget=None, seq_len=64, batch_size=2)
    assert est.loss_phase_bytes == 128 * 128 * 14


def test_mistral_budget_512_seq_2048_lands_between_5_and_10_gib(mistral):
    est = estimate(mistral, budget=512, seq_len=2048, batch_size=1)
    assert 5 < est.total_gib < 10
    assert est.total_bytes == sum(est.parts.values())
    assert est.allocated_bytes == est.total_bytes - est.parts["cuda_context"] - est.parts["fragmentation"]


def test_qwen_biases_and_adapter_count():
    est = estimate(resolve_model_config("qwen2.5-7b"), budget=None, seq_len=512, batch_size=1)
    h, layers, vocab = 3584, 28, 152064
    biases = layers * (h + 512 + 512)  # q, k, v projections keep 16-bit biases
    sixteen = 2 * (2 * vocab * h + (2 * layers + 1) * h + biases)
    assert 0 <= est.parts["weights_16bit"] - sixteen < 4096
    assert est.n_adapters == 7 * layers
    assert est.budget == 8 * est.n_adapters


def test_tied_embeddings_count_once():
    est = estimate(resolve_model_config("smollm2-135m"), budget=None, seq_len=256, batch_size=4)
    h, layers, vocab = 576, 30, 49152
    assert 0 <= est.parts["weights_16bit"] - 2 * (vocab * h + (2 * layers + 1) * h) < 4096
    assert est.n_adapters == 210 and est.budget == 1680


def test_auto_bf16_and_fp16_give_the_16bit_counts(mistral):
    settings = dict(budget=512, seq_len=2048, batch_size=1, expandable_segments=False)
    auto = estimate(mistral, **settings)
    assert auto.dtype == "auto"
    for dtype in ("bf16", "fp16"):
        assert estimate(mistral, dtype=dtype, **settings).parts == auto.parts


def test_fp32_doubles_the_16bit_values_and_nothing_else(mistral):
    settings = dict(budget=512, seq_len=2048, batch_size=1, expandable_segments=False)
    half, full = estimate(mistral, dtype="bf16", **settings), estimate(mistral, dtype="fp32", **settings)
    h, layers, vocab = 4096, 32, 32768
    assert full.parts["weights_4bit"] == half.parts["weights_4bit"]
    assert full.parts["adapters"] == half.parts["adapters"]  # fp32 in any case
    sixteen = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, head, norms: now 4 bytes each
    assert 0 <= full.parts["weights_16bit"] - 4 * sixteen < 4096
    # fp32 hidden states; the final norm keeps its input and output, no fp32 copy to make
    assert full.parts["checkpoints"] == layers * 2048 * h * 4 + 2048 * h * 8
    # fp32 logits (4 bytes where bf16 ones take 2), the log-softmax and gradients as before
    assert full.loss_phase_bytes == 512 * vocab * 16 + 2 * 2048 * h * 4
    # one layer's backward grows by well over half, not by more than double
    assert 1.5 * half.layer_phase_bytes < full.layer_phase_bytes < 2 * half.layer_phase_bytes
    assert full.total_bytes > half.total_bytes + (1 << 30)
    assert full.to_dict()["dtype"] == "fp32"


def test_unknown_dtype_is_a_user_error(mistral):
    with pytest.raises(UserError, match="dtype must be one of auto, bf16, fp16, fp32"):
        estimate(mistral, budget=8, seq_len=16, batch_size=1, dtype="int8")


def test_fragmentation_follows_the_allocator_setting(mistral, monkeypatch):
    from l1ra_lite import models
    from l1ra_lite.estimate import EXPANDABLE_FRAGMENTATION, FRAGMENTATION, part_label

    assert EXPANDABLE_FRAGMENTATION < FRAGMENTATION
    settings = dict(budget=512, seq_len=2048, batch_size=1)
    fixed = estimate(mistral, expandable_segments=False, **settings)
    grown = estimate(mistral, expandable_segments=True, **settings)
    assert fixed.allocated_bytes == grown.allocated_bytes
    assert fixed.parts["fragmentation"] == int(FRAGMENTATION * fixed.allocated_bytes)
    assert grown.parts["fragmentation"] == int(EXPANDABLE_FRAGMENTATION * grown.allocated_bytes)
    assert part_label(fixed, "fragmentation") == "allocator fragmentation (8%)"
    assert part_label(grown, "fragmentation") == "allocator fragmentation (3%)"
    # By default: what `l1ra-lite finetune` would set up in this environment.
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models.sys, "platform", "linux")
    assert estimate(mistral, **settings).parts == grown.parts  # the CLI's default
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")  # the user's own settings
    assert estimate(mistral, **settings).parts == fixed.parts
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256,expandable_segments:True")
    assert estimate(mistral, **settings).expandable_segments is True


# --- behaviour ------------------------------------------------------------------------


def test_estimate_grows_with_seq_len_batch_and_budget(mistral):
    def total(**kw):
        settings = dict(budget=512, seq_len=1024, batch_size=1)
        settings.update(kw)
        return estimate(mistral, **settings).total_bytes

    base = total()
    assert total(seq_len=2048) > base
    assert total(batch_size=2) > base
    assert total(budget=1024) > base
    assert total(seq_len=512) < base


def test_16bit_base_costs_more_than_nf4():
    cfg = tiny_llama_config()
    nf4 = estimate(cfg, budget=16, seq_len=32, batch_size=1)
    plain = estimate(cfg, budget=16, seq_len=32, batch_size=1, quant="none")
    assert plain.parts["weights_4bit"] == 0
    assert plain.parts["weights_16bit"] > nf4.parts["weights_16bit"] + nf4.parts["weights_4bit"]


def test_adapters_are_the_linear_layers_peft_all_linear_targets():
    """The default targets are what peft's all-linear picks: every Linear but the head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ours = {path for path, _ in adapted_linears(model)}
    assert len(ours) == 7 * cfg.num_hidden_layers
    peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A) > 0
    }
    assert ours == theirs
    # with one rank each the low end counts exactly peft's LoRA parameters plus one gate each
    est = estimate(cfg, budget=len(ours), seq_len=16, batch_size=1)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) // 2
    assert est.adapter_range[0] == (lora_params + len(ours)) * 16 + len(ours) * 8


def test_target_modules_select_by_suffix():
    cfg = tiny_llama_config()
    est = estimate(cfg, budget=8, seq_len=16, batch_size=1, target_modules=["q_proj", "v_proj"])
    assert est.n_adapters == 2 * cfg.num_hidden_layers
    with pytest.raises(UserError, match="matches the target modules"):
        estimate(cfg, budget=8, seq_len=16, batch_size=1, target_modules=["nothing_here"])


def test_bad_settings_are_user_errors(mistral):
    with pytest.raises(UserError):
        estimate(mistral, budget=0, seq_len=16, batch_size=1)
    with pytest.raises(UserError):
        estimate(mistral, budget=8, seq_len=0, batch_size=1)
    with pytest.raises(UserError):
        estimate(mistral, budget=8, seq_len=16, batch_size=1, quant="int3")


# --- model resolution -----------------------------------------------------------------


def test_aliases_and_their_hub_ids_resolve_offline():
    for alias, hidden in (("mistral-7b", 4096), ("llama-3.1-8b-instruct", 4096), ("qwen2.5-7b", 3584)):
        assert resolve_model_config(alias).hidden_size == hidden
    llama = resolve_model_config("meta-llama/Llama-3.1-8B")
    assert llama.vocab_size == 128256
    assert llama.rope_parameters["rope_type"] == "llama3"


def test_local_folder_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(tiny_llama_config().to_json_string())
    est = estimate_for_config(FinetuneConfig(model=str(folder), budget=28, seq_len=64, batch_size=2))
    assert est.n_adapters == 14 and est.budget == 28
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_config(str(empty))


def test_unknown_alias_is_a_user_error():
    with pytest.raises(UserError, match="unknown model alias"):
        resolve_model_config("not-a-model")


def test_default_config_estimates_the_embedded_model():
    est = estimate_for_config(FinetuneConfig())
    assert est.model == "smollm2-135m"
    assert est.seq_len == 512 and est.batch_size == 4


# --- command line ---------------------------------------------------------------------


def test_cli_json_parts_add_up(capsys):
    code, out, err = run_cli(
        capsys,
        "estimate", "--model", "mistral-7b", "--budget", "512", "--seq-len", "2048",
        "--batch-size", "1", "--gpu-memory", "8", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert sum(report["parts"].values()) == report["total_bytes"]
    assert report["total_gib"] == pytest.approx(report["total_bytes"] / GIB, abs=1e-4)
    assert 5 < report["total_gib"] < 10
    assert report["fits"] is True and 0 < report["headroom"] < 1
    assert report["budget"] == 512 and report["n_adapters"] == 224


def test_cli_dtype_fp32_costs_more(capsys):
    argv = ["estimate", "--model", "mistral-7b", "--budget", "512", "--seq-len", "2048", "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    auto = json.loads(out)
    code, out, err = run_cli(capsys, *argv, "--dtype", "fp32")
    assert code == 0, err
    full = json.loads(out)
    assert auto["dtype"] == "auto" and full["dtype"] == "fp32"
    assert full["total_bytes"] > auto["total_bytes"]
    assert full["parts"]["weights_4bit"] == auto["parts"]["weights_4bit"]
    code, out, err = run_cli(capsys, "estimate", "--model", "mistral-7b", "--dtype", "fp32")
    assert code == 0 and "embeddings, head, norms (fp32)" in out
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "estimate", "--model", "mistral-7b", "--dtype", "fp8")
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_cli_table_says_whether_it_fits(capsys):
    argv = ["estimate", "--model", "llama-3.1-8b", "--seq-len", "4096", "--gpu-memory", "8"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "total (peak)" in out
    assert "does NOT fit 8 GiB" in out


def test_cli_recipe_supplies_the_card_memory(capsys):
    code, out, err = run_cli(capsys, "estimate", "--recipe", "rtx3060-12gb-mistral7b", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["gpu_memory_gib"] == 12 and report["fits"] is True
    assert report["seq_len"] == 2048 and report["batch_size"] == 2 and report["budget"] == 1792


def test_cli_unknown_model_is_one_line(capsys):
    code, out, err = run_cli(capsys, "estimate", "--model", "no-such-model")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "unknown model alias 'no-such-model'" in err


def test_cli_unreachable_hub_id_is_one_line():
    # a subprocess, so that the hub client reads HF_HUB_OFFLINE (no retries against a dead network)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "l1ra_lite", "estimate", "--model", "nobody-here/no-such-model"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "cannot read the config of 'nobody-here/no-such-model'" in result.stderr
