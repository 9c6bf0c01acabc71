"""Names of adapted modules: 'model.layers.3.self_attn.q_proj' -> type 'q_proj', layer 3;
which modules a target name picks; and how peft names them in an adapter."""

from typing import Optional

# peft wraps the causal LM twice (PeftModel -> LoraModel -> the model), so a module's
# path inside the PeftModel, and its keys in a saved adapter, start with this.
PEFT_PREFIX = "base_model.model."


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


def matches_target(path: str, name: str) -> bool:
    """peft's rule for target_modules and rank_pattern keys: `name` picks the module at
    `path` when it is the whole path or its last dotted parts ('q_proj',
    'layers.0.mlp.down_proj')."""
    return path == name or path.endswith("." + name)


def peft_path(path: str) -> str:
    """A module path of the causal LM -> its name inside a PeftModel (and its adapter keys)."""
    return PEFT_PREFIX + path


def model_path(peft_name: str) -> str:
    """A module's name inside a PeftModel -> its path in the causal LM (names without the
    prefix are taken as they are)."""
    return peft_name.removeprefix(PEFT_PREFIX)
