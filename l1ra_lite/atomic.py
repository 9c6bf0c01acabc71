"""Write aside, then rename into place: a reader (or a run resumed after a kill) sees the
old complete file or folder or the new complete one, never half of either.

Everything set aside is a hidden sibling named `.<name>.<tag>-<pid>`: "tmp" while being
written, "old" while being removed.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


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


@contextmanager
def written_aside(target: Path) -> Iterator[Path]:
    """Yield a free path beside `target` for the caller to write a file or a folder at.
    When the block ends without error, what was written takes `target`'s place (an
    existing target, of any kind, is renamed aside first and removed last, so a complete
    one is always there); on an error it is removed and `target` is left as it was."""
    tmp = _aside(target, "tmp")
    _delete(tmp)
    try:
        yield tmp
        _put_in_place(tmp, target)
    except BaseException:
        _delete(tmp, ignore_errors=True)  # the write's own error is the one to report
        raise


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its full-disk error as an OSError and the file made
    readable as any other file the user writes (safetensors creates it owner-only, 0600,
    which a merged model served by another user or tool cannot read)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # safetensors reports a full disk this way
        raise OSError(str(err)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_tensors_atomic(path: Path, tensors: dict) -> None:
    """A safetensors file, written aside and renamed into place."""
    with written_aside(path) as tmp:
        save_tensors(tensors, tmp)


def replace_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` fills a fresh folder beside `final`, which then takes its place
    (see `written_aside`); a failed write leaves `final` as it was."""
    with written_aside(final) as tmp:
        tmp.mkdir(parents=True)
        write(tmp)
    return final


def remove_atomically(path: Path) -> None:
    """Rename `path` aside, then delete it: a kill during the deletion leaves a hidden
    leftover, never a half-deleted folder under a name that looks complete."""
    old = _aside(path, "old")
    _delete(old)
    os.replace(path, old)
    # The path is gone already; a part of the copy that cannot be deleted is not worth
    # failing the caller for.
    _delete(old, ignore_errors=True)


def _put_in_place(new: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    # os.replace cannot put a folder over a non-empty folder or a file, and doing it in
    # two steps through a deletion would leave a moment with no complete target.
    old = _aside(target, "old")
    _delete(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _delete(old, ignore_errors=True)  # the new one is in place: a leftover is harmless


def _delete(path: Path, ignore_errors: bool = False) -> None:
    """Remove a file, a link (not what it points to) or a folder, if there."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=ignore_errors)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        if not ignore_errors:
            raise
