"""The Ollama Modelfile written next to a GGUF export.

Ollama templates are Go templates, not Jinja, so the chat template is translated by
family: ChatML (SmolLM2, Qwen), Llama 3 (3.0, and 3.1 / 3.2 with their "Cutting Knowledge
Date" system header) and Mistral [INST] (v0.3's format: the system message goes into the
last [INST]) are recognised from their marker tokens. The translation is checked before
it is written: the Go template, rendered as Ollama does (gotemplate.py), must give the
conversations below exactly as the tokenizer's Jinja template does (less the BOS token,
which llama.cpp adds itself). A template of a known family that writes something else
(Mistral v0.1's "[INST] x [/INST]", Llama 2's <<SYS>>, a customised one) and anything
unrecognised get no TEMPLATE line: Ollama then picks its template from the Jinja
template stored in the GGUF file (tokenizer.chat_template), and the Modelfile says so.

Some Jinja templates put a default system message before a conversation that has none
(SmolLM2's, Qwen2.5's). A Go template cannot see that, so the Modelfile carries it as
SYSTEM, which Ollama puts first when a request brings no system message of its own:
the model then sees the conversation as it did in training.

Left as is: Jinja templates that `trim` the message text (Llama 3, Mistral) differ from
the Go template only for messages that start or end with white space; a Llama 3.2
template writes today's date in its header, which the Modelfile fixes at the export's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from l1ra_lite.export.gotemplate import ollama_prompt
from l1ra_lite.export.output import atomic_path

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA3_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
MISTRAL = (
    '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}[INST] '
    "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
    '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}'
)


def llama3_with_system_header(preamble: str) -> str:
    """Llama 3.1 / 3.2: a system turn always comes first, the template's own lines
    (knowledge cutoff, date) and then the system message, if any. A later system message
    joins the first in that turn (Ollama's .System holds them all), where the Jinja
    template would write a system turn of its own in its place."""
    escaped = preamble.replace("{{", '{{ "{{" }}')
    return (
        f"{LLAMA3_HEADER}{escaped}{{{{ .System }}}}<|eot_id|>"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# family -> (marker in the Jinja template, Go template, stop strings)
FAMILIES = {
    "chatml": ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("[INST]", MISTRAL, ["[INST]", "[/INST]"]),
}

# The conversations a translated template must write exactly as the Jinja template does.
PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
]

Render = Callable[..., str]  # (messages, add_generation_prompt=False) -> text


def template_family(chat_template: Optional[str]) -> Optional[str]:
    """Which known chat format a Jinja chat template writes, or None."""
    if not chat_template:
        return None
    for family, (marker, _, _) in FAMILIES.items():
        if marker in chat_template:
            return family
    return None


SENTINEL = "\u2063l1ra-lite-system\u2063"  # text no template writes by itself


def default_system_message(render: Render) -> Optional[str]:
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


def system_preamble(render: Render) -> Optional[str]:
    """What a Llama 3 template writes in its system turn before the system message
    (Llama 3.1's "Cutting Knowledge Date: ...\\nToday Date: ...\\n\\n"), or None."""
    try:
        before = render([{"role": "system", "content": SENTINEL}, {"role": "user", "content": "hi"}])
    except Exception:
        return None
    before, found, _ = before.partition(SENTINEL)
    _, header, preamble = before.rpartition(LLAMA3_HEADER)
    return preamble if found and header and preamble else None


def candidate_templates(family: str, render: Optional[Render]) -> list[str]:
    template = FAMILIES[family][1]
    if family == "llama3" and render is not None:
        preamble = system_preamble(render)
        if preamble is not None:
            return [llama3_with_system_header(preamble), template]
    return [template]


def first_difference(
    template: str, system: Optional[str], render: Render, bos_token: Optional[str]
) -> Optional[tuple[str, str]]:
    """None when Ollama, given this TEMPLATE and SYSTEM, prompts every probe conversation
    exactly as the Jinja template does; otherwise (Jinja's text, Ollama's text) for the first
    one that differs. Conversations the Jinja template refuses (a system message where it
    allows none) are skipped; it must accept at least one."""
    compared = 0
    for conversation in PROBES:
        try:
            expected = render(conversation, add_generation_prompt=True)
        except Exception:
            continue
        if bos_token and expected.startswith(bos_token):
            expected = expected[len(bos_token) :]  # llama.cpp adds BOS when it tokenizes
        got = ollama_prompt(template, conversation, system)
        if got != expected:
            return expected, got
        compared += 1
    return None if compared else ("(the chat template refused every probe conversation)", "")


def modelfile_text(
    gguf_file_name: str,
    chat_template: Optional[str],
    eos_token: Optional[str],
    system: Optional[str] = None,
    render: Optional[Render] = None,
    bos_token: Optional[str] = None,
) -> str:
    """The Modelfile. With `render` (the tokenizer's chat template: messages,
    add_generation_prompt -> text) the translated template is checked against it first."""
    lines = [
        "# Ollama Modelfile written by `l1ra-lite export --format gguf`.",
        f"# Use: ollama create my-model -f {Path(gguf_file_name).stem}.Modelfile && ollama run my-model",
        f"FROM ./{gguf_file_name}",
    ]
    family = template_family(chat_template)
    template = None
    if family is None:
        lines.append(
            "# Chat format not recognised: Ollama picks its template from the chat template stored in the GGUF file."
        )
        stops = [eos_token] if eos_token else []
    else:
        stops = list(FAMILIES[family][2])
        candidates = candidate_templates(family, render)
        if render is None:
            template = candidates[0]
        else:
            bos = bos_token if "bos_token" in chat_template else None  # SmolLM2's BOS is <|im_start|>
            template = next((c for c in candidates if first_difference(c, system, render, bos) is None), None)
        if template is None:
            lines.append(
                f"# The chat template is {family}-like but writes conversations differently from the template this"
                " export translates it to: Ollama picks its template from the chat template stored in the GGUF file."
            )
            stops += [eos_token] if eos_token and eos_token not in stops else []
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_file_name: str, tokenizer_dir: Path, overwrite: bool) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None

    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    system = default_system_message(render) if chat_template else None
    text = modelfile_text(gguf_file_name, chat_template, tokenizer.eos_token, system, render, tokenizer.bos_token)
    with atomic_path(path, overwrite) as temp:
        temp.write_text(text, encoding="utf-8")
    return path
