"""Examples as training reads them: by index from a memory-mapped Arrow table, and
collated into padded batches."""

from __future__ import annotations

from typing import Any, Iterator

from l1ra_lite.data.common import IGNORE_INDEX


class Examples:
    """A read-only list of examples backed by a `datasets.Dataset` (memory-mapped Arrow
    files): indexing reads one example's token lists, nothing else is held in memory.
    Compares equal to a list of the same examples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.dataset[int(index)]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.dataset)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Examples, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"Examples({len(self)} from {self.files() or 'memory'})"

    def files(self) -> list[str]:
        return [f["filename"] for f in self.dataset.cache_files]


def collate(examples: list[dict], pad_id: int) -> dict:
    """input_ids / attention_mask / labels tensors, right-padded to the longest example;
    labels are IGNORE_INDEX on padding. Packed examples also carry position_ids (0 where
    each packed example starts; padding counts on from the last one)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    packed = all("position_ids" in e for e in examples)
    positions = torch.arange(width, dtype=torch.long).repeat(len(examples), 1) if packed else None
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        if packed:
            positions[row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
            positions[row, n:] = torch.arange(width - n) + (positions[row, n - 1] + 1 if n else 0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch
