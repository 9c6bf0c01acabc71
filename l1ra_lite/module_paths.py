"""Names of adapted modules: 'model.layers.3.self_attn.q_proj' -> type 'q_proj', layer 3."""

from typing import Optional


def module_type(path: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'q_proj'."""
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> Optional[int]:
    """'model.layers.3.self_attn.q_proj' -> 3 (the number after 'layers'/'h'/'blocks')."""
    parts = path.split(".")
    for name, nxt in zip(parts, parts[1:]):
        if name in ("layers", "h", "blocks", "layer") and nxt.isdigit():
            return int(nxt)
    return None
