"""An evaluation pass must leave the model exactly as trainable as it was.

bitsandbytes repacks 4-bit weights into an inference-only layout when a Linear4bit runs
in eval mode without grad on a CPU with AVX512-BF16; through that layout no gradient
flows, so after the first evaluation only the top adapters learned. These tests compare
the adapter gradients of one batch before and after an evaluation, on every compute
dtype this machine runs natively (fp32 everywhere, bf16 where the CPU has it), and
force bitsandbytes' bf16 CPU path on machines without it.
"""

import pytest
import torch

from l1ra_lite.data import collate
from l1ra_lite.l1ra import inject_adapters
from l1ra_lite.loss import causal_lm_loss
from l1ra_lite.models import ModelSource, _cpu_has_native_bf16, load_model
from l1ra_lite.train import evaluate
from tests.tiny import save_tiny_base

DTYPES = [torch.float32] + ([torch.bfloat16] if _cpu_has_native_bf16() else [])


def examples(n=6, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, 100, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return rows


def adapter_gradients(model, adapters, batch, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = {f"{p}.{k}": getattr(a, k).grad.clone() for p, a in adapters.items() for k in ("lora_A", "lora_B")}
    model.zero_grad(set_to_none=True)
    return grads


def trainable_tiny(tmp_path, quant, dtype):
    folder = save_tiny_base(tmp_path / "base")
    model = load_model(ModelSource("tiny", str(folder)), quant, "cpu", dtype)
    adapters = inject_adapters(model, budget=28, seed=0)
    with torch.no_grad():  # B = 0 at init would give A no gradient: make every rank live
        for adapter in adapters.values():
            adapter.lora_B.normal_(0, 0.02)
    model.train()
    return model, adapters


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_adapter_gradients_are_identical_before_and_after_an_evaluation(tmp_path, quant, dtype):
    model, adapters = trainable_tiny(tmp_path, quant, dtype)
    batch = collate(examples(4), pad_id=0)
    before = adapter_gradients(model, adapters, batch, dtype)
    assert all(g.abs().sum() > 0 for g in before.values())  # every adapter learns, the lowest too

    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": dtype == torch.bfloat16}
    evaluate(model, examples(6, seed=1), batch_size=2, pad_id=0, device="cpu", autocast=autocast)
    assert model.training

    after = adapter_gradients(model, adapters, batch, dtype)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_evaluation_never_repacks_4bit_weights_even_where_bitsandbytes_would(tmp_path, monkeypatch):
    """Force bitsandbytes' AVX512-BF16 CPU path (as on a Xeon with AMX): our loader must
    switch it off, so an evaluation pass never converts a weight to the layout that has
    no backward."""
    import bitsandbytes.nn.modules as bnb_modules

    repacked = []

    def refuse_repack(weight, quant_state, *args, **kwargs):
        repacked.append(tuple(weight.shape))
        raise AssertionError("a 4-bit weight was repacked for inference during training")

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", refuse_repack)
    model, adapters = trainable_tiny(tmp_path, "nf4", torch.float32)
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    evaluate(model, examples(4), batch_size=2, pad_id=0, device="cpu", autocast=autocast)
    assert repacked == []
    assert adapter_gradients(model, adapters, collate(examples(2), 0), torch.float32)


def test_weights_already_repacked_are_unpacked_for_training(tmp_path):
    """A model that was evaluated by other code first (repacked) is made trainable again:
    the weight is back in the trainable layout and dequantises to nearly the same values
    (the repack stores the block scales in bf16, so not exactly)."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit

    from l1ra_lite.models import keep_4bit_layers_trainable

    folder = save_tiny_base(tmp_path / "base")
    model = load_model(ModelSource("tiny", str(folder)), "nf4", "cpu", torch.float32)
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    original = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert layer.weight.quant_state.packing_format_for_cpu

    keep_4bit_layers_trainable(model)
    assert not layer.weight.quant_state.packing_format_for_cpu
    restored = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert restored.shape == original.shape
    assert (restored - original).abs().max() <= 0.01 * original.abs().max()
