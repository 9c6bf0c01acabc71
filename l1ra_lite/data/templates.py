"""--chat-template: the template that renders conversations, when the tokenizer's own is
not the one wanted. The choice is set on the tokenizer, which is saved with the adapter,
so inference renders prompts the way training did."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from l1ra_lite.errors import UserError


def builtin_templates() -> dict[str, str]:
    from l1ra_lite.models import DEFAULT_CHAT_TEMPLATE

    return {"chatml": DEFAULT_CHAT_TEMPLATE}  # ChatML, ending turns with the tokenizer's EOS


def use_chat_template(tokenizer, choice: Optional[str]) -> None:
    """Set `choice` on the tokenizer: a Jinja file, a named template the tokenizer carries
    (tokenizers may hold several, e.g. default and tool_use), or a built-in name."""
    if not choice:
        return
    path = Path(choice).expanduser()
    if path.is_file():
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read chat template {path}: {err}") from None
        _check_renders(tokenizer, str(path))
        return
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    named = {**builtin_templates(), **own}
    if choice not in named:
        if choice.endswith((".jinja", ".j2", ".txt")) or "/" in choice:
            raise UserError(f"chat template file not found: {choice}")
        raise UserError(f"unknown chat template {choice!r}: give a Jinja file or one of {', '.join(sorted(named))}")
    tokenizer.chat_template = named[choice]
    _check_renders(tokenizer, choice)


def _check_renders(tokenizer, name: str) -> None:
    """A template that cannot render a simple exchange fails here, once, not on every row."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # noqa: BLE001 - jinja raises whatever the template raises
        raise UserError(f"chat template {name} does not render a conversation: {' '.join(str(err).split())}") from None
    if "hello" not in text:
        raise UserError(f"chat template {name} does not write the messages' content")
