"""What Ollama makes of a Modelfile's TEMPLATE: the prompt for a conversation.

The export checks the Go template it writes against the tokenizer's Jinja chat template
before writing it (modelfile.py), so it needs to render Go templates. This renders the
part of Go's text/template that the Modelfile templates use:

- text, and `{{- ` / ` -}}` trimming the white space next to an action;
- `{{ .Role }}`, `{{ .Content }}`, `{{ .System }}`, `{{ $.System }}`;
- `{{ range .Messages }}` and `{{ range $i, $_ := .Messages }}`;
- `{{ if X }}`, `{{ else if X }}`, `{{ else }}`, `{{ end }}`, where X is a pipeline of
  eq, ne, and, or, not, len, slice and index over fields, variables, strings and ints.

`ollama_prompt` adds what Ollama's server does around the template: the Modelfile's SYSTEM
as the first message when the request does not start with a system message of its own,
consecutive messages of one role joined by a blank line, and `.System` as all system
messages joined by a blank line (ollama/template: collate).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

_ACTION = re.compile(r"{{(-?)(?:\s*)(.*?)(?:\s*)(-?)}}", re.S)
_WORD = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')
_SPACE = " \t\r\n"

_FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not x), a[-1]),
    "or": lambda *a: next((x for x in a if x), a[-1]),
    "not": lambda a: not a,
    "len": len,
    "slice": lambda x, *i: x[i[0] : i[1]] if len(i) == 2 else x[i[0] :] if i else x,
    "index": lambda x, i: x[i],
}


def _lex(template: str) -> list[tuple[str, str]]:
    pieces: list[list[str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip(_SPACE)
        if m.group(1):
            text = text.rstrip(_SPACE)
        pieces += [["text", text], ["action", m.group(2).strip()]]
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    pieces.append(["text", tail.lstrip(_SPACE) if trim_next else tail])
    return [(kind, value) for kind, value in pieces if kind == "action" or value]


def _parse(tokens: list[tuple[str, str]], i: int) -> tuple[list, int]:
    """Nodes from tokens[i] up to the `end` / `else` that closes them (its position)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            return nodes, i
        word = value.split(None, 1)[0] if value else ""
        if word == "if":
            branches, condition = [], value[3:]
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((condition, body))
                if i >= len(tokens):
                    raise ValueError("`if` without `end`")
                stopper = tokens[i][1]
                if stopper == "end":
                    break
                condition = stopper[8:] if stopper.startswith("else if ") else None
            nodes.append(("if", branches))
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*,\s*(\$\w*)\s*:=\s*)?(.+)", value)
            if m is None:
                raise ValueError(f"unsupported range: {value}")
            body, i = _parse(tokens, i + 1)
            if i >= len(tokens) or tokens[i][1] != "end":
                raise ValueError("`range` without `end`")
            nodes.append(("range", m.group(1), m.group(2), m.group(3), body))
        else:
            nodes.append(("print", value))
        i += 1
    return nodes, i


def _operand(word: str, dot: Any, scope: dict[str, Any]) -> Any:
    if word.startswith('"'):
        return json.loads(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false", "nil"):
        return {"true": True, "false": False, "nil": None}[word]
    if word == ".":
        return dot
    if word.startswith("$"):
        name, _, path = word.partition(".")
        value = scope[name]
    else:
        value, path = dot, word[1:]
    for field in path.split(".") if path else ():
        value = value[field]
    return value


def _pipeline(words: list[str], pos: int, dot: Any, scope: dict[str, Any]) -> tuple[Any, int]:
    values: list[Any] = []
    function = None
    while pos < len(words) and words[pos] != ")":
        word = words[pos]
        if word == "(":
            value, pos = _pipeline(words, pos + 1, dot, scope)
            values.append(value)
        elif not values and function is None and word in _FUNCTIONS:
            function = _FUNCTIONS[word]
        else:
            values.append(_operand(word, dot, scope))
        pos += 1
    if function is not None:
        return function(*values), pos
    if len(values) != 1:
        raise ValueError(f"unsupported pipeline: {' '.join(words)}")
    return values[0], pos


def _evaluate(expression: str, dot: Any, scope: dict[str, Any]) -> Any:
    return _pipeline(_WORD.findall(expression), 0, dot, scope)[0]


def _render(nodes: list, dot: Any, scope: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = _evaluate(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or _evaluate(condition, dot, scope):
                    out.append(_render(body, dot, scope))
                    break
        else:
            _, index_name, value_name, expression, body = node
            for index, item in enumerate(_evaluate(expression, dot, scope)):
                inner = dict(scope)
                if index_name:
                    inner[index_name] = index
                if value_name:
                    inner[value_name] = item
                out.append(_render(body, item, inner))
    return "".join(out)


def render_go_template(template: str, messages: list[dict[str, str]], system: str = "") -> str:
    """The text Go's text/template writes for `template` over these messages."""
    nodes, end = _parse(_lex(template), 0)
    if end != len(_lex(template)):
        raise ValueError("`end` or `else` without its `if` / `range`")
    root = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return _render(nodes, root, {"$": root})


def ollama_prompt(template: str, messages: list[dict[str, str]], system: Optional[str] = None) -> str:
    """The prompt Ollama writes for a chat request, given the Modelfile's TEMPLATE and SYSTEM."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    collated: list[dict[str, str]] = []
    for m in messages:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1] = {"role": m["role"], "content": collated[-1]["content"] + "\n\n" + m["content"]}
        else:
            collated.append(dict(m))
    all_system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go_template(template, collated, all_system)
