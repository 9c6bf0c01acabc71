"""The causal-LM loss without the whole logits tensor.

transformers computes logits for every position of the batch (batch x seq x vocab) in 16
bits, upcasts them to fp32 and keeps both for the backward pass: about 14 bytes a token
per vocabulary entry, 3.4 GiB for Llama-3's 128k vocabulary at 2048 tokens, more than
everything else a checkpointed 8B model holds on an 8 GB card. Two things make that
unnecessary: only positions that have a label need logits (answer-only labels leave the
prompt out), and those need not exist all at once. So this runs the decoder, keeps the
hidden states of the labelled positions, and computes the head and the cross-entropy a
chunk of positions at a time, each chunk recomputed in the backward pass (checkpointed):
one chunk's logits live at any moment. The result is the same mean cross-entropy over
the labelled next tokens that transformers returns.

Only for causal LMs whose logits are exactly `lm_head(last_hidden_state)`; others (soft-
capped or scaled logits) and peft's AdaLoRA (its forward adds a regulariser to the loss)
use the model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from l1ra_lite.data import IGNORE_INDEX

# The architectures whose ForCausalLM.forward computes `logits = lm_head(hidden)` and
# nothing more (checked in transformers' source for each).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Logits alive at once: 16M entries, ~224 MiB with the fp32 copy and both gradients;
# 130 tokens of Llama-3's vocabulary, 512 of Mistral's.
CHUNK_LOGITS = 1 << 24


def plain_causal_lm(model: torch.nn.Module):
    """The transformers causal LM under `model` whose loss can be chunked, or None."""
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    if peft_type is not None:
        if peft_type != "LORA":  # AdaLoRA adds its orthogonality regulariser in forward
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    return model


def chunk_tokens(vocab_size: int, chunk_logits: int = CHUNK_LOGITS) -> int:
    return max(1, chunk_logits // vocab_size)


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def model_inputs(batch: dict) -> dict:
    """What the model is given. A packed batch (l1ra_lite.data.fit) has position ids that
    restart at each example, and no attention mask: transformers then attends only within
    each example (with a mask it would ignore the restarts); right padding needs no mask in
    a causal model, and carries no labels."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def causal_lm_loss(model: torch.nn.Module, batch: dict, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens of `batch` (input_ids, attention_mask,
    labels IGNORE_INDEX where there is nothing to predict).

    `labels` may stay on the CPU while the rest of the batch is on the GPU (the training
    loop does that): the labelled positions are then found on the CPU, and the GPU never
    has to report how many there are (a boolean-mask gather would make the host wait)."""
    device = batch["input_ids"].device
    inputs = model_inputs(batch)
    lm = plain_causal_lm(model)
    if lm is None:
        return model(**inputs, labels=batch["labels"].to(device)).loss
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    batch_size, length, width = hidden.shape
    next_labels = batch["labels"][:, 1:].reshape(-1)  # position t predicts token t + 1
    positions = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)  # over (batch, length - 1)
    n_labelled = positions.numel()
    if n_labelled == 0:
        return hidden.sum() * 0.0  # nothing to predict; keeps the graph for a uniform backward
    # Position p of the (batch, length - 1) grid is row p // (length - 1): in the flattened
    # (batch, length) hidden states that is p + p // (length - 1).
    rows = positions + positions.div(length - 1, rounding_mode="floor")
    hidden = hidden.reshape(batch_size * length, width).index_select(0, rows.to(device, non_blocking=True))
    targets = next_labels[positions].to(device, non_blocking=True)
    head = lm.get_output_embeddings()
    step = chunk_tokens(head.weight.shape[0], chunk_logits)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_labelled, step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, head)
    return total / n_labelled
