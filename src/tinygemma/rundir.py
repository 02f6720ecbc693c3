"""The run folder: what ``tinygemma train`` writes and every other stage reads. Only this module knows its names.

    RUN/
      run_config.json        the resolved training, model and data config (rewritten on resume)
      metrics.jsonl          one JSON record per logged step (appended; cut back to the checkpoint on resume)
      checkpoint-STEP/       a complete Hugging Face model + optimizer.pt, rng_state.pt, trainer_state.json,
      best/                  run_config.json; best/ is the checkpoint with the lowest validation loss
      .lock                  held by the one trainer writing here (its PID inside)
      .tmp-NAME/ .old-NAME/ .del-NAME/   transient names of atomic writes, swaps and deletions

Every folder appears whole or not at all: a checkpoint is written as ``.tmp-NAME`` and renamed; a replaced
folder is first moved aside to ``.old-NAME``; a pruned one is renamed to ``.del-NAME`` before it is deleted.
:func:`recover` finishes or undoes what a crash interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinygemma.config import UserError, load_json
from tinygemma.files import atomic_write_text
from tinygemma.log import warn

BEST = "best"
METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"
LOCK = ".lock"
MODEL_FILES = ("config.json", "model.safetensors")
TRAINER_FILES = ("optimizer.pt", "rng_state.pt", TRAINER_STATE, RUN_CONFIG)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# -- names and listing ------------------------------------------------------------------------------
def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / f"checkpoint-{step}"


def is_checkpoint_name(name: str) -> bool:
    return name == BEST or CHECKPOINT_RE.match(name) is not None


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-STEP`` folders of a run, by step."""
    found = [(int(m.group(1)), p) for p in Path(run).glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def is_model_folder(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in MODEL_FILES)


def is_resumable(path: Path) -> bool:
    """A complete training checkpoint: the model and everything the trainer needs to continue."""
    return is_model_folder(path) and all((Path(path) / name).is_file() for name in TRAINER_FILES)


def is_run_folder(path: str | Path) -> bool:
    """A run folder (or a checkpoint in one): something ``train`` wrote, which ``report`` and ``serve`` read."""
    path = Path(path)
    return path.is_dir() and ((path / RUN_CONFIG).is_file() or (path / METRICS).is_file()
                              or is_model_folder(path) or (path / BEST).is_dir() or bool(checkpoints(path)))


def resolve_checkpoint(path: str | Path) -> Path:
    """The model folder of a checkpoint or run folder: itself, the run's ``best/``, else its newest
    ``checkpoint-STEP/`` (a run still before its first evaluation)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint or run folder")
    for candidate in (path, path / BEST, *(p for _, p in reversed(checkpoints(path)))):
        if is_model_folder(candidate):
            return candidate
    raise UserError(f"{path}: not a checkpoint (needs config.json and model.safetensors) "
                    "nor a run folder (no best/ or checkpoint-*/)")


def run_of(path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to, or None for a folder outside a run."""
    path = Path(path).resolve()
    return path.parent if is_checkpoint_name(path.name) else None


def display_name(path: str | Path) -> str:
    """``run`` for a run or model folder, ``run/best`` or ``run/checkpoint-100`` for a checkpoint inside a run."""
    path = Path(path).resolve()
    if run_of(path) is not None:
        return f"{path.parent.name}/{path.name}"
    return path.name or "tinygemma"


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint ``--resume auto`` continues: the newest complete ``checkpoint-STEP``, else a complete
    ``best/`` (a run whose step checkpoints were deleted), else None."""
    for _, path in reversed(checkpoints(run)):
        if is_resumable(path):
            return path
    best = Path(run) / BEST
    return best if is_resumable(best) else None


# -- atomic folder swaps and crash recovery ------------------------------------------------------------
def temp_dir(final: Path) -> Path:
    """Where ``final`` is written before :func:`replace_dir` swaps it in (emptied first)."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; a previous ``final`` is moved aside to ``.old-NAME`` first,
    then deleted (:func:`recover` restores a folder caught between the two renames)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder so that no reader ever sees half of it: renamed away first, then deleted."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fault_point("remove_dir")
    shutil.rmtree(doomed, ignore_errors=True)


def fault_point(name: str) -> None:
    """Tests make the process die here, as a SIGKILL would, with ``TINYGEMMA_FAULT=name``."""
    if os.environ.get("TINYGEMMA_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def prune(run: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints (``best/`` is never pruned)."""
    for _, old in checkpoints(run)[:-keep_last]:
        remove_dir(old)


def recover(run: Path) -> None:
    """Tidy after a crash: drop half-written and half-deleted folders; bring back a folder caught mid-swap."""
    run = Path(run)
    for leftover in (*run.glob(".tmp-*"), *run.glob(".del-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in run.glob(".old-*"):
        final = old.with_name(old.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


# -- one writer per run folder -------------------------------------------------------------------------
@contextmanager
def lock(run: Path, what: str = "tinygemma train") -> Iterator[None]:
    """Hold the run folder's lock while training writes it; a second trainer is refused in one line.

    An OS file lock (flock): released when the process exits in any way, so a lock of a killed trainer is
    never stale. The file keeps the owner's PID for the message.
    """
    path = Path(run) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{run} is in use by another trainer (PID {owner}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# -- metadata of a checkpoint --------------------------------------------------------------------------
def read_run_config(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's or run's ``run_config.json`` (checked to be one of ours), or None where there is none."""
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        return None
    data = load_json(path)
    train = data.get("train") if isinstance(data, dict) else None
    block = train.get("block_size") if isinstance(train, dict) else None
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a tinygemma run config (needs a positive train.block_size and model)")
    return data


def read_checkpoint_meta(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, run_config) of a resumable checkpoint folder, or a one-line UserError."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"--resume {ckpt}: no such checkpoint folder")
    for name in (*MODEL_FILES, *TRAINER_FILES):
        if not (ckpt / name).is_file():
            raise UserError(f"{ckpt}: incomplete checkpoint (no {name})")
    state = load_json(ckpt / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{ckpt / TRAINER_STATE}: not a tinygemma trainer state (needs an integer step)")
    return state, read_run_config(ckpt)


def write_run_config(run: Path, config: dict[str, Any]) -> None:
    atomic_write_text(Path(run) / RUN_CONFIG, json.dumps(config, indent=2) + "\n")


def clear(run: Path) -> None:
    """Start a run folder over (``train --force``): its checkpoints, ``best/`` and metrics go; other files stay."""
    run = Path(run)
    for _, path in checkpoints(run):
        remove_dir(path)
    if (run / BEST).is_dir():
        remove_dir(run / BEST)
    (run / METRICS).unlink(missing_ok=True)


# -- metrics.jsonl --------------------------------------------------------------------------------------
def _parse_lines(data: bytes) -> list[dict]:
    records = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class Metrics:
    """The run's ``metrics.jsonl``: appended by the trainer, read by plots, the studio and reports."""

    def __init__(self, run: Path):
        self.path = Path(run) / METRICS

    def read(self) -> list[dict]:
        """Every complete record; a half-written last line (a kill during an append) is left out."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return _parse_lines(data[:data.rfind(b"\n") + 1])

    def keep_until(self, step: int) -> list[dict]:
        """Cut the file back to the records of steps <= ``step`` (what a resumed checkpoint had logged; later
        lines belong to a lost future) and return them. A half-written last line is dropped, and said so."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            warn(f"{self.path}: dropped a half-written last line")
        records = [r for r in self.read() if isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, cursor: str = "") -> tuple[list[dict], str, bool]:
    """Records of the lines added since ``cursor``; returns (records, next cursor, restarted).

    The cursor names the file (its inode) and a byte offset. A half-written last line waits for the
    next call; NaN and infinities come back as None. A replaced file (training rewrites it when resuming)
    or a shorter one (a new run) is read from the start, with ``restarted`` true. Lines that are not JSON
    objects are skipped.
    """
    inode, _, offset_text = cursor.partition("-")
    offset = int(offset_text) if offset_text.isdigit() else 0
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            restarted = offset > st.st_size or (offset > 0 and inode != str(st.st_ino))
            offset = 0 if restarted else offset
            f.seek(offset)
            data = f.read(st.st_size - offset)
    except FileNotFoundError:
        return [], "", offset > 0
    end = data.rfind(b"\n") + 1
    records = [{k: _finite(v) for k, v in r.items()} for r in _parse_lines(data[:end])]
    return records, f"{st.st_ino}-{offset + end}", restarted


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: a diverged loss is shown as a gap."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


# -- samples reports ------------------------------------------------------------------------------------
def latest_report(run: Path) -> Path | None:
    """The newest samples report in a run folder (its HTML twin when there is one); model cards are skipped.

    Only regular files that lie inside the run folder count: a symbolic link is never followed out of it.
    """
    run = Path(run)
    root = run.resolve()
    found: dict[Path, Path] = {}
    for pattern in ("*.html", "*/*.html", "*/*/*.html", "*.md", "*/*.md", "*/*/*.md"):
        for p in run.glob(pattern):
            if p.name.lower() == "readme.md" or p.is_symlink() or not p.is_file() \
                    or root not in p.resolve().parents:
                continue
            found.setdefault(p.with_suffix(""), p)  # .html was globbed first, so it wins over its .md twin
    if not found:
        return None
    return max(found.values(), key=lambda p: (p.stat().st_mtime, p.suffix == ".html"))
