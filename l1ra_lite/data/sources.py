"""Where the rows come from: local files, a hub dataset (or a local folder laid out like
one), or the embedded corpus.

Local files and the embedded corpus are read row by row as JSON text with a position
label ("line 3", "row 7", "ai.yml conversation 2"); nothing is parsed or kept here, so
the pipeline can write them to an Arrow table in batches and check them in parallel
(l1ra_lite.data.pipeline). A hub dataset already is an Arrow table; its rows are "row N".
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from l1ra_lite.data.common import EMBEDDED_NAME, one_line
from l1ra_lite.data.normalise import Unparsed
from l1ra_lite.errors import UserError

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Source:
    """One dataset to read: `kind` is file, hub (a hub id or a dataset folder) or embedded."""

    spec: Optional[str]
    kind: str
    name: str  # for messages
    subset: Optional[str] = None
    split: str = "train"
    data_files: Optional[str] = None  # files of the dataset repo or folder to read (a path or glob inside it)

    @property
    def path(self) -> Path:
        return Path(str(self.spec)).expanduser()

    @property
    def is_table(self) -> bool:
        """Rows with every column of a table, nulls where a row has no value (see normalise_row)."""
        return self.kind == "hub" or (self.kind == "file" and FILE_KINDS.get(self.path.suffix.lower()) == "parquet")


def split_specs(data: Any) -> list[Optional[str]]:
    """--data as given: None (the embedded corpus), "a.jsonl,b.jsonl", or a list of those."""
    if data is None:
        return [None]
    items = data if isinstance(data, (list, tuple)) else [data]
    specs = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not specs:
        raise UserError("--data is empty")
    return specs


def resolve_source(
    spec: Optional[str], subset: Optional[str] = None, split: Optional[str] = None, data_files: Optional[str] = None
) -> Source:
    """What `spec` names; a file that cannot be read fails here, before any work."""
    split = split or "train"
    path = Path(spec).expanduser() if spec is not None else None
    if path is not None and path.is_dir():
        return Source(spec, "hub", spec, subset, split, data_files)  # a dataset folder: the hub's loader reads it
    if data_files:
        raise UserError("--data-files picks files inside a hub dataset or a dataset folder; --data names neither")
    if spec is None:
        return Source(None, "embedded", EMBEDDED_NAME)
    if path.exists() or path.suffix.lower() in FILE_KINDS or _looks_like_path(spec):
        _check_file(path)
        return Source(spec, "file", spec)
    return Source(spec, "hub", spec, subset, split, data_files)


def _looks_like_path(source: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" or "a/b/c" are meant as files
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if FILE_KINDS.get(path.suffix.lower()) is None:
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; supported: {', '.join(sorted(FILE_KINDS))}")


def data_fingerprint(source: Source, hub_dataset=None) -> str:
    """What identifies the rows of `source` for the cache: a file's path, size and change
    time (as `datasets` does for local files); a hub dataset's own fingerprint."""
    if source.kind == "file":
        stat = source.path.stat()
        return f"file:{source.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if source.kind == "embedded":
        folder = _chatterbot_folder()
        return "embedded:" + ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted(folder.glob("*.yml")))
    dataset = hub_dataset if hub_dataset is not None else load_hub_dataset(source)
    return f"hub:{source.spec}:{source.subset}:{source.data_files}:{source.split}:{dataset._fingerprint}"


# ---------------------------------------------------------------------------------
# Rows as JSON text: (where, text, None), or (where, None, why it cannot be parsed)


def raw_texts(source: Source) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    if source.kind == "embedded":
        return _as_texts(_embedded_rows())
    kind = FILE_KINDS[source.path.suffix.lower()]
    if kind == "jsonl":
        return _jsonl_texts(source.path)
    readers = {"json": _json_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}
    return _as_texts(readers[kind](source.path))


def raw_rows(source: Source) -> Iterator[tuple[str, Any]]:
    """(where, parsed row or Unparsed) for every row of a local or embedded source."""
    if source.kind == "hub":
        yield from ((f"row {i}", row) for i, row in enumerate(load_hub_dataset(source), start=1))
        return
    for where, text, reason in raw_texts(source):
        yield where, (Unparsed(reason) if text is None else parse_json_row(text))


def parse_json_row(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return Unparsed(f"not valid JSON ({err.msg})")


def _as_texts(rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    for where, row in rows:
        if isinstance(row, Unparsed):
            yield where, None, row.reason
        else:
            yield where, json.dumps(row, ensure_ascii=False, default=str), None


def _jsonl_texts(path: Path) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    # A line that is not JSON is a bad row (with its line number), not a broken file; it
    # is parsed later, in the pipeline's parallel map. Split on "\n" only (binary lines):
    # str.splitlines would also cut at U+2028 inside JSON strings.
    with _open_binary(path) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"cannot read data file {path}: not UTF-8 text (line {number}, byte {err.start})"
                ) from None
            if text.strip():
                yield f"line {number}", text, None


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror or err}") from None


def _read_text(path: Path) -> str:
    try:
        # bytes, then decode: keeps "\r\n" inside quoted CSV fields; -sig drops a byte-order mark
        return path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read data file {path}: not UTF-8 text (byte {err.start})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # A JSON array is one document: it is parsed whole (use JSONL for large data).
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a file named .json
            yield from ((where, parse_json_row(line)) for where, line, _ in _jsonl_texts(path))
            return
        raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f'{path}: a JSON data file must hold a list of objects (or {{"data": [...]}})')
    yield from ((f"row {i}", row) for i, row in enumerate(data, start=1))


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    old_limit = csv.field_size_limit(2**31 - 1)  # long texts exceed the 128 KiB default
    try:
        # newline="": quoted fields keep their line breaks; -sig drops a byte-order mark
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for i, row in enumerate(reader, start=1):
                yield f"row {i}", _csv_row(row)
    except csv.Error as err:
        raise UserError(f"{path} is not valid CSV: {err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read data file {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror or err}") from None
    finally:
        csv.field_size_limit(old_limit)


def _csv_row(row: dict) -> Any:
    if None in row:  # more cells than header columns
        return Unparsed(f"{len(row) - 1 + len(row[None])} cells but only {len(row) - 1} columns")
    for key in ("messages", "conversations"):
        value = row.get(key)
        if isinstance(value, str) and value.strip().startswith("["):
            # a chat column in a CSV can only be JSON text
            try:
                row[key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # normalise_row reports the wrong type
    return row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
        number = 0
        for batch in table.iter_batches(batch_size=1000):  # one batch in memory at a time
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
    except (OSError, pyarrow.ArrowException) as err:
        raise UserError(f"cannot read {path} as Parquet: {one_line(err)}") from None


def load_hub_dataset(source: Source):
    """The split of a hub dataset (or of a local folder laid out like one) as a memory-mapped
    `datasets.Dataset`; any failure is one line naming what was asked for."""
    import datasets

    what = repr(source.spec) + (f" (subset {source.subset!r})" if source.subset else "") + f", split {source.split!r}"
    what += f", files {source.data_files!r}" if source.data_files else ""
    try:
        return datasets.load_dataset(*load_arguments(source), split=source.split, **load_options(source))
    except Exception as err:  # noqa: BLE001 - offline, unknown name, no such split ...: all the user's to fix
        where = "from the folder" if Path(str(source.spec)).is_dir() else "from the Hugging Face hub"
        raise UserError(
            f"cannot load dataset {what} {where} ({type(err).__name__}: {one_line(err)})"
            + ("" if where == "from the folder" else "; no file by that name exists either")
        ) from None


def load_arguments(source: Source) -> tuple:
    """datasets.load_dataset's positional arguments for a hub source: the id, its subset."""
    return (source.spec, source.subset) if source.subset else (source.spec,)


def load_options(source: Source) -> dict:
    return {"data_files": source.data_files} if source.data_files else {}


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
        return Unparsed("a conversation must be a list of text turns")
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": str(turn)} for i, turn in enumerate(turns)]}
