"""Training data: rows from a file, a hub dataset or the embedded corpus, turned into
token examples whose labels cover only what the model should learn to say.

The flow, top to bottom:

    load_rows(source)            read rows, check each one, normalise it to
                                 {"format", "where", "messages"} or {"format", "where", "text"}
    split_rows(rows, ...)        seeded held-out eval rows, taken before anything else
    encode_rows(rows, tokenizer) chat template + tokenisation, labels = IGNORE_INDEX outside answers
    truncate / pack              fit the examples to seq_len
    prepare_data(...)            all of the above, the one call the training loop makes

    epoch_order(n, seed, epoch)  the order of the examples in an epoch (exact resume)
    collate(examples, pad_id)    a padded batch of tensors

Row formats, recognised from the fields of each row:
    chat               {"messages": [{"role": ..., "content": ...}, ...]}
    instruction        {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}
The first three go through the tokenizer's chat template and are trained on the
assistant turns only; plain text is trained on every token. Every example starts with
the tokenizer's BOS token exactly when the tokenizer itself puts one in front of text
(Llama, Mistral: yes; SmolLM2, Qwen: no), and BOS is never a label.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from l1ra_lite.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)

EXPECTED_FIELDS = (
    "messages (a list of {role, content}) | instruction, output (input optional) | prompt, completion | text"
)
FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
EMBEDDED_NAME = "embedded chatterbot-corpus (english)"
MAX_BAD_ROW_EXAMPLES = 5  # bad-row messages kept in the stats, for the log


@dataclass
class DataStats:
    """What happened to the data, for the log and the run folder."""

    source: str
    rows_read: int = 0  # rows seen, bad ones included
    bad_rows: int = 0  # rows skipped as malformed (only ever > 0 with skip_bad_rows)
    bad_row_examples: list[str] = field(default_factory=list)  # the first few, "where: why"
    formats: dict[str, int] = field(default_factory=dict)  # format -> usable rows
    format: str = ""  # the one format of the data, or "mixed"
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples / packed chunks with no answer token left
    packed: bool = False
    pack_tail_tokens: int = 0  # tokens after the last full packed chunk, left out
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0  # tokens the loss sees
    eval_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataSplits:
    """Token examples ({"input_ids": [...], "labels": [...]}) ready for `collate`."""

    train: list[dict]
    eval: list[dict]
    stats: DataStats


class BadRow(Exception):
    """One row that cannot be used; the message says why (without the row's position)."""


@dataclass
class _Unparsed:
    """Stands in for a raw row that could not even be parsed; normalise_row rejects it."""

    reason: str


# ---------------------------------------------------------------------------------
# Reading rows


def load_rows(source: Optional[str], skip_bad_rows: bool = False) -> tuple[list[dict], DataStats]:
    """Normalised rows of `source` (None: the embedded corpus) and the stats so far.

    Every row is checked; without `skip_bad_rows` one bad row fails the whole load
    with a UserError naming the first one and the number of bad rows in all.
    """
    name = EMBEDDED_NAME if source is None else str(source)
    stats = DataStats(source=name)
    rows: list[dict] = []
    problems: list[str] = []
    for where, raw in _raw_rows(source):
        stats.rows_read += 1
        try:
            row = normalise_row(raw)
        except BadRow as err:
            problems.append(f"{where}: {err}")
            continue
        row["where"] = where
        rows.append(row)
    # The embedded corpus has one malformed entry (trivia.yml) that is not the user's to fix.
    _handle_bad_rows(name, problems, skip_bad_rows or source is None, stats)
    if not rows:
        raise UserError(f"{name}: no usable rows (read {stats.rows_read}); expected fields: {EXPECTED_FIELDS}")
    stats.formats = dict(Counter(row["format"] for row in rows))
    stats.format = next(iter(stats.formats)) if len(stats.formats) == 1 else "mixed"
    return rows, stats


def _handle_bad_rows(name: str, problems: list[str], skip: bool, stats: DataStats) -> None:
    if not problems:
        return
    if not skip:
        raise UserError(
            f"{name}: {problems[0]}; expected fields: {EXPECTED_FIELDS} "
            f"({len(problems)} bad row(s) in all; fix them or pass --skip-bad-rows to skip them)"
        )
    stats.bad_rows += len(problems)
    room = MAX_BAD_ROW_EXAMPLES - len(stats.bad_row_examples)
    stats.bad_row_examples.extend(problems[: max(0, room)])


def _raw_rows(source: Optional[str]) -> Iterator[tuple[str, Any]]:
    """(position label, raw row) pairs from wherever the data lives."""
    if source is None:
        return _embedded_rows()
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_KINDS or _looks_like_path(source):
        return _file_rows(path)
    return _hub_rows(source)


def _looks_like_path(source: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" or "a/b/c" are meant as files
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a data file ({', '.join(sorted(FILE_KINDS))})")
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; supported: {', '.join(sorted(FILE_KINDS))}")
    readers = {
        "jsonl": _jsonl_rows,
        "json": _json_rows,
        "csv": _csv_rows,
        "tsv": _csv_rows,
        "parquet": _parquet_rows,
    }
    return readers[kind](path)


def _read_text(path: Path) -> str:
    try:
        # bytes, then decode: keeps "\r\n" inside quoted CSV fields; -sig drops a byte-order mark
        return path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read data file {path}: not UTF-8 text (byte {err.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # A line that is not JSON is a bad row (with its line number), not a broken file.
    # Split on "\n" only: str.splitlines would also cut at U+2028 inside JSON strings.
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((f"line {number}", _Unparsed(f"not valid JSON ({err.msg})")))
    return iter(rows)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a file named .json
            return _jsonl_rows(path)
        raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f'{path}: a JSON data file must hold a list of objects (or {{"data": [...]}})')
    return iter([(f"row {i}", row) for i, row in enumerate(data, start=1)])


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = io.StringIO(_read_text(path), newline="")  # newline="": quoted fields keep theirs
    old_limit = csv.field_size_limit(2**31 - 1)  # long texts exceed the 128 KiB default
    try:
        reader = csv.DictReader(text, delimiter=delimiter)
        rows = [(f"row {i}", _csv_row(row)) for i, row in enumerate(reader, start=1)]
    except csv.Error as err:
        raise UserError(f"{path} is not valid CSV: {err}") from None
    finally:
        csv.field_size_limit(old_limit)
    return iter(rows)


def _csv_row(row: dict) -> Any:
    if None in row:  # more cells than header columns
        return _Unparsed(f"{len(row) - 1 + len(row[None])} cells but only {len(row) - 1} columns")
    messages = row.get("messages")
    if isinstance(messages, str) and messages.strip().startswith("["):
        # a chat column in a CSV can only be JSON text
        try:
            row["messages"] = json.loads(messages)
        except json.JSONDecodeError:
            pass  # normalise_row reports the wrong type
    return row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise UserError(f"cannot read {path} as Parquet: {_one_line(err)}") from None
    return iter([(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)])


def _hub_rows(name: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - offline, unknown name, no train split ...: all the user's to fix
        raise UserError(
            f"cannot load dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {_one_line(err)}); "
            "no file by that name exists either"
        ) from None
    return ((f"row {i}", row) for i, row in enumerate(dataset, start=1))


def _embedded_rows() -> Iterator[tuple[str, Any]]:
    """The English conversations of the chatterbot-corpus wheel, as chat rows."""
    import yaml

    folder = _chatterbot_folder()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(folder.glob("*.yml")):
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for number, turns in enumerate(document.get("conversations") or [], start=1):
            yield f"{path.name} conversation {number}", _turns_to_chat(turns)


def _chatterbot_folder() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")  # locate it without importing it
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english" if spec else None
    if folder is None or not folder.is_dir():
        raise UserError(
            "the embedded training data comes from the chatterbot-corpus wheel, which is not installed: "
            "install it with `pip install --no-deps chatterbot-corpus` (or pass --data FILE)"
        )
    return folder


def _turns_to_chat(turns: Any) -> Any:
    # chatterbot conversations alternate user / assistant, starting with the user
    if not isinstance(turns, list) or not all(isinstance(t, (str, int, float)) for t in turns):
        return _Unparsed("a conversation must be a list of text turns")
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": str(turn)} for i, turn in enumerate(turns)]}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------
# Checking and normalising rows


def normalise_row(raw: Any) -> dict:
    """{"format", "messages"} or {"format": "text", "text"}; BadRow says why not."""
    if isinstance(raw, _Unparsed):
        raise BadRow(raw.reason)
    if not isinstance(raw, dict):
        raise BadRow(f"not an object (a {type(raw).__name__})")
    if "messages" in raw:
        return {"format": "chat", "messages": _check_messages(raw["messages"], "messages")}
    if "instruction" in raw or "output" in raw:
        return {"format": "instruction", "messages": _instruction_messages(raw)}
    if "prompt" in raw or "completion" in raw:
        return {"format": "prompt_completion", "messages": _prompt_completion_messages(raw)}
    if "text" in raw:
        return {"format": "text", "text": _string(raw, "text", allow_empty=False)}
    found = ", ".join(map(str, raw)) or "none"
    raise BadRow(f"no recognised fields (found: {found})")


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


# ---------------------------------------------------------------------------------
# Eval split


def eval_row_count(n_rows: int, eval_fraction: float, eval_max_rows: int) -> int:
    """`eval_fraction` of the rows, capped at `eval_max_rows`, at least 1 when asked for
    and possible, and never all of them."""
    if eval_fraction <= 0 or eval_max_rows <= 0 or n_rows < 2:
        return 0
    count = min(round(eval_fraction * n_rows), eval_max_rows)
    return min(max(count, 1), n_rows - 1)


def split_rows(rows: list, eval_fraction: float, eval_max_rows: int, seed: int) -> tuple[list, list]:
    """(train rows, eval rows). The eval rows are picked by a shuffle seeded with `seed`
    alone; both lists keep the rows' original order."""
    count = eval_row_count(len(rows), eval_fraction, eval_max_rows)
    picked = set(_rng(seed, 1).permutation(len(rows))[:count].tolist())
    train = [row for i, row in enumerate(rows) if i not in picked]
    held_out = [row for i, row in enumerate(rows) if i in picked]
    return train, held_out


def _rng(seed: int, *stream: int):
    """A numpy generator for one named stream of one seed; no global RNG is touched."""
    import numpy

    return numpy.random.default_rng([seed % 2**64, *stream])


# ---------------------------------------------------------------------------------
# Tokenising with answer-only labels


def encode_rows(rows: list[dict], tokenizer) -> tuple[list[dict], list[str]]:
    """Examples {"input_ids", "labels"} for the rows, in row order, and "where: why" for
    rows the chat template could not handle (those get no example)."""
    chats: list[tuple[int, str, list]] = []  # (row index, rendered text, answer spans)
    texts: list[tuple[int, str]] = []
    problems = []
    for index, row in enumerate(rows):
        if row["format"] == "text":
            texts.append((index, row["text"]))
            continue
        try:
            chats.append((index, *render_chat(tokenizer, row["messages"])))
        except BadRow as err:
            problems.append(f"{row.get('where', f'row {index + 1}')}: {err}")
    # one batched tokenizer call per kind: the fast tokenizers run these in parallel
    bos = leading_bos_id(tokenizer)
    chat_examples = [_starting_with_bos(e, bos) for e in _tokenize_chats(tokenizer, chats)]
    by_index = dict(zip([i for i, _, _ in chats], chat_examples))
    by_index.update(zip([i for i, _ in texts], _tokenize_texts(tokenizer, [t for _, t in texts], bos)))
    return [by_index[i] for i in sorted(by_index)], problems


def leading_bos_id(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer puts in front of any text by itself, or None.

    Asked of the tokenizer's behaviour, not its files (add_bos_token, a post-processor
    template, a slow tokenizer's build_inputs_with_special_tokens all say it): the same
    probe the GGUF export writes as tokenizer.ggml.add_bos_token (export/gguf_vocab.py),
    so training and llama.cpp agree by construction.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _starting_with_bos(example: dict, bos: Optional[int]) -> dict:
    """A chat example with the tokenizer's BOS in front, unless the template wrote it.

    Why at tokenisation and not (only) in the chat template: the rendered text is
    tokenised without special tokens, since with them a template that writes bos_token
    itself (Llama 3 instruct) would get a second BOS; and a template cannot tell whether
    its tokenizer adds BOS (it sees bos_token, not add_bos: SmolLM2 has a bos_token and
    adds none). So base models on the fallback template (models.DEFAULT_CHAT_TEMPLATE,
    no BOS) trained without BOS while llama.cpp, told add_bos_token by the GGUF export,
    prepends one. Fixed here, it holds for every template (the fallback, a model's own,
    a user's) and is llama.cpp's rule: BOS when add_bos, and then a leading BOS written
    by the template is dropped, so there is exactly one. Inference that adds nothing on
    top of the template (transformers' apply_chat_template(tokenize=True), used by
    `l1ra-lite generate`; vLLM's chat API) sees BOS only if the template writes it, so
    the fallback template should write bos_token where the tokenizer adds one; this
    function then leaves the example as it is. BOS is never learned: inference never
    asks the model to generate it.
    """
    if bos is None or example["input_ids"][:1] == [bos]:
        return example
    return {"input_ids": [bos, *example["input_ids"]], "labels": [IGNORE_INDEX, *example["labels"]]}


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the
    assistant answers in that text.

    Each answer's span is found by rendering the conversation up to that turn twice:
    once ending with the generation prompt (what the model sees before answering) and
    once including the answer; the answer is what the second adds to the first. That
    holds for any template that writes turns left to right, whatever its markers.
    Trailing whitespace (the template's line break after the end-of-turn marker) is
    left out: the model never generates it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template, which chat / instruction / prompt-completion data needs "
            "(use an instruct model, or data with a plain 'text' field)"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if before is not None and upto.startswith(before) and full.startswith(upto):
            start, end = len(before), len(upto.rstrip())
        else:
            start, end = _find_answer(tokenizer, full, message["content"], cursor)
        spans.append((start, end))
        cursor = end
    return full, spans


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja raises whatever the template raises
        raise BadRow(f"the chat template rejected it ({_one_line(err)})") from None


def _find_answer(tokenizer, full: str, content: str, cursor: int) -> tuple[int, int]:
    # For templates that rewrite earlier turns (so prefixes do not line up): the answer
    # text itself, plus the end-of-turn token when it follows at once.
    start = full.find(content, cursor)
    if start < 0:
        raise BadRow("the chat template does not write the assistant's answer as given")
    end = start + len(content)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and full.startswith(eos, end):
        end += len(eos)
    return start, end


def _tokenize_chats(tokenizer, chats: list[tuple[int, str, list]]) -> list[dict]:
    """One tokenisation of each whole rendered text (so tokens match what the model sees
    at inference), then a token is labelled when its characters overlap an answer span."""
    if not chats:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_tokenize_by_segments(tokenizer, text, spans) for _, text, spans in chats]
    encoded = tokenizer([text for _, text, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, (_, _, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], chats):
        labels = [
            token if any(end > lo and start < hi for lo, hi in spans) else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets)
        ]
        examples.append({"input_ids": list(ids), "labels": labels})
    return examples


def _tokenize_by_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> dict:
    """For tokenizers without character offsets: tokenise the text piece by piece."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, learn in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        cursor = end
    return {"input_ids": ids, "labels": labels}


def _tokenize_texts(tokenizer, texts: list[str], bos: Optional[int]) -> list[dict]:
    """Plain text: the tokenizer's own special tokens (a BOS for many base models), an
    EOS at the end so the model learns where a document stops, loss on every token but
    the leading BOS (`bos`, from leading_bos_id): packed, it would sit mid-sequence and
    teach the model to generate BOS after EOS, which inference never asks of it."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    examples = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
        if bos is not None and ids[:1] == [bos]:
            labels[0] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    return examples


# ---------------------------------------------------------------------------------
# Fitting examples to seq_len


def has_answer(example: dict) -> bool:
    # labels[0] never counts: the loss predicts token t from the tokens before it
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def truncate(examples: list[dict], seq_len: int) -> tuple[list[dict], int, int]:
    """(examples cut to seq_len that still have an answer token, how many were cut,
    how many were dropped for having no answer token left)."""
    kept, cut, dropped = [], 0, 0
    for example in examples:
        if len(example["input_ids"]) > seq_len:
            cut += 1
            example = {"input_ids": example["input_ids"][:seq_len], "labels": example["labels"][:seq_len]}
        if has_answer(example):
            kept.append(example)
        else:
            dropped += 1
    return kept, cut, dropped


def pack(examples: list[dict], seq_len: int, eos_id: int) -> tuple[list[dict], int]:
    """Concatenate the examples, an EOS between them (not learned: it is only a
    separator), and cut the stream into chunks of exactly seq_len tokens, labels carried
    along. Returns (chunks, tokens left after the last full chunk). When the data does
    not fill one chunk, that one shorter chunk is returned instead of nothing."""
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids += example["input_ids"]
        labels += example["labels"]
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
            labels.append(IGNORE_INDEX)
    full = len(ids) // seq_len
    if full == 0:
        return ([{"input_ids": ids, "labels": labels}] if ids else []), 0
    chunks = [
        {"input_ids": ids[i * seq_len : (i + 1) * seq_len], "labels": labels[i * seq_len : (i + 1) * seq_len]}
        for i in range(full)
    ]
    return chunks, len(ids) - full * seq_len


# ---------------------------------------------------------------------------------
# The entry point


def prepare_data(
    source: Optional[str],
    tokenizer,
    seq_len: int,
    packing: bool,
    eval_fraction: float,
    eval_max_rows: int,
    seed: int,
    skip_bad_rows: bool = False,
) -> DataSplits:
    """Rows -> eval split (before packing) -> tokens with answer-only labels -> seq_len."""
    if seq_len < 2:
        raise UserError(f"seq-len must be at least 2 (got {seq_len})")
    if not 0 <= eval_fraction < 1:
        raise UserError(f"eval-fraction must be in [0, 1) (got {eval_fraction})")
    rows, stats = load_rows(source, skip_bad_rows=skip_bad_rows)
    skip_bad_rows = skip_bad_rows or source is None
    train_rows, eval_rows = split_rows(rows, eval_fraction, eval_max_rows, seed)

    train, train_problems = encode_rows(train_rows, tokenizer)
    held_out, eval_problems = encode_rows(eval_rows, tokenizer)
    _handle_bad_rows(stats.source, train_problems + eval_problems, skip_bad_rows, stats)
    stats.train_rows, stats.eval_rows = len(train), len(held_out)

    train, cut, dropped = truncate(train, seq_len)
    held_out, eval_cut, eval_dropped = truncate(held_out, seq_len)
    stats.truncated, stats.dropped = cut + eval_cut, dropped + eval_dropped
    if packing:
        # eval stays one example per row: its loss then reads per conversation
        packed, stats.pack_tail_tokens = pack(train, seq_len, _eos_id(tokenizer))
        train = [chunk for chunk in packed if has_answer(chunk)]
        stats.dropped += len(packed) - len(train)
        stats.packed = True
    if not train:
        raise UserError(
            f"{stats.source}: no training example has an answer token within seq-len {seq_len} "
            f"({stats.dropped} dropped); raise --seq-len"
        )
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    stats.train_tokens = sum(len(e["input_ids"]) for e in train)
    stats.train_label_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in train)
    stats.eval_tokens = sum(len(e["input_ids"]) for e in held_out)
    return DataSplits(train=train, eval=held_out, stats=stats)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("packing needs an end-of-sequence token, and the tokenizer has none")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------------
# Batches


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in `epoch`: a permutation that depends only on
    (seed, epoch), so a resumed run replays the same batches."""
    return _rng(seed, 0, epoch).permutation(n_examples).tolist()


def collate(examples: list[dict], pad_id: int) -> dict:
    """input_ids / attention_mask / labels tensors, right-padded to the longest example;
    labels are IGNORE_INDEX on padding."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
