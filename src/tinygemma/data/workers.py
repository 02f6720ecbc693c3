"""The tokenizer worker pool: tasks of text in, token arrays out."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinygemma.data.config import DTYPE, PrepareConfig
from tinygemma.data.sources import Task, repair_mojibake
from tinygemma.log import warn
from tinygemma.tokenizer import EOT_TOKEN, Tokenizer


@dataclass
class TaskResult:
    tokens: np.ndarray  # all stories of the task in order, each followed by EOT
    lengths: np.ndarray  # tokens per story (EOT included)
    is_val: np.ndarray | None  # per story, when the task is split
    repaired: np.ndarray  # per story: its mojibake was repaired
    nbytes: int
    error: str | None = None

    @property
    def changed(self) -> int:
        return int(self.repaired.sum())

    def head(self, n: int) -> TaskResult:
        """The first ``n`` stories (for --max-stories)."""
        return dataclasses.replace(self, tokens=self.tokens[: int(self.lengths[:n].sum())], lengths=self.lengths[:n],
                                   is_val=None if self.is_val is None else self.is_val[:n], repaired=self.repaired[:n])

    def select(self, val: bool) -> TaskResult:
        """One side of a seeded train/val split: the val stories, or the train ones."""
        keep = self.is_val if val else ~self.is_val
        return dataclasses.replace(self, tokens=self.tokens[np.repeat(keep, self.lengths)],
                                   lengths=self.lengths[keep], is_val=None, repaired=self.repaired[keep])


WORKER: dict[str, Any] = {}


def _init_worker(tok: Tokenizer, fix_text: bool, val_fraction: float, seed: int, ignore_sigint: bool) -> None:
    if ignore_sigint:  # Ctrl-C goes to the main process, which stops the pool and cleans up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER.update(tok=tok, fix_text=fix_text, threshold=int(val_fraction * 2**64),
                   key=seed.to_bytes(8, "little", signed=True))


def in_val_split(text: str) -> bool:
    """Seeded hash of the story's text: independent of order, batching and workers; duplicates stay together."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=WORKER["key"]).digest()
    return int.from_bytes(h, "little") < WORKER["threshold"]


def task_texts(task: Task) -> tuple[list[str], list[bool]]:
    """The task's stories (records), stripped, empty ones dropped, mojibake repaired if asked; and, per
    story, whether it was repaired. Raises UnicodeDecodeError for a .txt piece that is not UTF-8."""
    items = task.items
    if isinstance(items, bytes):
        items = items.decode("utf-8").split(EOT_TOKEN)
    texts, repaired = [], []
    for item in items:
        text = item.strip()
        if not text:
            continue
        fixed = repair_mojibake(text) if WORKER["fix_text"] else text
        texts.append(fixed)
        repaired.append(fixed != text)
    return texts, repaired


def failed_result(task: Task, e: UnicodeDecodeError) -> TaskResult:
    return TaskResult(np.empty(0, DTYPE), np.empty(0, np.int64), None, np.empty(0, bool), 0,
                   f"{task.name}: invalid UTF-8 at byte {task.offset + e.start} ({e.reason})")


def encode_task(task: Task) -> TaskResult:
    tok: Tokenizer = WORKER["tok"]
    try:
        texts, repaired = task_texts(task)
    except UnicodeDecodeError as e:
        return failed_result(task, e)
    # encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary, minus the Python
    # list per story: the ids stay in tiktoken's buffer and are joined as bytes (~25% less CPU per token).
    # Not encode_ordinary_batch: with one thread its ThreadPoolExecutor makes it ~2x slower than a loop;
    # the parallelism comes from the worker processes.
    encode = tok.enc.encode_to_numpy
    ids = [encode(t, disallowed_special=()) for t in texts]
    eot = np.array([tok.eot_id], dtype=np.uint32).tobytes()
    joined = b"".join([part for story in ids for part in (story, eot)])
    tokens = np.frombuffer(joined, dtype=np.uint32).astype(DTYPE)
    lengths = np.fromiter((len(s) + 1 for s in ids), dtype=np.int64, count=len(ids))
    is_val = np.fromiter((in_val_split(t) for t in texts), dtype=bool, count=len(texts)) if task.split_val else None
    return TaskResult(tokens, lengths, is_val, np.array(repaired, dtype=bool), task.nbytes)


def num_workers(n: int) -> int:
    """``--workers``, 0 meaning every core; far more than the cores (each a process holding the tokenizer)
    gains nothing and may exhaust memory, so it is capped at 4 per core, with a warning."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if n > 4 * cores:
        warn(f"--workers {n} is far above the {cores} cores; using {4 * cores}")
        return 4 * cores
    return n or cores


def start_workers(cfg: PrepareConfig, tok: Tokenizer, workers: int) -> mp.pool.Pool | None:
    """The pool of ``workers - 1`` processes (None for one worker), and this process made a worker too."""
    init = (tok, cfg.fix_text, cfg.val_fraction, cfg.seed)
    pool = None
    if workers > 1:
        # fork (Linux): workers start at once with the tokenizer loaded; spawn would re-import torch in each.
        # Elsewhere fork is unsafe with some system libraries, so the platform default is kept.
        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
        pool = ctx.Pool(workers - 1, initializer=_init_worker, initargs=(*init, True))
    _init_worker(*init, False)  # after the fork: the pool's workers ignore SIGINT, this process does not
    return pool


def job_ready(job: TaskResult | mp.pool.AsyncResult) -> bool:
    return isinstance(job, TaskResult) or job.ready()
