"""Rows of one source as a Python list: for small data and for tools that want the rows
themselves (bench/lr_sweep.py); training goes through l1ra_lite.data.pipeline, which
reads the same rows the same way into Arrow tables."""

from __future__ import annotations

from collections import Counter
from typing import Optional

from l1ra_lite.data.common import EXPECTED_FIELDS, BadRow, DataStats, handle_bad_rows
from l1ra_lite.data.normalise import normalise_row
from l1ra_lite.data.sources import raw_rows, resolve_source
from l1ra_lite.errors import UserError


def load_rows(
    source: Optional[str], skip_bad_rows: bool = False, subset: Optional[str] = None, split: Optional[str] = None
) -> tuple[list[dict], DataStats]:
    """Normalised rows of `source` (None: the embedded corpus) and the stats so far.

    Every row is checked; without `skip_bad_rows` one bad row fails the whole load
    with a UserError naming the first one and the number of bad rows in all.
    """
    resolved = resolve_source(source, subset, split)
    stats = DataStats(source=resolved.name)
    rows: list[dict] = []
    problems: list[str] = []
    for where, raw in raw_rows(resolved):
        stats.rows_read += 1
        try:
            row = normalise_row(raw, drop_nulls=resolved.is_table)
        except BadRow as err:
            problems.append(f"{where}: {err}")
            continue
        row["where"] = where
        rows.append(row)
    # The embedded corpus has one malformed entry (trivia.yml) that is not the user's to fix.
    handle_bad_rows(resolved.name, problems, len(problems), skip_bad_rows or source is None, stats)
    if not rows:
        raise UserError(f"{resolved.name}: no usable rows (read {stats.rows_read}); expected fields: {EXPECTED_FIELDS}")
    stats.formats = dict(Counter(row["format"] for row in rows))
    stats.format = next(iter(stats.formats)) if len(stats.formats) == 1 else "mixed"
    return rows, stats
