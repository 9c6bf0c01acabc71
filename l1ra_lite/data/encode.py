"""Tokenising normalised rows, with labels only on what the model should learn to say.

Chat rows go through the tokenizer's chat template and are trained on the assistant
turns only; plain text is trained on every token. Every example starts with the
tokenizer's BOS token exactly when the tokenizer itself puts one in front of text
(Llama, Mistral: yes; SmolLM2, Qwen: no), and BOS is never a label.
"""

from __future__ import annotations

import bisect
from typing import Optional, Union

from l1ra_lite.data.common import IGNORE_INDEX, BadRow, one_line
from l1ra_lite.errors import UserError


def encode_each(rows: list[dict], tokenizer, bos: Union[int, None, str] = "ask") -> list[Union[dict, str]]:
    """For each row, in order, its example {"input_ids", "labels"} or, for a row the chat
    template could not handle, "where: why". `bos`: leading_bos_id(tokenizer), when the
    caller already knows it (it is asked of the tokenizer otherwise)."""
    chats: list[tuple[int, str, list]] = []  # (row index, rendered text, answer spans)
    texts: list[tuple[int, str]] = []
    out: list[Union[dict, str]] = [""] * len(rows)
    for index, row in enumerate(rows):
        if row["format"] == "text":
            texts.append((index, row["text"]))
            continue
        try:
            chats.append((index, *render_chat(tokenizer, row["messages"])))
        except BadRow as err:
            out[index] = f"{row.get('where', f'row {index + 1}')}: {err}"
    # one batched tokenizer call per kind
    bos = leading_bos_id(tokenizer) if bos == "ask" else bos
    for (index, _, _), example in zip(chats, _tokenize_chats(tokenizer, chats)):
        out[index] = _starting_with_bos(example, bos)
    for (index, _), example in zip(texts, _tokenize_texts(tokenizer, [t for _, t in texts], bos)):
        out[index] = example
    return out


def encode_rows(rows: list[dict], tokenizer) -> tuple[list[dict], list[str]]:
    """Examples {"input_ids", "labels"} for the rows, in row order, and "where: why" for
    rows the chat template could not handle (those get no example)."""
    encoded = encode_each(rows, tokenizer)
    return [e for e in encoded if isinstance(e, dict)], [e for e in encoded if isinstance(e, str)]


def leading_bos_id(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer puts in front of any text by itself, or None.

    Asked of the tokenizer's behaviour, not its files (add_bos_token, a post-processor
    template, a slow tokenizer's build_inputs_with_special_tokens all say it): the same
    probe the GGUF export writes as tokenizer.ggml.add_bos_token (export/gguf_vocab.py),
    so training and llama.cpp agree by construction.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _starting_with_bos(example: dict, bos: Optional[int]) -> dict:
    """A chat example with the tokenizer's BOS in front, unless the template wrote it.

    Why at tokenisation and not (only) in the chat template: the rendered text is
    tokenised without special tokens, since with them a template that writes bos_token
    itself (Llama 3 instruct) would get a second BOS; and a template cannot tell whether
    its tokenizer adds BOS (it sees bos_token, not add_bos: SmolLM2 has a bos_token and
    adds none). So base models on the fallback template (models.DEFAULT_CHAT_TEMPLATE,
    no BOS) trained without BOS while llama.cpp, told add_bos_token by the GGUF export,
    prepends one. Fixed here, it holds for every template (the fallback, a model's own,
    a user's) and is llama.cpp's rule: BOS when add_bos, and then a leading BOS written
    by the template is dropped, so there is exactly one. Inference that adds nothing on
    top of the template (transformers' apply_chat_template(tokenize=True), used by
    `l1ra-lite generate`; vLLM's chat API) sees BOS only if the template writes it, so
    the fallback template should write bos_token where the tokenizer adds one; this
    function then leaves the example as it is. BOS is never learned: inference never
    asks the model to generate it.
    """
    if bos is None or example["input_ids"][:1] == [bos]:
        return example
    return {"input_ids": [bos, *example["input_ids"]], "labels": [IGNORE_INDEX, *example["labels"]]}


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the
    assistant answers in that text.

    Each answer's span is found by rendering the conversation up to that turn twice:
    once ending with the generation prompt (what the model sees before answering) and
    once including the answer; the answer is what the second adds to the first. That
    holds for any template that writes turns left to right, whatever its markers.
    Trailing whitespace (the template's line break after the end-of-turn marker) is
    left out: the model never generates it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template, which chat / instruction / prompt-completion data needs "
            "(use an instruct model, or data with a plain 'text' field)"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        # the last message is always an answer (normalise_row drops turns after it): then upto is full
        last = i == len(messages) - 1
        upto = full if last else _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if before is not None and upto.startswith(before) and full.startswith(upto):
            start, end = len(before), len(upto.rstrip())
        else:
            start, end = _find_answer(tokenizer, full, message["content"], cursor)
        spans.append((start, end))
        cursor = end
    return full, spans


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja raises whatever the template raises
        raise BadRow(f"the chat template rejected it ({one_line(err)})") from None


def _find_answer(tokenizer, full: str, content: str, cursor: int) -> tuple[int, int]:
    # For templates that rewrite earlier turns (so prefixes do not line up): the answer
    # text itself, plus the end-of-turn token when it follows at once.
    start = full.find(content, cursor)
    if start < 0:
        raise BadRow("the chat template does not write the assistant's answer as given")
    end = start + len(content)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and full.startswith(eos, end):
        end += len(eos)
    return start, end


def _tokenize_chats(tokenizer, chats: list[tuple[int, str, list]]) -> list[dict]:
    """One tokenisation of each whole rendered text (so tokens match what the model sees
    at inference), then a token is labelled when its characters overlap an answer span."""
    if not chats:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_tokenize_by_segments(tokenizer, text, spans) for _, text, spans in chats]
    encoded = tokenizer([text for _, text, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, (_, _, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], chats):
        examples.append({"input_ids": list(ids), "labels": _answer_labels(ids, offsets, spans)})
    return examples


def _answer_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters overlap an answer span, else IGNORE_INDEX.

    This runs for every token of the data, so each span's tokens are found by bisection
    when the offsets only grow (the fast tokenizers' rule), and by testing every token
    otherwise."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]
    if all(a <= b for a, b in zip(starts, starts[1:])) and all(a <= b for a, b in zip(ends, ends[1:])):
        for lo, hi in spans:
            first, stop = bisect.bisect_right(ends, lo), bisect.bisect_left(starts, hi)
            labels[first:stop] = ids[first:stop]  # tokens ending after lo and starting before hi
        return labels
    for t, (start, end) in enumerate(offsets):
        if any(end > lo and start < hi for lo, hi in spans):
            labels[t] = ids[t]
    return labels


def _tokenize_by_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> dict:
    """For tokenizers without character offsets: tokenise the text piece by piece."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, learn in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        cursor = end
    return {"input_ids": ids, "labels": labels}


def _tokenize_texts(tokenizer, texts: list[str], bos: Optional[int]) -> list[dict]:
    """Plain text: the tokenizer's own special tokens (a BOS for many base models), an
    EOS at the end so the model learns where a document stops, loss on every token but
    the leading BOS (`bos`, from leading_bos_id): packed, it would sit mid-sequence and
    teach the model to generate BOS after EOS, which inference never asks of it."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    examples = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
        if bos is not None and ids[:1] == [bos]:
            labels[0] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    return examples
