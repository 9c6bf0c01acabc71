"""Exports never overwrite by accident and never leave half a file.

An existing target is refused unless --overwrite; the new file or folder is written
aside and renamed into place once complete (l1ra_lite.atomic), so a failed or
interrupted export leaves the user's files as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from l1ra_lite.atomic import written_aside


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
    with written_aside(target) as temp:
        yield temp
