"""Checking one raw row and normalising it to {"format", "messages"} or {"format": "text", "text"}.

Row formats, recognised from the fields of each row:
    chat               {"messages": [{"role": ..., "content": ...}, ...]}
    sharegpt           {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}
    instruction        {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}
A "system" string field next to any of the first four becomes the conversation's system
turn (unless it already has one).
"""

from __future__ import annotations

from typing import Any

from l1ra_lite.data.common import BadRow

# ShareGPT's speaker names (and the ones its variants use) -> chat roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


class Unparsed:
    """Stands in for a raw row that could not even be parsed; normalise_row rejects it."""

    def __init__(self, reason: str):
        self.reason = reason


def normalise_row(raw: Any, drop_nulls: bool = False) -> dict:
    """{"format", "messages"} or {"format": "text", "text"}; BadRow says why not.

    `drop_nulls`: for rows from a table (Parquet, a hub dataset), where a row has every
    column of the table and the ones it does not use are null."""
    if isinstance(raw, Unparsed):
        raise BadRow(raw.reason)
    if not isinstance(raw, dict):
        raise BadRow(f"not an object (a {type(raw).__name__})")
    if drop_nulls:
        raw = {key: value for key, value in raw.items() if value is not None}
    if "text" in raw and not _has_chat_fields(raw):
        return {"format": "text", "text": _string(raw, "text", allow_empty=False)}
    kind, messages = _chat_messages(raw)
    return {"format": kind, "messages": _with_system(raw, messages)}


def _has_chat_fields(raw: dict) -> bool:
    return any(key in raw for key in ("messages", "conversations", "instruction", "output", "prompt", "completion"))


def _chat_messages(raw: dict) -> tuple[str, list[dict]]:
    if "messages" in raw:
        return "chat", _check_messages(raw["messages"], "messages")
    if "conversations" in raw:
        return "sharegpt", _check_messages(_sharegpt_messages(raw["conversations"]), "conversations")
    if "instruction" in raw or "output" in raw:
        return "instruction", _instruction_messages(raw)
    if "prompt" in raw or "completion" in raw:
        return "prompt_completion", _prompt_completion_messages(raw)
    found = ", ".join(map(str, raw)) or "none"
    raise BadRow(f"no recognised fields (found: {found})")


def _with_system(raw: dict, messages: list[dict]) -> list[dict]:
    system = raw.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    if not isinstance(system, str):
        raise BadRow(f"field 'system' must be a string (got {type(system).__name__})")
    return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def _sharegpt_messages(turns: Any) -> Any:
    if not isinstance(turns, list):
        raise BadRow(f"field 'conversations' must be a list of {{from, value}} objects (got {type(turns).__name__})")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {number} is not an object")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            known = ", ".join(sorted(SHAREGPT_ROLES))
            raise BadRow(f"turn {number} has an unknown 'from' ({speaker!r}; known: {known})")
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return messages


def _string(raw: dict, key: str, allow_empty: bool) -> str:
    if key not in raw:
        raise BadRow(f"missing field {key!r}")
    value = raw[key]
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} must be a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise BadRow(f"field {key!r} is empty")
    return value


def _instruction_messages(raw: dict) -> list[dict]:
    instruction = _string(raw, "instruction", allow_empty=False)
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"field 'input' must be a string (got {type(extra).__name__})")
    question = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    answer = _string(raw, "output", allow_empty=False)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _prompt_completion_messages(raw: dict) -> list[dict]:
    prompt, completion = raw.get("prompt"), raw.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # the conversational variant
        return _check_messages(prompt + completion, "prompt + completion")
    prompt = _string(raw, "prompt", allow_empty=True)
    answer = _string(raw, "completion", allow_empty=False)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _check_messages(messages: Any, key: str) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRow(f"field {key!r} must be a list of {{role, content}} objects (got {type(messages).__name__})")
    clean = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise BadRow(f"message {number} is not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRow(f"message {number} has no 'role' string")
        if not isinstance(content, str):
            raise BadRow(f"message {number} 'content' must be a string (got {type(content).__name__})")
        clean.append({"role": role, "content": content})
    answered = [i for i, m in enumerate(clean) if m["role"] == "assistant" and m["content"].strip()]
    if not answered:
        raise BadRow("no assistant message with content (nothing to learn)")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in clean):
        raise BadRow("an assistant message is empty")
    return clean[: answered[-1] + 1]  # turns after the last answer carry no loss
