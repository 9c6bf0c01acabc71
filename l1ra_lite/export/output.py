"""Write exports to a temporary path next to the target and rename at the end.

A failed or interrupted export leaves the user's files as they were: the target is
only replaced once the new file or folder is complete, and only with --overwrite.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing target unless --overwrite (a UserError, nothing touched)."""
    from l1ra_lite.errors import UserError

    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_path(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `target`, on error it is removed."""
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.partial-{os.getpid()}"
    _remove(temp)
    try:
        yield temp
    except BaseException:
        _remove(temp)
        raise
    if target.exists():
        _remove(target)
    os.replace(temp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
