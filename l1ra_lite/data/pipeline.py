"""prepare_data: rows -> checked, normalised rows -> eval split -> tokens with answer-only
labels -> seq_len (truncated or packed), as Arrow tables on disk.

Every step is a batched `datasets` map or a generator written in batches, so memory does
not grow with the data: the rows are read one at a time into an Arrow file; checking
and tokenising run over batches of it (in `num_proc` processes), each writing its own
Arrow file; packing streams the examples once. The result is cached (l1ra_lite.data.cache)
under a key of everything that decides it, so the next run or a --resume on the same
data memory-maps the finished tables and starts at once. Training then reads examples by
index (batches.Examples); nothing holds the whole dataset in Python objects.

Bad rows are found inside the maps and come back as data (an "error" column with
"where: why"), so a bad row in a worker process still ends in the one line naming its
file and line, or is counted with --skip-bad-rows.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from l1ra_lite.data.cache import (
    cache_key,
    load_cached,
    load_examples,
    save_examples,
    store,
    tokenizer_fingerprint,
    workspace,
)
from l1ra_lite.data.common import EXPECTED_FIELDS, IGNORE_INDEX, BadRow, DataSplits, DataStats, handle_bad_rows
from l1ra_lite.data.encode import encode_each, leading_bos_id
from l1ra_lite.data.fit import Packer, truncate_one
from l1ra_lite.data.normalise import Unparsed, normalise_row
from l1ra_lite.data.order import held_out_indices, split_indices
from l1ra_lite.data.sources import (
    Source,
    data_fingerprint,
    load_hub_dataset,
    parse_json_row,
    raw_texts,
    resolve_source,
    split_specs,
)
from l1ra_lite.errors import UserError

BATCH_ROWS = 1000  # rows per map batch and per Arrow write: what a worker holds at once
MIN_ROWS_PER_PROCESS = 5000  # below this a worker process costs more than it saves
MAX_DEFAULT_PROCESSES = 8


def default_num_proc() -> int:
    """The CPU count this process may use, capped at MAX_DEFAULT_PROCESSES."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_DEFAULT_PROCESSES))


def prepare_data(
    source: Any,
    tokenizer,
    seq_len: int,
    packing: bool,
    eval_fraction: float,
    eval_max_rows: int,
    seed: int,
    skip_bad_rows: bool = False,
    *,
    subset: Optional[str] = None,
    split: Optional[str] = None,
    data_files: Optional[str] = None,
    eval_data: Optional[str] = None,
    eval_split: Optional[str] = None,
    num_proc: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    streaming: bool = False,
    max_steps: Optional[int] = None,
    examples_per_step: int = 1,
) -> DataSplits:
    """The training and eval examples of `source` (a file, folder or hub id; several,
    comma-separated or as a list, are mixed in that order; None: the embedded corpus).

    Eval rows are `eval_data` (its `eval_split`), or else carved from the training rows
    by the seed. `cache_dir`: where prepared data is cached (None: not cached).
    `streaming`: examples made as training reads them (l1ra_lite.data.streaming)."""
    started = time.perf_counter()
    if seq_len < 2:
        raise UserError(f"seq-len must be at least 2 (got {seq_len})")
    if not 0 <= eval_fraction < 1:
        raise UserError(f"eval-fraction must be in [0, 1) (got {eval_fraction})")
    if streaming:
        from l1ra_lite.data.streaming import prepare_stream

        return prepare_stream(
            source,
            tokenizer,
            seq_len,
            packing,
            eval_max_rows,
            seed,
            skip_bad_rows,
            subset=subset,
            split=split,
            data_files=data_files,
            eval_data=eval_data,
            eval_split=eval_split,
            cache_dir=cache_dir,
            max_steps=max_steps,
            examples_per_step=examples_per_step,
        )
    sources = [resolve_source(spec, subset, split, data_files) for spec in split_specs(source)]
    held_out_source = resolve_source(eval_data, subset, eval_split or "validation") if eval_data else None
    hub = {s: load_hub_dataset(s) for s in [*sources, held_out_source] if s is not None and s.kind == "hub"}
    key = cache_key(
        {
            "data": [data_fingerprint(s, hub.get(s)) for s in sources],
            "eval_data": held_out_source and data_fingerprint(held_out_source, hub.get(held_out_source)),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
            "packing": packing,
            "split": [eval_fraction, eval_max_rows, seed],
            "skip_bad_rows": skip_bad_rows,
        }
    )
    folder = Path(cache_dir) / key if cache_dir is not None else None
    cached = load_cached(folder) if folder is not None else None
    if cached is not None:
        train, held_out, stats = cached
        stats.cache_hit, stats.prepare_s = True, time.perf_counter() - started
        return DataSplits(train=train, eval=held_out, stats=stats)

    if folder is not None and folder.exists():  # there but unreadable (a disk error, a deleted file)
        shutil.rmtree(folder, ignore_errors=True)
    work = workspace(folder.parent if folder is not None else None)
    try:
        build = Build(work, tokenizer, seq_len, num_proc or default_num_proc(), skip_bad_rows, hub)
        train, held_out, stats = build.run(sources, held_out_source, packing, eval_fraction, eval_max_rows, seed)
        if folder is not None:
            store(folder, train, held_out, stats)
            train, held_out, _ = load_cached(folder)
        else:  # the tables stay in the scratch folder, removed when the process ends
            for name, split in (("train", train), ("eval", held_out)):
                save_examples(split, work / name)
            train, held_out = (load_examples(work / name) for name in ("train", "eval"))
    finally:
        if folder is not None:
            shutil.rmtree(work, ignore_errors=True)
    stats.prepare_s = time.perf_counter() - started
    return DataSplits(train=train, eval=held_out, stats=stats)


class Build:
    """One preparation, writing its intermediate tables into `work`."""

    def __init__(self, work: Path, tokenizer, seq_len: int, num_proc: int, skip_bad_rows: bool, hub: dict):
        self.work, self.tokenizer, self.seq_len = work, tokenizer, seq_len
        self.num_proc, self.skip_bad_rows, self.hub = num_proc, skip_bad_rows, hub
        self.steps = 0  # numbers the intermediate files

    def run(self, sources, held_out_source, packing, eval_fraction, eval_max_rows, seed):
        import datasets

        _quiet_datasets()
        stats = DataStats(source=", ".join(s.name for s in sources))
        parts = [self.checked_rows(s, stats) for s in sources]
        if len(parts) > 1:
            stats.sources = {s.name: len(_usable(part)) for s, part in zip(sources, parts)}
        rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        usable = _usable(rows)
        stats.formats = _formats(_select(rows, usable))
        stats.format = next(iter(stats.formats)) if len(stats.formats) == 1 else "mixed"
        if held_out_source is None:
            train_rows, eval_rows = self.carved(rows, usable, eval_fraction, eval_max_rows, seed)
        else:
            train_rows, eval_rows = _select(rows, usable), self.held_out(held_out_source, eval_max_rows, seed)
            stats.eval_source = held_out_source.name

        train = self.encoded(train_rows)
        held_out = self.encoded(eval_rows)
        problems, count = _errors(train, limit=5)
        eval_problems, eval_count = _errors(held_out, limit=5)
        skip = self.skip_bad_rows or any(s.kind == "embedded" for s in sources)
        handle_bad_rows(stats.source, problems + eval_problems, count + eval_count, skip, stats)
        stats.train_rows, stats.eval_rows = len(train) - count, len(held_out) - eval_count
        stats.truncated = _sum(train, "cut") + _sum(held_out, "cut")
        stats.dropped = _count_dropped(train) + _count_dropped(held_out)
        # counted on the eval rows that stay examples, as stats.eval_examples is
        stats.eval_rows_in_training = _rows_in(_select(eval_rows, _kept_positions(held_out)), train_rows)
        train, held_out = _kept(train), _kept(held_out)
        if packing:
            # eval stays one example per row: its loss then reads per conversation
            train = self.packed(train, stats)
        if len(train) == 0:
            raise UserError(
                f"{stats.source}: no training example has an answer token within seq-len {self.seq_len} "
                f"({stats.dropped} dropped); raise --seq-len"
            )
        stats.train_examples, stats.eval_examples = len(train), len(held_out)
        stats.train_tokens, stats.eval_tokens = _tokens(train), _tokens(held_out)
        stats.train_label_tokens = _sum(train, "n_labels")
        columns = ["input_ids", "labels"] + (["position_ids"] if packing else [])
        return train.select_columns(columns), held_out.select_columns(["input_ids", "labels"]), stats

    # -- the steps

    def checked_rows(self, source: Source, stats: DataStats):
        """The source's usable rows as a table (where, format, row: normalised JSON); bad
        rows fail the preparation (one line) or are counted and left out."""
        raw = self.hub[source] if source.kind == "hub" else self.raw_table(source)
        checked = self.map(
            raw,
            _check_table_batch if source.kind == "hub" else _check_text_batch,
            dict(drop_nulls=source.is_table),
            _features()["checked"],
            with_indices=source.kind == "hub",
        )
        stats.rows_read += len(checked)
        problems, count = _errors(checked, limit=5)
        skip = self.skip_bad_rows or source.kind == "embedded"  # the corpus's one bad entry is not the user's
        handle_bad_rows(source.name, problems, count, skip, stats)
        if count == len(checked):
            raise UserError(f"{source.name}: no usable rows (read {len(checked)}); expected fields: {EXPECTED_FIELDS}")
        return checked

    def carved(self, rows, usable, eval_fraction: float, eval_max_rows: int, seed: int):
        """(train rows, eval rows): the seeded split of the usable rows (order.split_indices,
        the split load_rows + split_rows make). Bad rows stay in the table until here: one
        selection of positions, on a table without an indices mapping, copies nothing."""
        train_index, eval_index = split_indices(len(usable), eval_fraction, eval_max_rows, seed)
        return _select(rows, usable[train_index]), _select(rows, usable[eval_index])

    def held_out(self, source: Source, eval_max_rows: int, seed: int):
        """The usable rows of `source` (--eval-data), up to eval_max_rows picked by the seed."""
        checked = self.checked_rows(source, DataStats(source=source.name))
        usable = _usable(checked)
        count = min(len(usable), eval_max_rows)
        return _select(checked, usable[held_out_indices(len(usable), count, seed)])

    def raw_table(self, source: Source):
        """The rows of a local file (or the embedded corpus) as JSON text, written in batches."""
        import datasets

        try:
            return datasets.Dataset.from_generator(
                _raw_records,
                features=_features()["raw"],
                gen_kwargs={"source": source},
                cache_dir=str(self.work / f"raw-{self._next()}"),
                writer_batch_size=BATCH_ROWS,
            )
        except Exception as err:  # datasets wraps the generator's errors; ours are one line already
            raise (_user_error_inside(err) or err) from None

    def encoded(self, rows):
        """Tokens with answer-only labels, cut to seq_len; "cut", "keep" (an answer token is
        left) and "error" (the chat template refused the row) for the stats."""
        bos = leading_bos_id(self.tokenizer)
        kwargs = dict(tokenizer=self.tokenizer, bos=bos, seq_len=self.seq_len)
        return self.map(rows, _encode_batch, kwargs, _features()["encoded"])

    def packed(self, examples, stats: DataStats):
        """Examples packed into seq_len chunks, streamed once, in order."""
        import datasets

        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise UserError("packing needs an end-of-sequence token, and the tokenizer has none")
        tally: dict[str, int] = {}
        chunks = datasets.Dataset.from_generator(
            _packed_chunks,
            features=_features()["packed"],
            gen_kwargs={"examples": examples, "seq_len": self.seq_len, "eos_id": eos, "tally": tally},
            cache_dir=str(self.work / f"packed-{self._next()}"),
            writer_batch_size=BATCH_ROWS,
        )
        stats.packed, stats.pack_tail_tokens = True, tally.get("tail", 0)
        stats.dropped += tally.get("dropped", 0)
        return chunks

    def map(self, dataset, function, kwargs: dict, features, with_indices: bool = False):
        """A batched map over `dataset` into Arrow files in the workspace, in `num_proc`
        processes when the data is large enough to pay for them."""
        import datasets

        if len(dataset) == 0:  # datasets' map would hand back the input columns
            return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        processes = max(1, min(self.num_proc, len(dataset) // MIN_ROWS_PER_PROCESS))
        if processes > 1:
            # The tokenizer's own threads would compete with the processes (and warn on fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        step = self._next()
        try:
            return dataset.map(
                function,
                fn_kwargs=kwargs,
                batched=True,
                batch_size=BATCH_ROWS,
                with_indices=with_indices,
                remove_columns=dataset.column_names,
                features=features,
                num_proc=processes if processes > 1 else None,
                cache_file_name=str(self.work / f"step-{step}.arrow"),
                new_fingerprint=f"l1ra-lite-step-{step}",  # our own cache keys it; nothing to hash
                writer_batch_size=BATCH_ROWS,
                desc=None,
            )
        except Exception as err:  # a UserError from a worker comes back wrapped
            raise (_user_error_inside(err) or err) from None

    def _next(self) -> int:
        self.steps += 1
        return self.steps


# ---------------------------------------------------------------------------------
# What the maps run (module-level functions: worker processes get them by reference)


def _raw_records(source: Source):
    for where, text, reason in raw_texts(source):
        yield {"where": where, "raw": text, "error": reason}


def _check_text_batch(batch: dict, drop_nulls: bool) -> dict:
    raws = [Unparsed(r) if t is None else parse_json_row(t) for t, r in zip(batch["raw"], batch["error"])]
    return _checked(batch["where"], raws, drop_nulls)


def _check_table_batch(batch: dict, indices: list[int], drop_nulls: bool) -> dict:
    columns = list(batch)
    raws = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
    return _checked([f"row {i + 1}" for i in indices], raws, drop_nulls)


def _checked(wheres: list[str], raws: list, drop_nulls: bool) -> dict:
    out: dict[str, list] = {"where": [], "format": [], "row": [], "error": []}
    for where, raw in zip(wheres, raws):
        try:
            row, error = normalise_row(raw, drop_nulls=drop_nulls), None
        except BadRow as err:
            row, error = {"format": ""}, f"{where}: {err}"
        out["where"].append(where)
        out["format"].append(row.pop("format"))
        out["row"].append(json.dumps(row, ensure_ascii=False) if error is None else None)
        out["error"].append(error)
    return out


def _encode_batch(batch: dict, tokenizer, bos: Optional[int], seq_len: int) -> dict:
    rows = [
        {"format": f, "where": w, **json.loads(r)} for w, f, r in zip(batch["where"], batch["format"], batch["row"])
    ]
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_labels": [], "cut": [], "keep": [], "error": []}
    for example in encode_each(rows, tokenizer, bos):
        if isinstance(example, str):
            example, cut, keep, error = {"input_ids": [], "labels": []}, False, False, example
        else:
            example, cut = truncate_one(example, seq_len)
            error = None
        n_labels = _label_count(example["labels"])
        keep = n_labels > 0  # fit.has_answer, counted once
        out["input_ids"].append(example["input_ids"])
        out["labels"].append(example["labels"])
        out["n_labels"].append(n_labels)
        out["cut"].append(cut)
        out["keep"].append(keep)
        out["error"].append(error)
    return out


def _label_count(labels: list[int]) -> int:
    """Labels the loss sees: all but IGNORE_INDEX, and never the first (nothing predicts it)."""
    if not labels:
        return 0
    return len(labels) - labels.count(IGNORE_INDEX) - (labels[0] != IGNORE_INDEX)


def _packed_chunks(examples, seq_len: int, eos_id: int, tally: dict):
    packer = Packer(seq_len, eos_id)
    dropped = 0

    def counted(chunks):
        nonlocal dropped
        for chunk in chunks:
            n_labels = _label_count(chunk["labels"])
            if n_labels:
                yield {**chunk, "n_labels": n_labels}
            else:
                dropped += 1

    for batch in examples.iter(batch_size=BATCH_ROWS):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            yield from counted(packer.add({"input_ids": ids, "labels": labels}))
    last, tail = packer.finish()
    yield from counted(last)
    tally.update(tail=tail, dropped=dropped)


# ---------------------------------------------------------------------------------
# Tables: features and column arithmetic (pyarrow, on the memory-mapped files)


@functools.lru_cache(maxsize=1)
def _features() -> dict:
    import datasets

    tokens = datasets.List(datasets.Value("int32"))
    text, count, flag = datasets.Value("string"), datasets.Value("int32"), datasets.Value("bool")
    return {
        "raw": datasets.Features({"where": text, "raw": text, "error": text}),
        "checked": datasets.Features({"where": text, "format": text, "row": text, "error": text}),
        "encoded": datasets.Features(
            {"input_ids": tokens, "labels": tokens, "n_labels": count, "cut": flag, "keep": flag, "error": text}
        ),
        "packed": datasets.Features({"input_ids": tokens, "labels": tokens, "position_ids": tokens, "n_labels": count}),
    }


def _column(dataset, name: str, transform=None):
    """A column of `dataset` (a pyarrow array), through its indices mapping if it has one;
    `transform` is applied first (so that a mapping takes lengths, not token lists)."""
    column = dataset.data.column(name)
    if transform is not None:
        column = transform(column)
    if dataset._indices is not None:
        column = column.take(dataset._indices.column(0))
    return column


def _positions(mask):
    import numpy

    return numpy.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _usable(checked):
    """Positions of the rows without an error."""
    import pyarrow.compute as pc

    return _positions(pc.is_null(_column(checked, "error")))


def _rows_in(rows, others) -> int:
    """How many of `rows` have the content of some row of `others` (both checked tables:
    the normalised row as JSON text). Memory follows `rows`, the small side (eval rows)."""
    import pyarrow.compute as pc

    content, other_content = _column(rows, "row"), _column(others, "row")
    shared = pc.unique(other_content.filter(pc.is_in(other_content, value_set=content)))
    return int(pc.sum(pc.is_in(content, value_set=shared)).as_py() or 0)


def _select(dataset, indices):
    return dataset if len(indices) == len(dataset) and dataset._indices is None else dataset.select(indices)


def _kept_positions(encoded):
    """Positions of the encoded rows that keep an answer token."""
    import pyarrow.compute as pc

    return _positions(pc.fill_null(_column(encoded, "keep"), False))


def _kept(encoded):
    return _select(encoded, _kept_positions(encoded))


def _errors(dataset, limit: int) -> tuple[list[str], int]:
    """(the first `limit` error messages, how many rows have one)."""
    import pyarrow.compute as pc

    errors = _column(dataset, "error")
    count = len(errors) - errors.null_count
    return (pc.drop_null(errors).slice(0, limit).to_pylist() if count else []), count


def _formats(rows) -> dict[str, int]:
    import pyarrow.compute as pc

    counts = pc.value_counts(_column(rows, "format")).to_pylist()
    return {item["values"]: item["counts"] for item in counts}


def _sum(dataset, column: str, transform=None) -> int:
    import pyarrow.compute as pc

    if not len(dataset):
        return 0
    return int(pc.sum(_column(dataset, column, transform)).as_py() or 0)


def _count_dropped(encoded) -> int:
    """Rows that were encoded (no error) but kept no answer token."""
    import pyarrow.compute as pc

    if not len(encoded):
        return 0
    dropped = pc.and_(pc.is_null(_column(encoded, "error")), pc.invert(_column(encoded, "keep")))
    return int(pc.sum(dropped).as_py() or 0)


def _tokens(dataset) -> int:
    import pyarrow.compute as pc

    return _sum(dataset, "input_ids", pc.list_value_length)


def _quiet_datasets() -> None:
    """No progress bars from `datasets` (the CLI has its own display)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _user_error_inside(err: BaseException) -> Optional[UserError]:
    """The UserError that `datasets` wrapped (in the generator or a worker), if any."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
