"""Write aside, then rename into place: a reader (or a run resumed after a kill) sees the
old complete file or folder or the new complete one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def _aside(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` next to `path`, flush it to disk, then rename it over `path`."""
    tmp = _aside(path, "tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def write_tensors_atomic(path: Path, tensors: dict) -> None:
    """A safetensors file, written aside and renamed into place."""
    from safetensors.torch import save_file

    tmp = _aside(path, "tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def replace_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` fills a fresh folder beside `final`, which then takes its place. An
    existing `final` is moved aside first and removed last, so a complete one is always
    there; a failed write leaves `final` as it was."""
    tmp = _aside(final, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = _aside(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final
