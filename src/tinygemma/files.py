"""Atomic files: write to a temporary name, fsync, rename; check an output path before the work."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tinygemma.config import UserError


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        raise


def follow_umask(path: str | Path, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` or ``mkdir()`` would (safetensors files are created 0600,
    ``tempfile.mkdtemp`` folders 0700, which would hide an export from the user's group)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work is done, an output file that cannot be written: a folder in its place, a
    file where a parent folder should be, or a parent that is not writable (missing parents are created)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
