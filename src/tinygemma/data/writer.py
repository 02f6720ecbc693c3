"""Writing a split's token file atomically, with its sha256 and meta.json."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinygemma.config import UserError
from tinygemma.data.sources import Input, Task
from tinygemma.data.workers import TaskResult


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class SplitWriter:
    """Appends token ids to ``NAME.tmp``, hashing as it goes."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = self.stories = 0

    def write(self, tokens: np.ndarray, stories: int) -> None:
        data = tokens.tobytes()
        try:
            self.f.write(data)
        except OSError as e:  # name the file: write errors on file objects carry no filename
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None
        self.sha.update(data)
        self.tokens += len(tokens)
        self.stories += stories

    def add(self, res: TaskResult) -> None:
        self.write(res.tokens, len(res.lengths))

    def info(self) -> dict:
        """This split's entry in meta.json."""
        return {"file": self.path.name, "stories": self.stories, "tokens": self.tokens, "sha256": self.sha.hexdigest()}

    def summary(self) -> str:
        return f"{self.stories:,} stories {self.tokens:,} tokens ({self.tokens / self.stories:.1f}/story)"

    def empty_reason(self) -> str:
        return ""

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def finish(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None
        self.f.close()

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def discard_outputs(writers: dict[str, SplitWriter], out: Path, created: bool) -> None:
    for w in writers.values():
        w.discard()
    (out / "meta.json.tmp").unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:  # not empty: someone else put files there meanwhile
            pass


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Written:
    """What _run has written so far: stories kept per input (for --max-stories), stories repaired, bytes read."""

    inputs: list[Input]
    writers: dict[str, SplitWriter]
    max_stories: int | None
    bar: Any  # tqdm
    taken: list[int] = field(init=False)  # stories kept per input
    changed: int = 0
    nbytes: int = 0

    def __post_init__(self):
        self.taken = [0] * len(self.inputs)

    def tasks(self) -> Iterator[tuple[int, Task]]:
        """One stream over all inputs, so the workers do not drain and refill between train and val."""
        for k, inp in enumerate(self.inputs):
            for task in inp.tasks():
                if self.max_stories is not None and self.taken[k] >= self.max_stories:
                    break  # stop reading (or streaming from the hub) an input that has enough
                yield k, task

    def write(self, k: int, res: TaskResult) -> None:
        limit = None if self.max_stories is None else self.max_stories - self.taken[k]
        if limit is not None and limit <= 0:
            return  # in flight when its input reached --max-stories
        if res.error:
            raise UserError(res.error)
        if limit is not None and len(res.lengths) >= limit:  # at the limit too: it drops what follows the last
            res = res.head(limit)  # kept story (malformed instruct records, which were never read)
        self.taken[k] += len(res.lengths)
        if res.is_val is not None:
            self.writers["train"].add(res.select(val=False))
            self.writers["val"].add(res.select(val=True))
        else:
            self.writers[self.inputs[k].split].add(res)
        self.changed += res.changed
        self.nbytes += res.nbytes
        self.bar.update(res.nbytes)
        stories, tokens = (sum(getattr(w, a) for w in self.writers.values()) for a in ("stories", "tokens"))
        self.bar.set_postfix_str(f"{stories:,} stories, {tokens:,} tokens", refresh=False)
