"""What llama.cpp expects from a decoder in GGUF (llama, mistral, qwen2, qwen3): names and the q/k layout.

For its llama architecture, llama.cpp applies rotary embeddings to interleaved pairs of
each head's dimensions, transformers to its two halves; so the rows of q_proj (and
k_proj, with the number of key/value heads) are reordered within each head when written
to GGUF, exactly as llama.cpp's convert_hf_to_gguf.py does for llama (qwen2 and qwen3 keep them).
A LoRA's B is reordered the same way: P(W + s B A) = P W + s (P B) A.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l1ra_lite.errors import UserError

# transformers model_type -> (llama.cpp architecture name, whether q/k rows are permuted)
GGUF_LORA_ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
# Whole-model GGUF: the same decoder with llama.cpp's names; qwen2 adds q/k/v biases, qwen3
# per-head q/k norms (attn_q_norm / attn_k_norm): gguf's tensor map names both.
GGUF_MODEL_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class DecoderLayout:
    """A base model's decoder as llama.cpp's architecture `arch` lays it out."""

    arch: str  # llama.cpp architecture name ("llama", "qwen2")
    n_layers: int
    n_head: int
    n_kv_head: int
    permute_qk: bool

    def tensor_name(self, hf_name: str) -> str:
        """GGUF name of a transformers weight, e.g. model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight."""
        import gguf

        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch)
        name_map = gguf.get_tensor_name_map(arch, self.n_layers)
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(f"no llama.cpp name for the tensor {hf_name!r} ({self.arch} architecture)")
        return mapped

    def to_gguf_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """Reorder the rows of a q_proj / k_proj weight (or LoRA B) into llama.cpp's layout."""
        heads = self._heads_for(hf_name)
        if heads is None:
            return rows
        return permute_rows(rows, heads)

    def from_gguf_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """The inverse of to_gguf_rows."""
        heads = self._heads_for(hf_name)
        if heads is None:
            return rows
        return unpermute_rows(rows, heads)

    def _heads_for(self, hf_name: str):
        if not self.permute_qk:
            return None
        if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
            return self.n_head
        if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
            return self.n_kv_head
        return None


def permute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows [first half | second half] -> interleaved pairs (half_0, second_0, half_1, ...)."""
    out = rows.shape[0]
    grouped = rows.reshape(n_heads, 2, out // n_heads // 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    out = rows.shape[0]
    grouped = rows.reshape(n_heads, out // n_heads // 2, 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def layout_for(base_config: dict, model_type: str, archs) -> DecoderLayout:
    """The layout of a base model's config.json; a UserError for architectures we do not write."""
    if model_type not in archs:
        raise UserError(
            f"GGUF export supports {', '.join(sorted(set(archs)))} models; this run's base is "
            f"{model_type!r}: use `l1ra-lite export RUN --format hf` and llama.cpp's convert_hf_to_gguf.py"
        )
    arch, permute = GGUF_LORA_ARCHS[model_type]
    n_head = int(base_config["num_attention_heads"])
    return DecoderLayout(
        arch=arch,
        n_layers=int(base_config["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(base_config.get("num_key_value_heads") or n_head),
        permute_qk=permute,
    )
