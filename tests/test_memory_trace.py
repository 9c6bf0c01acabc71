"""bench/memory_trace.py: the estimator against the product's training step traced on fake
tensors. The counter is checked on real tensors first, then the estimate on the
Mistral-7B shape at the recipes issue's setting (budget 512, seq 2048, batch 1)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `bench` package

from bench import memory_trace  # noqa: E402
from l1ra_lite.config import build_config  # noqa: E402
from l1ra_lite.estimate import estimate, resolve_model_config  # noqa: E402
from tests.tiny import tiny_llama_config  # noqa: E402

MIB = 1 << 20


def test_counter_follows_allocations_views_and_frees():
    counter = memory_trace.StorageBytes()
    with counter:
        a = torch.zeros(MIB // 4)  # 1 MiB of fp32
        b = torch.ones(MIB // 2, dtype=torch.bfloat16)  # 1 MiB
        view = a[:10]  # shares a's storage: not counted again
        counter.add(view)
        assert counter.current == 2 * MIB
        del b
        c = torch.empty(3 * MIB, dtype=torch.uint8)
        assert counter.current == 4 * MIB and counter.peak == 4 * MIB
        del a  # the view still holds the storage
        assert counter.current == 4 * MIB
        del view, c
    assert counter.current == 0 and counter.peak == 4 * MIB


@pytest.fixture(scope="module")
def mistral_trace():
    config = build_config(
        None, {"model": "mistral-7b", "budget": 512, "seq_len": 2048, "batch_size": 1, "grad_accum": 1}
    )
    return memory_trace.trace(config, steps=2)


def test_resident_weights_are_what_the_estimate_counts(mistral_trace):
    """NF4 weights as bitsandbytes' quantize_4bit makes them, 16-bit rest, adapters at
    the start (the budget spread evenly: the low end of the estimate's range)."""
    parts = mistral_trace["estimate_parts"]
    low, _ = estimate(resolve_model_config("mistral-7b"), budget=512, seq_len=2048, batch_size=1).adapter_range
    # Before the first step the adapters are A, B and gate alone (no gradients, no
    # optimiser state): more than nothing, less than the range's low end.
    counted = parts["weights_4bit"] + parts["weights_16bit"]
    assert counted < mistral_trace["resident_bytes"] < counted + low
    assert mistral_trace["resident_bytes"] == pytest.approx(counted, rel=0.01)


def test_traced_peak_is_within_15_percent_of_the_estimate(mistral_trace):
    ratio = mistral_trace["traced_over_estimate"]
    assert 1 - memory_trace.TOLERANCE <= ratio <= 1 + memory_trace.TOLERANCE, ratio
    # The optimiser state appears with the first step, then memory returns to the same level.
    first, second = mistral_trace["after_step_bytes"]
    assert first == second > mistral_trace["resident_bytes"]
    # The peak is a step's transient: checkpoints and one layer's backward, over 1 GiB here.
    assert mistral_trace["traced_peak_bytes"] - second > 1 << 30


def test_stock_peft_lora_traces_too_and_differs_by_the_gates(tmp_path):
    """The same step with peft's QLoRA layer: its resident adapters are L1RA's without
    the gate vector (one fp32 a rank)."""
    tiny_llama_config(vocab_size=512).save_pretrained(tmp_path)
    settings = {"model": str(tmp_path), "budget": 28, "seq_len": 32, "batch_size": 2, "grad_accum": 1}
    l1ra = memory_trace.trace(build_config(None, {**settings, "method": "l1ra"}), steps=1)
    lora = memory_trace.trace(build_config(None, {**settings, "method": "lora"}), steps=1)
    assert l1ra["resident_bytes"] - lora["resident_bytes"] == 28 * 4
    assert lora["method"] == "lora" and lora["traced_peak_bytes"] > lora["resident_bytes"]
