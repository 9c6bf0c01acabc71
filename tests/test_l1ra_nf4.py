"""L1RA on a 4-bit (NF4) base, in bf16, and with gradient checkpointing."""

import bitsandbytes as bnb  # noqa: E402
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from l1ra_lite.l1ra import L1RAOptimizer, RankState, inject_adapters, reallocate
from tests.tiny import random_batch, tiny_llama


def nf4_tiny(tmp_path, dtype=torch.float32):
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, dtype=dtype)


def train_steps(model, adapters, optimizer, steps, batch_seed=0, autocast=None):
    losses = []
    x = random_batch(batch_seed, batch=4, length=24)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        del loss
        optimizer.step()
        optimizer.zero_grad()
    return losses


def test_nf4_base_trains_only_the_adapters_and_reallocates(tmp_path):
    model = nf4_tiny(tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    adapters = inject_adapters(model, budget=42, seed=0)
    assert all(isinstance(a.base, bnb.nn.Linear4bit) for a in adapters.values())
    optimizer = L1RAOptimizer(adapters.values(), lr=1e-2, eta_c=0.05, l1_lambda=0.02)
    x = random_batch(0, batch=4, length=24)
    model(input_ids=x, labels=x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{p}.{k}" for p in adapters for k in ("lora_A", "lora_B", "gate")}
    optimizer.zero_grad()

    losses = train_steps(model, adapters, optimizer, 12)
    assert losses[-1] < losses[0] - 0.1

    state = RankState(42, {p: a.rank for p, a in adapters.items()})
    with torch.no_grad():  # force some prunable gates
        for a in list(adapters.values())[:3]:
            a.gate[0] = 0.0
    before = model(input_ids=x).logits.detach()
    event = reallocate(adapters, state, 12, optimizer.prune_threshold, optimizer)
    assert sum(event.pruned.values()) == 3 and sum(a.rank for a in adapters.values()) == 42
    after = model(input_ids=x).logits.detach()
    assert (after - before).abs().max() < 1e-4  # pruned gates were zero: same function
    more = train_steps(model, adapters, optimizer, 3)
    assert all(map(torch.isfinite, map(torch.tensor, more)))


def test_bf16_autocast_and_gradient_checkpointing_match_the_plain_path(tmp_path):
    model = tiny_llama(seed=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    adapters = inject_adapters(model, budget=28, seed=0)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(std=0.1)
    x = random_batch(0, batch=2, length=16)
    model(input_ids=x, labels=x).loss.backward()
    checkpointed = {p: a.lora_A.grad.clone() for p, a in adapters.items()}
    for a in adapters.values():
        a.lora_A.grad = a.lora_B.grad = a.gate.grad = None
    model.gradient_checkpointing_disable()
    model(input_ids=x, labels=x).loss.backward()
    for p, a in adapters.items():
        torch.testing.assert_close(a.lora_A.grad, checkpointed[p], atol=1e-6, rtol=1e-5)

    optimizer = L1RAOptimizer(adapters.values(), lr=1e-2)
    optimizer.zero_grad()
    losses = train_steps(model, adapters, optimizer, 8, autocast=torch.bfloat16)
    assert losses[-1] < losses[0]
    assert all(a.lora_A.dtype == torch.float32 for a in adapters.values())  # fp32 master weights


def test_bf16_model_weights(tmp_path):
    model = tiny_llama(seed=2).to(torch.bfloat16)
    adapters = inject_adapters(model, budget=14, seed=0)
    x = random_batch(0)
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(a.lora_B.grad is not None and torch.isfinite(a.lora_B.grad).all() for a in adapters.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_cuda_resize_frees_memory(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "cuda_base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM.from_pretrained(
        tmp_path / "cuda_base", quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    adapters = inject_adapters(model, budget=14 * 64, seed=0)
    optimizer = L1RAOptimizer(adapters.values(), lr=1e-2)
    x = random_batch(0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    state = RankState(14 * 64, {p: a.rank for p, a in adapters.items()})
    with torch.no_grad():
        for a in adapters.values():
            a.gate[1:] = 0.0  # everything but one rank per adapter is prunable
    reallocate(adapters, state, 1, optimizer.prune_threshold, optimizer)
    # Every adapter pruned all but one rank and got its share back round-robin: the total
    # and the memory are the same, so nothing of the old tensors is still allocated.
    assert sum(a.rank for a in adapters.values()) == 14 * 64
    assert abs(torch.cuda.memory_allocated() - before) < 1 << 20
    # Shrink one adapter for real: allocated memory drops by what its state held.
    first = next(iter(adapters.values()))
    per_rank = (first.in_features + first.out_features + 1) * 4 * 3 + 3 * 4  # param, 2 moments, steps
    from l1ra_lite.l1ra.realloc import resize_adapter

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    resize_adapter(first, [0], 0, optimizer)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= 0.9 * 63 * per_rank
