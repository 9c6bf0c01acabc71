"""The on-disk cache of prepared data: one folder per (data, tokenizer, chat template,
seq-len, packing, split) key, holding the train and eval examples as Arrow files that
training memory-maps, and the stats of the preparation.

A folder is written under a temporary name and renamed into place when complete, so a
preparation that is interrupted (or two runs preparing at once) never leaves a half
cache that a later run would read: the first complete folder wins.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from l1ra_lite.data.batches import Examples
from l1ra_lite.data.common import DataStats

CACHE_FORMAT = 3  # raise when what a cached folder holds (or how it is made) changes (3: eval_rows_in_training)


def default_data_cache() -> Path:
    from l1ra_lite.models import default_cache_dir

    return default_cache_dir() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokens: the vocabulary and rules, the special tokens, the chat
    template (the one in use, after --chat-template) and the class."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = tokenizer.chat_template
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    extra = {"class": type(tokenizer).__name__, "template": template, "special": special}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_cached(folder: Path) -> Optional[tuple[Examples, Examples, DataStats]]:
    """The cached train / eval examples (memory-mapped) and stats, or None on a miss."""
    if not (folder / "stats.json").is_file():
        return None
    try:
        stats = DataStats(**json.loads((folder / "stats.json").read_text()))
        train, held_out = (load_examples(folder / name) for name in ("train", "eval"))
    except (OSError, ValueError, TypeError):
        return None  # unreadable: prepared again
    return train, held_out, stats


def load_examples(path: Path):
    """Memory-mapped examples; an empty split is not written (datasets cannot read back a
    table without rows) and reads as an empty list."""
    import datasets

    return Examples(datasets.load_from_disk(str(path))) if path.exists() else []


def store(folder: Path, train, held_out, stats: DataStats) -> None:
    """Write the examples and stats to `folder` (under a temporary name first)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_examples(train, partial / "train")
        save_examples(held_out, partial / "eval")
        (partial / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        try:
            os.rename(partial, folder)
        except OSError:  # another run finished the same folder first: theirs is as good
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def save_examples(dataset, path: Path) -> None:
    if len(dataset):
        dataset.save_to_disk(str(path))


def workspace(root: Optional[Path]) -> Path:
    """A scratch folder for the intermediate tables of one preparation (next to the cache,
    on the same disk), removed by the caller; without a cache root, a temporary folder
    that lives until the process ends (the examples are memory-mapped from it)."""
    if root is None:
        folder = Path(tempfile.mkdtemp(prefix="l1ra-lite-data-"))
        atexit.register(shutil.rmtree, folder, True)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    return Path(tempfile.mkdtemp(prefix=".work-", dir=root))


def _remove_abandoned(root: Path, age_s: float = 24 * 3600) -> None:
    """Scratch and half-written folders a killed preparation left (names start with a
    dot), once they are a day old: a preparation running now is younger."""
    now = time.time()
    for entry in root.glob(".*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
