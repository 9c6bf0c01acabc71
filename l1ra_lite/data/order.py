"""Seeded orders: which rows are held out for evaluation, and the order of the examples
in each epoch. Both depend only on the seed (and the counts), never on a global RNG, so
a resumed run, a benchmark and `finetune` agree on them."""

from __future__ import annotations


def eval_row_count(n_rows: int, eval_fraction: float, eval_max_rows: int) -> int:
    """`eval_fraction` of the rows, capped at `eval_max_rows`, at least 1 when asked for
    and possible, and never all of them."""
    if eval_fraction <= 0 or eval_max_rows <= 0 or n_rows < 2:
        return 0
    count = min(round(eval_fraction * n_rows), eval_max_rows)
    return min(max(count, 1), n_rows - 1)


def held_out_indices(n_rows: int, count: int, seed: int):
    """The sorted positions of `count` of `n_rows` rows picked by a shuffle seeded with
    `seed` alone (a numpy array)."""
    import numpy

    return numpy.sort(_rng(seed, 1).permutation(n_rows)[:count])


def split_indices(n_rows: int, eval_fraction: float, eval_max_rows: int, seed: int):
    """(train positions, eval positions), numpy arrays in the rows' original order."""
    import numpy

    held_out = held_out_indices(n_rows, eval_row_count(n_rows, eval_fraction, eval_max_rows), seed)
    keep = numpy.ones(n_rows, dtype=bool)
    keep[held_out] = False
    return numpy.flatnonzero(keep), held_out


def split_rows(rows: list, eval_fraction: float, eval_max_rows: int, seed: int) -> tuple[list, list]:
    """(train rows, eval rows); the same split that split_indices makes of the positions."""
    train, held_out = split_indices(len(rows), eval_fraction, eval_max_rows, seed)
    return [rows[i] for i in train], [rows[i] for i in held_out]


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in `epoch`: a permutation that depends only on
    (seed, epoch), so a resumed run replays the same batches."""
    return _rng(seed, 0, epoch).permutation(n_examples).tolist()


def _rng(seed: int, *stream: int):
    """A numpy generator for one named stream of one seed; no global RNG is touched."""
    import numpy

    return numpy.random.default_rng([seed % 2**64, *stream])
