"""The exported GGUF files run in llama.cpp (through llama-cpp-python) as they should.

Skipped where llama-cpp-python is not installed (`make test-gguf` installs it: it
compiles llama.cpp from the package index in a few minutes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# These need llama.cpp (llama-cpp-python, compiled at install): `make test-gguf` installs
# it and runs them; `make test` leaves them out (-m "not llama_cpp").
pytestmark = pytest.mark.llama_cpp

from test_export import hf_logits, make_run, peft_logits  # noqa: E402

IDS = [5, 17, 42, 99, 150, 7, 260, 31, 8, 200, 64, 3]


def llama_cpp_logits(model: Path, lora: Path | None = None) -> np.ndarray:
    kwargs = dict(model_path=str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    import llama_cpp

    llm = llama_cpp.Llama(**kwargs)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)], dtype=np.float32)


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory) -> Path:
    """Tied embeddings like SmolLM2: llama.cpp uses token_embd as the output matrix."""
    return make_run(tmp_path_factory.mktemp("lcpp"), quant="nf4", compute_dtype="float32", tied=True)


def test_whole_model_gguf_logits_match_hf_export(tied_run, tmp_path):
    """f32 GGUF vs the f32 hf export: llama.cpp keeps its KV cache in f16, hence 1e-2."""
    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    run = read_run(tied_run)
    hf = export_hf(run, tmp_path / "hf", dtype="f32")
    model, _ = export_gguf(run, tmp_path / "model-f32.gguf", dtype="f32")
    expected = hf_logits(hf, torch.tensor([IDS]))[0].numpy()
    got = llama_cpp_logits(model)
    assert np.abs(expected).max() > 1.0  # logits that are not all ~0
    assert np.abs(got - expected).max() <= 1e-2
    # q8_0 (weights and, in llama.cpp, activations rounded to 8 bits) stays close
    q8, _ = export_gguf(run, tmp_path / "model-q8_0.gguf", dtype="q8_0")
    got_q8 = llama_cpp_logits(q8)
    assert np.corrcoef(got_q8.ravel(), expected.ravel())[0, 1] > 0.999
    assert np.abs(got_q8 - expected).max() <= 0.25


def test_gguf_lora_moves_llama_cpp_logits_like_peft(tmp_path):
    """The GGUF LoRA on an F32 GGUF of the base changes llama.cpp's logits as the adapter
    changes transformers' (correlation of the logit deltas > 0.99)."""
    from safetensors.torch import load_file, save_file

    from l1ra_lite.export.gguf_lora import export_gguf_lora
    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.finished_run import read_run

    run_dir = make_run(tmp_path, quant="none", tied=True)
    # the base alone as GGUF: the same run with lora_B zeroed, merged into the original weights
    zero = tmp_path / "zero-run"
    shutil.copytree(run_dir, zero)
    adapter_file = zero / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(adapter_file))
    save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, str(adapter_file))
    base_gguf, _ = export_gguf(read_run(zero), tmp_path / "base-f32.gguf", dtype="f32")
    lora_gguf = export_gguf_lora(read_run(run_dir), tmp_path / "adapter.gguf")

    ids = torch.tensor([IDS])
    peft_delta = (peft_logits(run_dir, ids) - hf_logits(tmp_path / "base", ids))[0].numpy().ravel()
    llama_delta = (llama_cpp_logits(base_gguf, lora_gguf) - llama_cpp_logits(base_gguf)).ravel()
    assert np.abs(peft_delta).max() > 0.5
    assert np.corrcoef(peft_delta, llama_delta)[0, 1] > 0.99


# ---------------------------------------------------------------- llama.cpp-quantised files

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Tell me a joke about computers.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "Why is the sky blue?",
    "Name three colours.",
    "What do cats like to eat?",
]


@pytest.fixture(scope="module")
def embedded_run(embedded_model_dir, tmp_path_factory) -> Path:
    """A finished run on the embedded SmolLM2-135M-Instruct: a LoRA on every projection
    with small random A and B (a visible change, not a broken model)."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("embedded") / "run"
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(run / "adapter")
    config = {"quant": "none", "compute_dtype": "float32", "trust_remote_code": False, "model_type": "llama"}
    config.update(model=str(embedded_model_dir), base_model_path=str(embedded_model_dir), total_steps=1)
    (run / "config.json").write_text(json.dumps(config))
    return run


def prompt_tokens(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def llama_cpp_runs(model: Path, prompts: list[list[int]], new_tokens: int) -> list[tuple[np.ndarray, list[int]]]:
    """For each prompt: llama.cpp's logits at every prompt position, and its greedy continuation."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    runs = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        continuation = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            continuation.append(token)
            if len(continuation) == new_tokens:
                break
        runs.append((logits, continuation))
    return runs


def gguf_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# q4_k_m against f16, both in llama.cpp, on the embedded SmolLM2-135M with a random LoRA
# merged, over the 8 QUESTIONS (2026-11-29, 2-core AMD EPYC, llama-cpp-python 0.3.36):
# next-token top-1 agreement 0.917 over every prompt position, correlation of the logits
# 0.987, 7 of 8 greedy continuations equal over their first 4 tokens. (SmolLM2's 576-wide
# rows are not whole 256-value k-quant blocks: llama.cpp writes most of them as Q5_0.)
# The bounds leave room for another CPU's kernels.
Q4_K_M_TOP1_AGREEMENT = 0.85
Q4_K_M_LOGIT_CORRELATION = 0.97
Q4_K_M_SAME_START = 0.75  # share of continuations equal over their first 4 tokens


def test_q4_k_m_of_the_embedded_model_agrees_with_its_f16_export(embedded_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from l1ra_lite.cli import main

    assert main(["export", str(embedded_run), "--format", "gguf", "--dtype", "q4_k_m", "--keep-f16"]) == 0
    out = capsys.readouterr().out
    q4, f16 = embedded_run / "model-q4_k_m.gguf", embedded_run / "model-f16.gguf"
    assert "x the f16 GGUF's" in out and q4.stat().st_size < 0.45 * f16.stat().st_size
    types = gguf_types(q4)
    assert types["Q4_K"] > 0 and types["Q6_K"] > 0 and "F16" not in types  # Q4_K_M's mix, with fallbacks

    tokenizer = AutoTokenizer.from_pretrained(embedded_run / "adapter")
    prompts = [prompt_tokens(tokenizer, q) for q in QUESTIONS]
    reference, quantised = llama_cpp_runs(f16, prompts, 16), llama_cpp_runs(q4, prompts, 16)
    top1 = np.concatenate([(a.argmax(-1) == b.argmax(-1)) for (a, _), (b, _) in zip(reference, quantised)])
    logits_a = np.concatenate([a for a, _ in reference]).ravel()
    logits_b = np.concatenate([b for b, _ in quantised]).ravel()
    correlation = np.corrcoef(logits_a, logits_b)[0, 1]
    same_first = np.mean([a[:4] == b[:4] for (_, a), (_, b) in zip(reference, quantised)])
    print(f"top-1 agreement {top1.mean():.3f}, logit correlation {correlation:.4f}, same first 4 tokens {same_first}")
    print(f"types {types}, sizes q4_k_m {q4.stat().st_size} f16 {f16.stat().st_size}")
    assert top1.mean() >= Q4_K_M_TOP1_AGREEMENT
    assert correlation >= Q4_K_M_LOGIT_CORRELATION
    assert same_first >= Q4_K_M_SAME_START


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_whole_model_gguf_runs_in_llama_cpp_like_the_hf_export(tmp_path, model_type):
    """The qwen2 / qwen3 GGUF (f32) gives the hf export's logits in llama.cpp; its
    llama.cpp-quantised q4_k_m (64-wide rows: llama.cpp falls back to Q5_0 blocks) loads
    and stays close."""
    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.export.gguf_quantize import export_quantized_gguf
    from l1ra_lite.export.hf import export_hf
    from l1ra_lite.finished_run import read_run

    run = read_run(make_run(tmp_path, model_type=model_type))
    hf = export_hf(run, tmp_path / "hf", dtype="f32")
    model, _ = export_gguf(run, tmp_path / "model-f32.gguf", dtype="f32")
    expected = hf_logits(hf, torch.tensor([IDS]))[0].numpy()
    got = llama_cpp_logits(model)
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() <= 1e-2
    quantised = export_quantized_gguf(run, tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    assert quantised.bytes < quantised.f16_bytes
    correlation = np.corrcoef(llama_cpp_logits(quantised.path).ravel(), expected.ravel())[0, 1]
    print(f"{model_type} q4_k_m: {quantised.bytes} of {quantised.f16_bytes} bytes, logit correlation {correlation:.4f}")
    assert correlation > 0.95  # measured 0.974 for qwen3 (random tiny weights, Q5_0 / Q8_0 blocks)


def llama_cpp_chat(template: str, messages: list[dict[str, str]]) -> str:
    """The conversation as llama.cpp renders it from a GGUF's chat template (llama_chat_apply_template)."""
    import ctypes

    import llama_cpp

    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    buffer = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), True, buffer, len(buffer))
    assert 0 < n <= len(buffer), n
    return buffer.raw[:n].decode()


def test_chat_template_in_the_gguf_renders_a_conversation_as_the_tokenizer_does(embedded_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from l1ra_lite.export.gguf_model import export_gguf
    from l1ra_lite.finished_run import read_run

    path, modelfile = export_gguf(read_run(embedded_run), tmp_path / "model-q8_0.gguf", dtype="q8_0")
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    tokenizer = AutoTokenizer.from_pretrained(embedded_run / "adapter")
    conversation = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert template == tokenizer.chat_template
    assert llama_cpp_chat(template, conversation) == expected
    stops = [line.split('"')[1] for line in modelfile.read_text().splitlines() if line.startswith("PARAMETER stop")]
    assert tokenizer.eos_token in stops  # generation ends where the chat template ends a turn


def test_a_failed_quantisation_is_one_line_with_llama_cpps_reason(tmp_path):
    from l1ra_lite.errors import UserError
    from l1ra_lite.export.gguf_quantize import quantize

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(UserError) as caught:
        quantize(broken, tmp_path / "out.gguf", "q4_0")
    message = str(caught.value)
    assert "could not quantise the f16 GGUF to q4_0" in message and "\n" not in message
    assert not (tmp_path / "out.gguf").exists()
