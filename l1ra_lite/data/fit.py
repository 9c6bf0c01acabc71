"""Fitting examples to seq_len: truncation, and packing into full-length chunks.

Packing concatenates examples, an EOS between them (not learned: it is only a separator),
and cuts the stream into chunks of exactly seq_len tokens. Packed examples must not see
each other: every chunk carries position ids that start at 0 where each example (or the
piece of one that a cut carried over) starts, and the training step gives the model those
position ids instead of an attention mask; transformers then attends only within each
example (masking_utils.find_packed_sequence_indices: a new sequence wherever the position
does not go up by one; the same for eager, SDPA and flash attention). The first token of
each example is never a label in a chunk: unpacked, nothing comes before it to predict it
from, and packed, only the end of another example would.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from l1ra_lite.data.common import IGNORE_INDEX


def has_answer(example: dict) -> bool:
    # labels[0] never counts: the loss predicts token t from the tokens before it
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def truncate_one(example: dict, seq_len: int) -> tuple[dict, bool]:
    """(the example cut to seq_len, whether it was cut)."""
    if len(example["input_ids"]) <= seq_len:
        return example, False
    return {"input_ids": example["input_ids"][:seq_len], "labels": example["labels"][:seq_len]}, True


def truncate(examples: list[dict], seq_len: int) -> tuple[list[dict], int, int]:
    """(examples cut to seq_len that still have an answer token, how many were cut,
    how many were dropped for having no answer token left)."""
    kept, cut, dropped = [], 0, 0
    for example in examples:
        example, was_cut = truncate_one(example, seq_len)
        cut += was_cut
        if has_answer(example):
            kept.append(example)
        else:
            dropped += 1
    return kept, cut, dropped


class Packer:
    """Packs a stream of examples into chunks of seq_len tokens, holding at most one
    chunk plus one example at a time (so packing a million rows takes no more memory
    than packing ten)."""

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []
        self.chunks_made = 0

    def add(self, example: dict) -> Iterator[dict]:
        """The chunks that this example completes."""
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if not ids:
            return
        labels[0] = IGNORE_INDEX
        if ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            labels.append(IGNORE_INDEX)
        self.ids += ids
        self.labels += labels
        self.positions += range(len(ids))
        while len(self.ids) >= self.seq_len:
            yield self._cut(self.seq_len)

    def finish(self) -> tuple[list[dict], int]:
        """(the last chunks, tokens left out after the last full chunk). When the data did
        not fill one chunk, that one shorter chunk is returned instead of nothing."""
        if self.chunks_made == 0 and self.ids:
            return [self._cut(len(self.ids))], 0
        return [], len(self.ids)

    def _cut(self, n: int) -> dict:
        positions = self.positions[:n]
        restart = next((i for i, p in enumerate(positions) if p == 0), n)
        positions[:restart] = range(restart)  # a piece carried over from the last chunk starts afresh
        chunk = {"input_ids": self.ids[:n], "labels": self.labels[:n], "position_ids": positions}
        del self.ids[:n], self.labels[:n], self.positions[:n]
        self.chunks_made += 1
        return chunk


def pack(examples: Iterable[dict], seq_len: int, eos_id: int) -> tuple[list[dict], int]:
    """Chunks {"input_ids", "labels", "position_ids"} of exactly seq_len tokens (see
    Packer), and the tokens left after the last full chunk."""
    packer = Packer(seq_len, eos_id)
    chunks = [chunk for example in examples for chunk in packer.add(example)]
    last, tail = packer.finish()
    return chunks + last, tail
