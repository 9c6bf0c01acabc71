"""The tokenizer of a GGUF model file (`tokenizer.ggml.*` and the chat template).

Two kinds of tokenizer.json are written:
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2): tokenizer model "gpt2", with merges
  and the pre-tokenizer name llama.cpp uses to split text before BPE;
- BPE with byte fallback (SentencePiece-like: Mistral, Llama 2): tokenizer model
  "llama", read with gguf's LlamaHfVocab.
Merges, special token ids, add_bos/add_eos and the chat template come from gguf's
SpecialVocab. Anything else is refused with a pointer to llama.cpp's own converter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from l1ra_lite.errors import UserError

# The pre-tokenizer regex of Llama 3's tokenizer.json ("llama-bpe" in llama.cpp).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's (and Qwen2.5's, Qwen3's): single digits ("qwen2" in llama.cpp).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONVERTER_HINT = "use --format hf and llama.cpp's convert_hf_to_gguf.py"


@dataclass
class VocabInfo:
    kind: str  # "gpt2" | "llama"
    pre: str  # llama.cpp pre-tokenizer name
    size: int


def add_vocab(writer, tokenizer_dir: Path, vocab_size: int) -> VocabInfo:
    """Write the tokenizer of `tokenizer_dir`, padded to the model's `vocab_size`."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.json; {CONVERTER_HINT}")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        info = _add_llama_vocab(writer, tokenizer_dir, vocab_size)
    elif model.get("type") == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
        info = _add_gpt2_vocab(writer, tokenizer_dir, vocab_size, pre_tokenizer_name(tokenizer_json))
    else:
        raise UserError(
            f"the tokenizer in {tokenizer_dir} is neither byte-level BPE nor SentencePiece-like BPE; {CONVERTER_HINT}"
        )
    _add_specials(writer, tokenizer_dir, info.kind, info.size)
    return info


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way a byte-level BPE tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        named = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in named:
            return named[pattern]
    raise UserError(f"unknown pre-tokenizer {json.dumps(pre)[:120]}; {CONVERTER_HINT}")


def _add_gpt2_vocab(writer, tokenizer_dir: Path, vocab_size: int, pre: str) -> VocabInfo:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return VocabInfo("gpt2", pre, size)


def _add_llama_vocab(writer, tokenizer_dir: Path, vocab_size: int) -> VocabInfo:
    import gguf

    vocab = gguf.LlamaHfVocab(tokenizer_dir)
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    for i in range(len(tokens), vocab_size):  # the model's embedding may be padded
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    return VocabInfo("llama", "default", len(tokens))


def _add_specials(writer, tokenizer_dir: Path, kind: str, size: int) -> None:
    """Merges, bos/eos/pad/unk ids, add_bos/add_eos and the chat template (gguf's SpecialVocab)."""
    import gguf
    from transformers import AutoTokenizer

    special = gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=size)
    # Whether the tokenizer adds bos/eos, as it behaves (its files say it in several ways).
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
