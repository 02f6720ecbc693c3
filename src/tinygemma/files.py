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


def check_output_file(path: str | Path, flag: str, force: bool | None = None) -> Path:
    """Refuse, before any work is done, an output file that cannot be written: a folder in its place, a
    file where a parent folder should be, or a parent that is not writable (missing parents are created);
    with ``force`` False, also one that exists (``--force`` replaces it)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if force is False and (path.exists() or path.is_symlink()):
        raise UserError(f"{flag} {path}: exists (use --force to replace it)")
    _check_parent(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str, names: tuple[str, ...] = (), force: bool = True,
                     ours: Callable[[Path], bool] = lambda folder: False) -> Path:
    """Refuse, before any work, an output folder that cannot be made or written: a file in its place or where a
    parent should be, an unwritable parent or folder; with ``force`` False, one that already holds any of the
    files ``names`` it would write, unless ``ours(folder)`` says they are this command's earlier output (a
    re-run into the same folder)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    if not path.exists():
        _check_parent(path, flag)
        return path
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: is not writable")
    there = [n for n in names if (path / n).exists() or (path / n).is_symlink()]
    if there and not force and not ours(path):
        raise UserError(f"{flag} {path}: holds {', '.join(there)} already (use --force to replace)")
    return path


def _check_parent(path: Path, flag: str) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
