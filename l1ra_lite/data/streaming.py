"""--streaming: examples made while training reads them, for data too large to download or
prepare up front.

The rows come from a `datasets.IterableDataset` (a hub dataset streamed, or a local file
read a row at a time), shuffled through a seeded buffer, and go through the same checks,
template, tokenisation, truncation and packing as the prepared pipeline, a batch of rows
at a time: memory holds the shuffle buffer and one batch, whatever the data's size. An
epoch's length is not known up front, so a streamed run needs --max-steps; the stream
starts again (reshuffled by epoch) when it runs out.

Exact resume: step s reads examples [s E, (s+1) E) of the stream (E per step), as the
prepared path does; a resumed run replays the stream from its start and skips to that
position (the rows before it are read and tokenised again, not trained on).
"""

from __future__ import annotations

from typing import Iterator, Optional

from l1ra_lite.data.common import DataSplits, DataStats, handle_bad_rows
from l1ra_lite.data.encode import leading_bos_id
from l1ra_lite.data.fit import Packer
from l1ra_lite.data.sources import Source, load_arguments, load_options, resolve_source, split_specs
from l1ra_lite.errors import UserError

SHUFFLE_BUFFER = 10_000  # rows held for shuffling
BATCH_ROWS = 1000


class StreamingExamples:
    """Training examples read in order from a stream. `take(start, count)` returns the
    examples at stream positions [start, start + count); reading forward is free, going
    back replays the stream. `len()` is the nominal size the schedule is planned with
    (the run's examples), not the data's."""

    def __init__(self, sources: list[Source], tokenizer, seq_len: int, packing: bool, seed: int, **options):
        self.sources, self.tokenizer, self.seq_len, self.packing, self.seed = (
            sources,
            tokenizer,
            seq_len,
            packing,
            seed,
        )
        self.nominal = options.get("nominal", 0)
        self.skip_bad_rows = options.get("skip_bad_rows", False)
        self.skip_rows = options.get("skip_rows", 0)  # rows at the start held out for evaluation
        self.stats = options.get("stats") or DataStats(source=", ".join(s.name for s in sources))
        self._iterator: Optional[Iterator[dict]] = None
        self._position = 0

    def __len__(self) -> int:
        return self.nominal

    def __bool__(self) -> bool:
        return True

    def take(self, start: int, count: int) -> list[dict]:
        if self._iterator is None or start < self._position:
            self._iterator, self._position = self._examples(), 0
        for _ in range(start - self._position):
            next(self._iterator)
        self._position = start + count
        return [next(self._iterator) for _ in range(count)]

    def _examples(self) -> Iterator[dict]:
        epoch = 0
        while True:
            produced = 0
            for example in self._epoch(epoch):
                produced += 1
                yield example
            if not produced:
                raise UserError(f"{self.stats.source}: the stream has no usable example within seq-len {self.seq_len}")
            epoch += 1

    def _epoch(self, epoch: int) -> Iterator[dict]:
        rows = _mixed_rows(self.sources).skip(self.skip_rows)
        rows = rows.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        rows.set_epoch(epoch)
        packer = Packer(self.seq_len, self.tokenizer.eos_token_id) if self.packing else None
        for batch in rows.iter(batch_size=BATCH_ROWS):
            for example in self._encoded(batch):
                if packer is None:
                    yield example
                else:
                    yield from (c for c in packer.add(example) if _learns(c))
        if packer is not None:
            yield from (c for c in packer.finish()[0] if _learns(c))

    def _encoded(self, batch: dict) -> list[dict]:
        from l1ra_lite.data.pipeline import _check_text_batch, _encode_batch

        checked = _check_text_batch(batch, drop_nulls=batch["table"][0] if batch["table"] else False)
        problems = [e for e in checked["error"] if e is not None]
        handle_bad_rows(self.stats.source, problems, len(problems), self.skip_bad_rows, self.stats)
        good = [i for i, e in enumerate(checked["error"]) if e is None]
        rows = {k: [checked[k][i] for i in good] for k in ("where", "format", "row")}
        bos = leading_bos_id(self.tokenizer)
        encoded = _encode_batch(rows, self.tokenizer, bos, self.seq_len)
        problems = [e for e in encoded["error"] if e is not None]
        handle_bad_rows(self.stats.source, problems, len(problems), self.skip_bad_rows, self.stats)
        return [
            {"input_ids": ids, "labels": labels}
            for ids, labels, keep in zip(encoded["input_ids"], encoded["labels"], encoded["keep"])
            if keep
        ]


def _learns(chunk: dict) -> bool:
    from l1ra_lite.data.fit import has_answer

    return has_answer(chunk)


def _mixed_rows(sources: list[Source]):
    """The sources' rows as one IterableDataset of {where, raw (JSON text), error, table},
    one source after the other."""
    import datasets

    streams = [_rows(source) for source in sources]
    return streams[0] if len(streams) == 1 else datasets.concatenate_datasets(streams)


def _rows(source: Source):
    import datasets

    from l1ra_lite.data.pipeline import _raw_records

    features = datasets.Features(
        {
            "where": datasets.Value("string"),
            "raw": datasets.Value("string"),
            "error": datasets.Value("string"),
            "table": datasets.Value("bool"),
        }
    )
    if source.kind != "hub":
        return datasets.IterableDataset.from_generator(
            _flagged, gen_kwargs={"records": _raw_records, "source": source}, features=features
        )
    try:
        stream = datasets.load_dataset(
            *load_arguments(source), split=source.split, streaming=True, **load_options(source)
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown name ...: the user's to fix
        raise UserError(
            f"cannot stream dataset {source.spec!r}: {type(err).__name__}: {' '.join(str(err).split())}"
        ) from None
    return stream.map(_as_json_row, with_indices=True, remove_columns=stream.column_names, features=features)


def _flagged(records, source: Source):
    for record in records(source):
        yield {**record, "table": False}


def _as_json_row(row: dict, index: int) -> dict:
    import json

    return {"where": f"row {index + 1}", "raw": json.dumps(row, default=str), "error": None, "table": True}


def prepare_stream(
    source, tokenizer, seq_len: int, packing: bool, eval_max_rows: int, seed: int, skip_bad_rows: bool, **options
) -> DataSplits:
    """Training examples as a stream; eval examples prepared up front from `eval_data` or
    from the first `eval_max_rows` rows of the stream (which training then skips)."""
    if not options.get("max_steps"):
        raise UserError("--streaming needs --max-steps: the length of a streamed dataset is not known up front")
    sources = [
        resolve_source(spec, options.get("subset"), options.get("split"), options.get("data_files"))
        for spec in split_specs(source)
    ]
    stats = DataStats(source=", ".join(s.name for s in sources))
    held_out, skip_rows = _held_out(sources, tokenizer, seq_len, eval_max_rows, skip_bad_rows, options)
    stats.eval_examples = len(held_out)
    train = StreamingExamples(
        sources,
        tokenizer,
        seq_len,
        packing,
        seed,
        nominal=options["max_steps"] * options.get("examples_per_step", 1),
        skip_bad_rows=skip_bad_rows or any(s.kind == "embedded" for s in sources),
        skip_rows=skip_rows,
        stats=stats,
    )
    stats.packed = packing
    return DataSplits(train=train, eval=held_out, stats=stats)


def _held_out(sources, tokenizer, seq_len, eval_max_rows, skip_bad_rows, options) -> tuple[list[dict], int]:
    """(eval examples, rows at the start of the stream they came from)."""
    from l1ra_lite.data.pipeline import prepare_data

    if options.get("eval_data"):
        splits = prepare_data(
            options["eval_data"],
            tokenizer,
            seq_len,
            False,
            0.0,
            0,
            0,
            skip_bad_rows,
            subset=options.get("subset"),
            split=options.get("eval_split") or "validation",
            cache_dir=options.get("cache_dir"),
        )
        return list(splits.train)[:eval_max_rows], 0
    if eval_max_rows <= 0:
        return [], 0
    reader = StreamingExamples(sources, tokenizer, seq_len, False, 0, skip_bad_rows=True)
    rows = _mixed_rows(sources).take(eval_max_rows)
    examples = [e for batch in rows.iter(batch_size=BATCH_ROWS) for e in reader._encoded(batch)]
    return examples, eval_max_rows
