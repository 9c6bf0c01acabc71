"""What every step of the data pipeline shares: the label value the loss skips, the stats
of a preparation, the result handed to training, and how a bad row is reported."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from l1ra_lite.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)

EXPECTED_FIELDS = (
    "messages (a list of {role, content}) | conversations (a list of {from, value}) | "
    "instruction, output (input optional) | prompt, completion | text"
)
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
    sources: dict[str, int] = field(default_factory=dict)  # source -> usable rows, when several are mixed
    train_rows: int = 0
    eval_rows: int = 0
    eval_source: str = ""  # the --eval-data source, "" when eval rows are carved from the training data
    # Eval examples whose row content is also a training row's: on those the eval loss
    # measures memorisation, not what the model learnt (data with repeated rows has many).
    # None: not checked (a streamed dataset is not known up front).
    eval_rows_in_training: Optional[int] = None
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples / packed chunks with no answer token left
    packed: bool = False
    pack_tail_tokens: int = 0  # tokens after the last full packed chunk, left out
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0  # tokens the loss sees
    eval_tokens: int = 0
    cache_hit: bool = False  # read from the on-disk cache, nothing tokenised
    prepare_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def notes(self) -> list[str]:
        """What the user should know about the data before trusting the run's figures."""
        notes = []
        if self.bad_rows and self.source != EMBEDDED_NAME:  # its one bad entry is not the user's to fix
            notes.append(f"{self.bad_rows} bad row(s) skipped, e.g. {self.bad_row_examples[0]}")
        if self.eval_rows_in_training:
            notes.append(
                f"{self.eval_rows_in_training} of {self.eval_examples} eval rows also occur in the training rows: "
                "the eval loss partly measures memorisation (remove the repeated rows, or hold out "
                "other rows with --eval-data)"
            )
        return notes


@dataclass
class DataSplits:
    """Token examples ({"input_ids": [...], "labels": [...]}) ready for `collate`: lists,
    or views of memory-mapped Arrow tables that read an example when it is indexed."""

    train: Any
    eval: Any
    stats: DataStats


class BadRow(Exception):
    """One row that cannot be used; the message says why (without the row's position)."""


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def handle_bad_rows(name: str, problems: list[str], count: int, skip: bool, stats: DataStats) -> None:
    """Fail on the first bad row (`problems` holds the first few, `count` is how many in
    all), or count them into `stats` when skipping."""
    if not count:
        return
    if not skip:
        raise UserError(
            f"{name}: {problems[0]}; expected fields: {EXPECTED_FIELDS} "
            f"({count} bad row(s) in all; fix them or pass --skip-bad-rows to skip them)"
        )
    stats.bad_rows += count
    room = MAX_BAD_ROW_EXAMPLES - len(stats.bad_row_examples)
    stats.bad_row_examples.extend(problems[: max(0, room)])
