"""Export of a finished run: merge, hf folder, GGUF LoRA, whole-model GGUF, CLI errors.

Every test builds a tiny finished run folder by hand (random Llama weights, a small
byte-level BPE tokenizer with a ChatML template, a peft LoRA adapter with a different
rank per module and non-zero B) the way docs/CONTRACTS.md describes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from l1ra_lite.cli import main as cli_main
from l1ra_lite.errors import UserError
from l1ra_lite.models import _cpu_has_native_bf16

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 320
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CORPUS = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital.",
    "numbers 123 456 and more words to merge",
] * 20


def build_tokenizer(qwen: bool = False):
    """A byte-level BPE tokenizer (GPT-2 style, with merges) and ChatML special tokens;
    with `qwen`, split before BPE as Qwen2's is (its regex, NFC, no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from l1ra_lite.export.gguf_vocab import QWEN2_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None if qwen else "<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>" if qwen else "<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def rank_of(path: str) -> int:
    """A different rank per module: 1..4 by layer and projection."""
    layer = int(path.split(".")[2])
    return 1 + (layer + TARGETS.index(path.rsplit(".", 1)[1])) % 4


def make_run(
    root: Path, quant: str = "none", compute_dtype: str = "float32", tied: bool = False, model_type: str = "llama"
) -> Path:
    """A finished run folder: base/ (16-bit), run/config.json, run/adapter/ (standard peft LoRA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = build_tokenizer(qwen=model_type.startswith("qwen"))
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tied,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    if model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        for name, param in model.named_parameters():  # q/k/v biases that move the logits
            if name.endswith("proj.bias"):
                param.data = torch.randn(param.shape) * 0.5
    elif model_type == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
        for name, param in model.named_parameters():  # per-head q/k norms that are not all 1
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.data = 1 + torch.rand(param.shape)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    base = root / "base"
    model.to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)

    model = model.float()
    paths = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    config = LoraConfig(
        r=2,
        lora_alpha=3.0,
        target_modules=TARGETS,
        rank_pattern={p: rank_of(p) for p in paths},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:  # non-zero A and B of a size that moves the logits visibly
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    run = root / "run"
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    run_config = {
        "model": str(base),
        "quant": quant,
        "compute_dtype": compute_dtype,
        "trust_remote_code": False,
        "base_model_path": str(base),
        "model_type": model_type,
        "total_steps": 1,
        "version": "0.1.0",
    }
    (run / "config.json").write_text(json.dumps(run_config))
    return run


def peft_logits(run: Path, ids: torch.Tensor, nf4: bool = False, bnb_cpu_inference: bool = False) -> torch.Tensor:
    """Logits of stock peft's adapter on the base (the reference every export must match),
    computed in fp32. On a CPU with AVX512-BF16, bitsandbytes would run an eval-mode 4-bit
    layer through its bf16 inference kernel (block scales rounded to bf16, bf16 matmul);
    `bnb_cpu_inference` allows that, otherwise the reference stays fp32 like the export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_path = json.loads((run / "config.json").read_text())["base_model_path"]
    kwargs = {}
    if nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **kwargs)
    if nf4 and not bnb_cpu_inference:
        from l1ra_lite.models import keep_4bit_layers_trainable

        keep_4bit_layers_trainable(base)  # compare like with like: fp32 on every CPU
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        return model(ids).logits


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 150, 7, 260, 31, 8, 200]])


@pytest.fixture(scope="module")
def run_none(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("none"))


@pytest.fixture(scope="module")
def run_nf4(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("nf4"), quant="nf4", compute_dtype="float32")


# ---------------------------------------------------------------- merge


def test_nf4_round_trip_matches_transformers_4bit_loading(run_nf4):
    """Our CPU NF4 round trip gives exactly the weights a BitsAndBytesConfig model holds."""
    import bitsandbytes as bnb
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from l1ra_lite.export.merge import nf4_round_trip, nf4_weight_names

    base = run_nf4.parent / "base"
    for compute in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=compute,
            device_map="cpu",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
        )
        quantised = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert {f"{n}.weight" for n in quantised} == nf4_weight_names(base, trust_remote_code=False)
        with safe_open(str(base / "model.safetensors"), framework="pt") as f:
            for name, module in quantised.items():
                loaded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                mine = nf4_round_trip(f.get_tensor(f"{name}.weight"), compute)
                assert mine.dtype == loaded.dtype == compute
                assert torch.equal(mine, loaded), name


def test_adapter_reading_gives_per_module_ranks_and_peft_scale(run_none):
    from l1ra_lite.export.lora import read_adapter

    adapter = read_adapter(run_none / "adapter")
    assert len(adapter.A) == 14
    path = "model.layers.1.mlp.down_proj"
    assert adapter.rank(path) == rank_of(path) == 4
    assert adapter.scale(path) == pytest.approx(3.0 / 4)
    ranks = {adapter.rank(p) for p in adapter.A}
    assert ranks == {1, 2, 3, 4}


def test_adapter_with_extra_tensor_is_refused(tmp_path, run_none):
    import shutil

    from safetensors.torch import load_file, save_file

    from l1ra_lite.export.lora import read_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(run_none / "adapter", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="only lora_A / lora_B"):
        read_adapter(adapter)


# ---------------------------------------------------------------- hf


def test_hf_export_f32_matches_peft_on_16bit_base(run_none, tmp_path):
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    out = export_hf(read_run(run_none), tmp_path / "hf", dtype="f32")
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (out / "tokenizer.json").is_file()
    reference = peft_logits(run_none, IDS)
    exported = hf_logits(out, IDS)
    base_only = hf_logits(run_none.parent / "base", IDS)
    assert (reference - base_only).abs().max() > 0.05  # the adapter really moves the logits
    assert (exported - reference).abs().max() <= 1e-3


def test_hf_export_dequantized_matches_peft_on_nf4_base(run_nf4, tmp_path):
    """Default for an nf4 run: merge into the dequantised NF4 weights the adapter saw."""
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    run = read_run(run_nf4)
    dequantized = export_hf(run, tmp_path / "deq", dtype="f32")
    original = export_hf(run, tmp_path / "orig", dtype="f32", merge_into="original")
    reference = peft_logits(run_nf4, IDS, nf4=True)
    assert (hf_logits(dequantized, IDS) - reference).abs().max() <= 1e-3
    # merging into the 16-bit weights instead gives a visibly different model
    assert (hf_logits(original, IDS) - reference).abs().max() > 1e-2


# bitsandbytes' bf16 CPU inference path exists only on CPUs with AVX512-BF16 / AMX.
BNB_CPU_PATHS = [False] + ([True] if _cpu_has_native_bf16() else [])


@pytest.mark.parametrize("bnb_cpu_inference", BNB_CPU_PATHS, ids=lambda on: "bnb-bf16-kernel" if on else "fp32")
def test_nf4_reference_on_the_cpu_kernel_this_machine_has(run_nf4, tmp_path, bnb_cpu_inference):
    """The f32 export against peft on NF4 through each CPU path of bitsandbytes this machine
    has: fp32 dequantise-and-matmul everywhere (1e-3), and on CPUs with native bf16 also
    its bf16 inference kernel, which is what generate uses there: documented bound 5e-2
    (bf16 carries ~3 significant digits on logits of |x| < 10; 0.015 seen on a Xeon)."""
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    exported = hf_logits(export_hf(read_run(run_nf4), tmp_path / "deq", dtype="f32"), IDS)
    reference = peft_logits(run_nf4, IDS, nf4=True, bnb_cpu_inference=bnb_cpu_inference)
    assert (exported - reference).abs().max() <= (5e-2 if bnb_cpu_inference else 1e-3)


def test_hf_export_f16_sharded(run_none, tmp_path):
    """f16 export: documented bound 2e-2 on these logits (|logit| < 10, f16 weights carry
    ~3 significant digits); sharding writes an index that transformers follows."""
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    out = export_hf(read_run(run_none), tmp_path / "hf16", dtype="f16", shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    diff = (hf_logits(out, IDS) - peft_logits(run_none, IDS)).abs().max()
    assert diff <= 2e-2


def test_hf_export_bf16_has_bf16_weights(run_none, tmp_path):
    from safetensors import safe_open

    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    out = export_hf(read_run(run_none), tmp_path / "hfbf", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_plan_shards_keeps_order_and_limit():
    from l1ra_lite.export.hf import plan_shards
    from l1ra_lite.export.merge import TensorSpec

    specs = [TensorSpec(f"t{i}", (10, n), Path("x")) for i, n in enumerate([5, 5, 30, 1, 1])]
    assert plan_shards(specs, 2, 200) == [["t0", "t1"], ["t2"], ["t3", "t4"]]


# ---------------------------------------------------------------- gguf-lora


def test_gguf_lora_reads_back_with_permutation_undone(run_none, tmp_path):
    import gguf

    from l1ra_lite.export.gguf_lora import export_gguf_lora
    from l1ra_lite.export.llama_gguf import unpermute_rows
    from l1ra_lite.export.lora import read_adapter
    from l1ra_lite.finished_run import read_run

    out = export_gguf_lora(read_run(run_none), tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(3.0)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(tensors) == 28 and all(a.dtype == np.float32 for a in tensors.values())

    adapter = read_adapter(run_none / "adapter")
    gguf_names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    heads = {"q_proj": 4, "k_proj": 2}
    for module in adapter.A:
        layer, proj = module.split(".")[2], module.rsplit(".", 1)[1]
        a = tensors[f"blk.{layer}.{gguf_names[proj]}.weight.lora_a"]
        b = tensors[f"blk.{layer}.{gguf_names[proj]}.weight.lora_b"]
        assert a.shape == (rank_of(module), adapter.A[module].shape[1])  # (r, in)
        assert b.shape == (adapter.B[module].shape[0], rank_of(module))  # (out, r)
        np.testing.assert_array_equal(a, adapter.A[module].numpy())
        if proj in heads:
            assert not np.array_equal(b, adapter.B[module].numpy())  # the permutation did act
            b = unpermute_rows(b, heads[proj])
        np.testing.assert_array_equal(b, adapter.B[module].numpy())


def test_permutation_matches_rotary_halves_to_pairs():
    """Row order within a head: [x0..x3 | y0..y3] -> x0 y0 x1 y1 ... (what llama.cpp's rope expects)."""
    from l1ra_lite.export.llama_gguf import permute_rows, unpermute_rows

    rows = np.arange(16).reshape(16, 1)  # 2 heads of 8 rows
    permuted = permute_rows(rows, 2)[:, 0]
    assert permuted.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    np.testing.assert_array_equal(unpermute_rows(permute_rows(rows, 2), 2), rows)


# ---------------------------------------------------------------- gguf (whole model)


def _gguf_weights(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    weights = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        weights[t.name] = values.reshape(tuple(int(d) for d in reversed(t.shape)))
    return weights, reader.fields


@pytest.mark.parametrize("dtype,tol", [("f32", 0.0), ("bf16", 1 / 128), ("q8_0", 1 / 127)])
def test_gguf_model_reads_back_as_the_merged_weights(run_nf4, tmp_path, dtype, tol):
    from safetensors import safe_open

    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.export.llama_gguf import DecoderLayout
    from l1ra_lite.finished_run import read_run

    run = read_run(run_nf4)
    merged_dir = export_hf(run, tmp_path / "hf", dtype="f32")  # checked against peft above
    path, modelfile = export_gguf(run, tmp_path / f"model-{dtype}.gguf", dtype=dtype)
    weights, fields = _gguf_weights(path)
    layout = DecoderLayout("llama", n_layers=2, n_head=4, n_kv_head=2, permute_qk=True)
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        assert len(weights) == len(list(f.keys()))
        for hf_name in f.keys():
            expected = f.get_tensor(hf_name).numpy()
            got = layout.from_gguf_rows(hf_name, weights[layout.tensor_name(hf_name)])
            assert got.shape == expected.shape
            # bf16 rounds each value, q8_0 each block of 32 to 1/127 of its largest value
            bound = tol * np.abs(expected).max() + 1e-7 if expected.ndim == 2 else 0.0
            assert np.abs(got - expected).max() <= bound, hf_name

    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count"].contents() == 4
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 16
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokenizer = build_tokenizer()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[tokenizer.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.token_type"].contents()[tokenizer.eos_token_id] == 3  # CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.merges"].contents()) > 10
    assert fields["tokenizer.chat_template"].contents() == CHATML
    text = modelfile.read_text()
    assert f"FROM ./model-{dtype}.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_gguf_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    """Llama 3.1 rope scaling becomes llama.cpp's rope_freqs tensor: 1 for high frequencies,
    `factor` for low ones, smooth in between."""
    from transformers import LlamaConfig

    from l1ra_lite.export.gguf_model import llama3_rope_factors

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    factors = llama3_rope_factors(config)
    assert factors.shape == (8,)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= -1e-5)
    # the one frequency between the two wavelength limits, by Llama 3.1's formula
    wavelength = 2 * np.pi * 500000.0 ** (2 / 16)
    smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
    assert factors[1] == pytest.approx(1 / ((1 - smooth) / 8.0 + smooth), rel=1e-5)
    assert llama3_rope_factors(LlamaConfig(hidden_size=64, num_attention_heads=4)) is None


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_gguf_model_of_qwen_reads_back_as_the_merged_weights(tmp_path, model_type):
    """Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms): llama.cpp's names, rows as
    transformers has them (no q/k permutation), Qwen2's pre-tokenizer."""
    from safetensors import safe_open

    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    run = read_run(make_run(tmp_path, model_type=model_type))
    merged_dir = export_hf(run, tmp_path / "hf", dtype="f32")
    path, _ = export_gguf(run, tmp_path / "model-f32.gguf", dtype="f32")
    weights, fields = _gguf_weights(path)
    extra = {"qwen2": "blk.0.attn_q.bias", "qwen3": "blk.0.attn_q_norm.weight"}[model_type]
    assert extra in weights and "blk.1.attn_k.weight" in weights and "output.weight" in weights
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        assert len(weights) == len(list(f.keys()))
        layout = read_layout(merged_dir, model_type)
        for hf_name in f.keys():
            assert np.array_equal(weights[layout.tensor_name(hf_name)], f.get_tensor(hf_name).numpy()), hf_name
    assert fields["general.architecture"].contents() == model_type
    assert fields[f"{model_type}.attention.head_count_kv"].contents() == 2
    assert fields[f"{model_type}.attention.key_length"].contents() == 16
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def read_layout(folder: Path, model_type: str):
    from l1ra_lite.export.llama_gguf import GGUF_MODEL_ARCHS, layout_for

    return layout_for(json.loads((folder / "config.json").read_text()), model_type, GGUF_MODEL_ARCHS)


def test_gguf_spm_style_tokenizer_for_mistral(tmp_path):
    """A byte-fallback BPE tokenizer (Mistral / Llama 2 style) is written as tokenizer model 'llama'."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.finished_run import read_run

    run = make_run(tmp_path, model_type="mistral")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    vocab.update({"▁": 259, "a": 260, "b": 261, "▁a": 262})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL_V03_TEMPLATE
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (run / "adapter" / name).unlink(missing_ok=True)
    fast.save_pretrained(run / "adapter")

    path, modelfile = export_gguf(read_run(run), tmp_path / "m.gguf", dtype="f16")
    _, fields = _gguf_weights(path)
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == VOCAB  # padded to the model's embedding rows
    assert tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == 6  # BYTE
    assert types[-1] == 5  # UNUSED padding
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "{{ .Content }}[/INST]" in modelfile.read_text()


# ---------------------------------------------------------------- Ollama's Modelfile


# Chat templates of other families, transcribed from the models' tokenizer_config.json (not
# downloaded: llama-cpp-python's llama_chat_format.py has the first two), with the parts for
# tools left out and the exception messages shortened.
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_V01_TEMPLATE = (  # Mistral-7B-Instruct-v0.1: "[INST] x [/INST]", no system messages
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, roles must alternate user/assistant/...") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles, and an optional first system message") }}
    {%- endif %}
{%- endfor %}
"""
# template -> (BOS, EOS, whether the Modelfile translates it, a line the Modelfile must have)
FAMILY_TEMPLATES = {
    "smollm2": (None, "<|im_end|>", True, 'PARAMETER stop "<|im_end|>"'),
    "chatml": (None, "<|im_end|>", True, 'PARAMETER stop "<|im_end|>"'),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", True, 'PARAMETER stop "<|eot_id|>"'),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>", True, "Today Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>"),
    "mistral-v0.3": ("<s>", "</s>", True, "{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"),
    "mistral-v0.1": ("<s>", "</s>", False, 'PARAMETER stop "</s>"'),
}


@pytest.mark.parametrize("template", list(FAMILY_TEMPLATES))
def test_modelfile_prompts_what_the_tokenizers_chat_template_does(template):
    """Ollama, given the Modelfile, writes every conversation exactly as the model's chat
    template does (less the BOS token, which llama.cpp adds), also the default system
    message SmolLM2's template adds, Llama 3.1's date header and Mistral v0.3's system
    message in the last [INST]; a template it would not write exactly gets no TEMPLATE."""
    from l1ra_lite.export.gotemplate import ollama_prompt
    from l1ra_lite.export.modelfile import default_system_message, modelfile_text
    from tests.tiny import SMOLLM2_TEMPLATE

    bos, eos, translated, line = FAMILY_TEMPLATES[template]
    tokenizer = build_tokenizer()
    tokenizer.chat_template = {
        "smollm2": SMOLLM2_TEMPLATE,
        "chatml": CHATML,
        "llama3": LLAMA3_TEMPLATE,
        "llama3.1": LLAMA31_TEMPLATE,
        "mistral-v0.3": MISTRAL_V03_TEMPLATE,
        "mistral-v0.1": MISTRAL_V01_TEMPLATE,
    }[template]
    if bos:
        tokenizer.bos_token, tokenizer.eos_token = bos, eos

    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    system = default_system_message(render)
    text = modelfile_text("m.gguf", tokenizer.chat_template, tokenizer.eos_token, system, render, tokenizer.bos_token)
    assert (system is not None) == (template == "smollm2")
    assert line in text
    assert ("TEMPLATE" in text) == translated
    if not translated:
        assert "-like but writes conversations differently" in text
        return
    modelfile_template = text.split('TEMPLATE """')[1].split('"""')[0]
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        [
            {"role": "system", "content": "Answer as a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr."},
            {"role": "user", "content": "Where is the gold?"},
        ],
    ]
    for conversation in conversations:
        expected = render(conversation, add_generation_prompt=True).removeprefix(bos or "\0")
        assert ollama_prompt(modelfile_template, conversation, system) == expected


def test_the_go_template_renderer_reads_what_ollama_reads():
    """gotemplate.py against text/template's documented behaviour on the constructs used."""
    from l1ra_lite.export.gotemplate import ollama_prompt, render_go_template

    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert (
        render_go_template("x  {{- range .Messages }} {{ .Role }} {{- end }}  \n", messages)
        == "x user assistant user  \n"
    )
    assert render_go_template("{{ range .Messages -}}  [{{ .Content }}] {{- end }}", messages) == "[a][b][c]"
    last = "{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}{{ .Content }}{{ end }}{{ end }}"
    assert render_go_template(last, messages) == "c"
    branch = '{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if ne .Role "x" }}A{{ else }}X{{ end }}{{ end }}'
    assert render_go_template(branch, messages) == "UAU"
    assert render_go_template("{{ if and .System (not false) }}[{{ $.System }}]{{ end }}", [], "s") == "[s]"
    assert render_go_template("{{ if .System }}x{{ end }}", [], "") == ""
    # Ollama: the Modelfile's SYSTEM only without a system message first; roles run together
    assert ollama_prompt("{{ .System }}|{{ range .Messages }}{{ .Content }};{{ end }}", messages[:1], "d") == "d|d;a;"
    same_role = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ollama_prompt("{{ range .Messages }}{{ .Content }};{{ end }}", same_role) == "a\n\nb;"


# ---------------------------------------------------------------- CLI and bad input


def set_aside(folder: Path) -> list[Path]:
    """What l1ra_lite.atomic left beside the targets: files being written or replaced."""
    return list(folder.glob(".*.tmp-*")) + list(folder.glob(".*.old-*"))


def test_cli_export_defaults_and_refuses_to_overwrite(run_none, capsys):
    target = run_none / "adapter.gguf"
    assert cli_main(["export", str(run_none), "--format", "gguf-lora"]) == 0
    assert target.is_file()
    before = target.read_bytes()
    assert cli_main(["export", str(run_none), "--format", "gguf-lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert target.read_bytes() == before
    assert cli_main(["export", str(run_none), "--format", "gguf-lora", "--overwrite"]) == 0
    assert not set_aside(run_none)


def test_cli_export_hf_default_folder(run_none):
    assert cli_main(["export", str(run_none), "--format", "hf"]) == 0
    config = json.loads((run_none / "export-hf" / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_merge_alias_writes_what_export_format_hf_writes(run_none, tmp_path, capsys):
    from safetensors.torch import load_file

    by_export, by_merge = tmp_path / "export", tmp_path / "merge"
    assert cli_main(["export", str(run_none), "--format", "hf", "--dtype", "f32", "--out", str(by_export)]) == 0
    assert cli_main(["merge", str(run_none), "--dtype", "f32", "--out", str(by_merge)]) == 0
    assert sorted(p.name for p in by_merge.iterdir()) == sorted(p.name for p in by_export.iterdir())
    a, b = load_file(str(by_export / "model.safetensors")), load_file(str(by_merge / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert cli_main(["merge", str(run_none), "--dtype", "f32", "--out", str(by_merge)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l1ra-lite merge: error:") and "--overwrite" in err[0]


def test_cli_gguf_default_name_and_modelfile(run_none):
    assert cli_main(["export", str(run_none), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert (run_none / "model-q8_0.gguf").is_file() and (run_none / "model-q8_0.Modelfile").is_file()


def test_cli_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["export", str(tmp_path), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished run" in err[0]
    assert cli_main(["export", str(tmp_path / "nope"), "--format", "hf"]) == 2


def test_cli_unsupported_architecture_for_gguf(run_none, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_none, run, ignore=shutil.ignore_patterns("export-hf", "*.gguf", "*.Modelfile"))
    config = json.loads((run / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (run / "config.json").write_text(json.dumps(config))
    assert cli_main(["export", str(run), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format hf" in err[0] and "gpt_neox" in err[0]
    assert not list(run.glob("*.gguf")) and not set_aside(run)


def test_cli_dequantized_merge_needs_nf4_run(run_none, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli_main(["export", str(run_none), "--format", "hf", "--merge-into", "dequantized", "--out", str(out)]) == 2
    assert "quant=none" in capsys.readouterr().err
    assert not out.exists()


def hide_llama_cpp(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))


def copied_run(run_none, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_none, run, ignore=shutil.ignore_patterns("export-hf", "*.gguf", "*.Modelfile"))
    return run


def test_quantised_gguf_without_llama_cpp_says_what_to_install(run_none, tmp_path, monkeypatch, capsys):
    hide_llama_cpp(monkeypatch)
    run = copied_run(run_none, tmp_path)
    assert cli_main(["export", str(run), "--format", "gguf", "--dtype", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'l1ra-lite[gguf]'" in err[0] and "make install-gguf" in err[0]
    assert not list(run.glob("*.gguf")) and not list(run.glob(".*"))


def test_keep_f16_goes_only_with_a_llama_cpp_type(run_none, capsys):
    assert cli_main(["export", str(run_none), "--format", "gguf", "--dtype", "q8_0", "--keep-f16"]) == 2
    assert "--keep-f16 goes with --format gguf --dtype q4_k_m|" in capsys.readouterr().err
    assert cli_main(["export", str(run_none), "--format", "gguf", "--dtype", "q3_k"]) == 2
    assert "q4_k_m, q5_k_m, q6_k, q4_0, q5_0 (got 'q3_k')" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [False, True])
def test_quantised_gguf_is_made_from_the_f16_export_which_goes_unless_kept(
    run_none, tmp_path, monkeypatch, capsys, keep
):
    """The steps around llama.cpp's quantiser (here a stand-in that halves the file): the
    f16 GGUF it reads is the `--dtype f16` export, kept only with --keep-f16; sizes reported."""
    from l1ra_lite.export import gguf_quantize
    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.finished_run import read_run

    run = copied_run(run_none, tmp_path)
    reference, _ = export_gguf(read_run(run), tmp_path / "reference.gguf")
    seen = {}

    def stand_in(src, dst, dtype):
        seen.update(src=src, dtype=dtype, data=src.read_bytes())
        dst.write_bytes(seen["data"][: len(seen["data"]) // 2])

    monkeypatch.setattr(gguf_quantize, "require_llama_cpp", lambda dtype: None)
    monkeypatch.setattr(gguf_quantize, "quantize", stand_in)
    monkeypatch.setattr(gguf_quantize, "tensor_types", lambda path: {"Q4_K": 14, "F32": 5})
    args = ["export", str(run), "--format", "gguf", "--dtype", "q4_k_m"] + (["--keep-f16"] if keep else [])
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert seen["dtype"] == "q4_k_m" and seen["data"] == reference.read_bytes()
    target = run / "model-q4_k_m.gguf"
    assert target.stat().st_size == reference.stat().st_size // 2
    assert "0.50 x the f16 GGUF's" in out and f"wrote {target}" in out
    assert "tensor types: 14 Q4_K, 5 F32" in out
    assert "FROM ./model-q4_k_m.gguf" in (run / "model-q4_k_m.Modelfile").read_text()
    assert (run / "model-f16.gguf").exists() == keep and (f"wrote {run / 'model-f16.gguf'}" in out) == keep
    assert not list(run.glob(".*"))  # the f16 file made aside is gone


def test_failed_export_leaves_existing_target_untouched(run_none, tmp_path):
    """An error in the middle of writing (here: a bad adapter) keeps the old file and no temp."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(run_none, run, ignore=shutil.ignore_patterns("export-hf", "*.gguf", "*.Modelfile"))
    target = run / "model-f16.gguf"
    target.write_bytes(b"old")
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(63, tensors[key].shape[1])
    save_file(tensors, str(run / "adapter" / "adapter_model.safetensors"))
    assert cli_main(["export", str(run), "--format", "gguf", "--overwrite"]) == 2
    assert target.read_bytes() == b"old"
    assert not set_aside(run)


def test_unfinished_run_advice_is_a_finetune_command_that_resumes_that_run(tmp_path):
    # The advice once named `finetune --output`, which starts a new run (or refuses the
    # existing folder); parsing it with the real CLI parser keeps it from drifting again.
    import re
    import shlex

    from l1ra_lite.cli import build_parser
    from l1ra_lite.finished_run import read_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(UserError) as caught:
        read_run(run_dir)
    commands = re.findall(r"`([^`]+)`", str(caught.value))
    assert len(commands) == 1, str(caught.value)
    words = shlex.split(commands[0])
    assert words[:2] == ["l1ra-lite", "finetune"]
    args = build_parser().parse_args(words[1:])  # an unknown flag or a missing value exits here
    assert args.command == "finetune" and args.resume == str(run_dir)
