"""The Ollama Modelfile written next to a GGUF export.

Ollama templates are Go templates, not Jinja, so the chat template is translated by
family: ChatML (SmolLM2, Qwen), Llama 3 and Mistral [INST] are recognised from their
marker tokens. For anything else the Modelfile has no TEMPLATE line and Ollama falls
back on the Jinja template stored in the GGUF file (tokenizer.chat_template).

Some Jinja templates put a default system message before a conversation that has none
(SmolLM2's, Qwen2.5's). A Go template cannot see that, so the Modelfile carries it as
SYSTEM, which Ollama puts first when a request brings no system message of its own:
the model then sees the conversation as it did in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from l1ra_lite.export.output import atomic_path

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]'
    '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}'
)

# family -> (marker in the Jinja template, Go template, stop strings)
FAMILIES = {
    "chatml": ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("[INST]", MISTRAL, ["[INST]", "[/INST]"]),
}


def template_family(chat_template: Optional[str]) -> Optional[str]:
    """Which known chat format a Jinja chat template writes, or None."""
    if not chat_template:
        return None
    for family, (marker, _, _) in FAMILIES.items():
        if marker in chat_template:
            return family
    return None


SENTINEL = "\u2063l1ra-lite-system\u2063"  # text no template writes by itself


def default_system_message(render: Callable[[list[dict[str, str]]], str]) -> Optional[str]:
    """The system message a chat template adds to a conversation without one, or None.
    `render` is the template (messages -> text). Found by rendering a conversation with a
    marker system message and one without: what stands in the marker's place is the default."""
    question = [{"role": "user", "content": "hi"}]
    try:
        without = render(question)
        before, _, after = render([{"role": "system", "content": SENTINEL}] + question).partition(SENTINEL)
    except Exception:  # a template that refuses system messages has no default one either
        return None
    fits = len(before) + len(after) <= len(without)
    if not after or not fits or not without.startswith(before) or not without.endswith(after):
        return None
    default = without[len(before) : len(without) - len(after)]
    return default or None


def modelfile_text(
    gguf_file_name: str,
    chat_template: Optional[str],
    eos_token: Optional[str],
    system: Optional[str] = None,
) -> str:
    lines = [
        "# Ollama Modelfile written by `l1ra-lite export --format gguf`.",
        f"# Use: ollama create my-model -f {Path(gguf_file_name).stem}.Modelfile && ollama run my-model",
        f"FROM ./{gguf_file_name}",
    ]
    family = template_family(chat_template)
    if family is None:
        lines.append("# Chat format not recognised: Ollama uses the chat template stored in the GGUF file.")
        stops = [eos_token] if eos_token else []
    else:
        _, template, stops = FAMILIES[family]
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_file_name: str, tokenizer_dir: Path, overwrite: bool) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    system = default_system_message(render) if chat_template else None
    text = modelfile_text(gguf_file_name, chat_template, tokenizer.eos_token, system)
    with atomic_path(path, overwrite) as temp:
        temp.write_text(text, encoding="utf-8")
    return path
