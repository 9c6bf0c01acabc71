"""The chunked causal-LM loss: the same loss and gradients as transformers', without the
whole logits tensor in memory."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from l1ra_lite.baselines import peft_adalora, peft_lora
from l1ra_lite.l1ra import inject_adapters
from l1ra_lite.loss import causal_lm_loss, chunk_tokens, plain_causal_lm
from tests.tiny import tiny_llama

VOCAB = 4096  # large enough that the logits dominate what the tiny model keeps


def answer_only_batch(seed: int = 0, batch: int = 2, length: int = 48, vocab: int = VOCAB) -> dict:
    """Random tokens, the second row padded at the end, labels only after the 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 10 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_with_trained_adapters(seed: int = 0):
    model = tiny_llama(seed, vocab_size=VOCAB)
    model.requires_grad_(False)
    adapters = inject_adapters(model, 4 * 14, None, 4.0, 0.0, seed=seed)
    torch.manual_seed(seed)
    for adapter in adapters.values():  # B = 0 would leave A without gradient
        torch.nn.init.normal_(adapter.lora_B, std=0.05)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def saved_activations(model, compute_loss) -> dict[int, tuple[int, tuple]]:
    """What autograd keeps for the backward pass besides the weights: storage -> (bytes, shape)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_loss()
    return saved


@pytest.mark.parametrize("chunk_logits", [VOCAB * 7, 1 << 24])  # several chunks, one chunk
def test_same_loss_and_gradients_as_transformers(chunk_logits):
    model = model_with_trained_adapters()
    batch = answer_only_batch()
    expected = model(**batch).loss
    expected_grads = torch.autograd.grad(expected, trainable(model))
    loss = causal_lm_loss(model, batch, chunk_logits=chunk_logits)
    grads = torch.autograd.grad(loss, trainable(model))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_same_loss_without_gradients_and_under_autocast():
    model = model_with_trained_adapters()
    batch = answer_only_batch(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            causal_lm_loss(model, batch, chunk_logits=VOCAB * 5), model(**batch).loss, rtol=1e-6, atol=1e-6
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(
                causal_lm_loss(model, batch, chunk_logits=VOCAB * 5), model(**batch).loss, rtol=2e-2, atol=2e-2
            )


def test_the_whole_logits_are_not_kept_for_the_backward_pass():
    model = model_with_trained_adapters()
    batch = answer_only_batch(length=64)
    stock = saved_activations(model, lambda: model(**batch).loss)
    chunked = saved_activations(model, lambda: causal_lm_loss(model, batch, chunk_logits=VOCAB * 16))
    fp32_logits = batch["input_ids"].numel() * VOCAB * 4
    assert any(shape[-1] == VOCAB for _, shape in stock.values())
    assert not any(shape[-1] == VOCAB for _, shape in chunked.values())
    # all that is kept instead is the hidden state of each labelled position
    assert sum(b for b, _ in stock.values()) - sum(b for b, _ in chunked.values()) > 0.95 * fp32_logits


def test_a_batch_without_labels_is_zero_and_backward_still_runs():
    model = model_with_trained_adapters()
    batch = answer_only_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in trainable(model))


def test_peft_lora_is_chunked_adalora_and_other_heads_use_their_own_loss():
    batch = answer_only_batch(vocab=128)
    base = tiny_llama(0)
    paths = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    lora = peft_lora(base, paths, [2] * len(paths), 2.0, 0.0)
    assert plain_causal_lm(lora) is lora.get_base_model()
    torch.testing.assert_close(causal_lm_loss(lora, batch), lora(**batch).loss, rtol=1e-6, atol=1e-6)

    adalora = peft_adalora(tiny_llama(0), paths, 2 * len(paths), 2.0, 0.0, 100, 10, 10)
    assert plain_causal_lm(adalora) is None  # its forward adds the orthogonality regulariser
    assert causal_lm_loss(adalora, batch).item() == adalora(**batch).loss.item()

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=128,
            final_logit_softcapping=30.0,
        )
    )
    assert plain_causal_lm(gemma) is None  # soft-capped logits
    assert causal_lm_loss(gemma, batch).item() == gemma(**batch).loss.item()


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens(128256) == 130  # Llama-3
    assert chunk_tokens(32768) == 512  # Mistral
    assert chunk_tokens(10**9) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_cuda_memory_is_lower():
    model = tiny_llama(0, vocab_size=32768, hidden_size=256, intermediate_size=512).cuda()
    model.requires_grad_(False)
    inject_adapters(model, 4 * 14, None, 4.0, 0.0, seed=0)
    batch = {k: v.cuda() for k, v in answer_only_batch(length=1024, vocab=32768).items()}

    def peak(compute_loss) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute_loss()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - start

    stock = peak(lambda: model(**batch).loss)
    chunked = peak(lambda: causal_lm_loss(model, batch))
    logits_bytes = batch["input_ids"].numel() * 32768 * (2 + 4)  # 16-bit logits and their fp32 copy
    assert stock - chunked >= logits_bytes / 2
