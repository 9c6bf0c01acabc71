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
