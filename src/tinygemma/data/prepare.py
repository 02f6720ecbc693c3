"""TinyStories -> GPT-2 token memmaps (``train.bin``, ``val.bin``, ``meta.json``), and the reader.

``prepare`` streams stories from the hub (through ``datasets`` / ``huggingface_hub``) or from local
files in any of the dataset's published forms, normalises them (strip, drop empty, repair mojibake),
tokenises them in ``--workers`` processes (this one included) with tiktoken's ordinary encoding and
writes the ids in order, each story followed by ``<|endoftext|>`` (50256) so the model learns where
stories end. Memory stays flat: at most ``4 x workers`` tasks of about 1 MB of text are in flight.

Everything is written to ``*.tmp`` files in the output folder and renamed at the end, ``meta.json``
last (the old one is removed before the ``.bin`` files are replaced), so an interrupted run never
leaves files that ``TokenDataset`` accepts.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinygemma.config import UserError
from tinygemma.data.config import DTYPE, FORMAT_VERSION, SPLITS, PrepareConfig
from tinygemma.data.dataset import TokenDataset
from tinygemma.data.sources import Input, Task, resolve_source
from tinygemma.data.workers import TaskResult, encode_task, job_ready, num_workers, start_workers
from tinygemma.data.writer import SplitWriter, Written, discard_outputs, fsync_dir, sha256
from tinygemma.log import progress
from tinygemma.tokenizer import Tokenizer


def _options(cfg: PrepareConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("max_stories", "fix_text", "v2", "val_fraction", "seed")}


def _tokenizer_info(tok: Tokenizer) -> dict:
    return {"tokenizer": tok.name, "bpe_sha256": tok.bpe_sha256, "vocab_size": tok.vocab_size}


def _check_out(out: Path, cfg: PrepareConfig, tok: Tokenizer, fingerprint: dict) -> dict | None:
    """The existing meta.json when it already holds this exact data; refuse another tokenizer's data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path is a file, not a folder")
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        made_with = {k: meta[k] for k in ("tokenizer", "bpe_sha256", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError):
        if cfg.force:
            return None
        raise UserError(f"{meta_path}: not a tinygemma meta.json; refusing to overwrite without --force") from None
    if made_with != _tokenizer_info(tok):
        if cfg.force:
            return None
        raise UserError(f"{meta_path}: data made with tokenizer {made_with['tokenizer']!r} "
                        f"({str(made_with['bpe_sha256'])[:12]}…), not GPT-2's; use --force to overwrite")
    if cfg.force or meta.get("fingerprint") != fingerprint:
        return None
    for info in meta.get("splits", {}).values():
        p = out / info["file"]
        if not p.is_file() or p.stat().st_size != info["tokens"] * np.dtype(DTYPE).itemsize:
            return None
    return meta


@dataclass(frozen=True)
class Layout:
    """What ``prepare`` makes of the source: plain story streams (``PLAIN``), or instruct records with a loss
    mask (``tinygemma.instruct``): how inputs are found, how a task is encoded, how a split is written."""

    inputs: Callable[[PrepareConfig], list[Input]] = resolve_source
    encode: Callable[[Task], TaskResult] = encode_task
    writer: Callable[[Path], SplitWriter] = SplitWriter
    unit: str = "stories"
    meta: dict = field(default_factory=dict)  # extra meta.json fields (fingerprinted too)


PLAIN = Layout()


def prepare(cfg: PrepareConfig, command: str | None = None, layout: Layout = PLAIN) -> dict:
    """Tokenise ``cfg.source`` into ``cfg.out`` (train.bin, val.bin, meta.json); returns the meta dict.

    ``command`` is the command line recorded in meta.json (the CLI passes it).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    tok = Tokenizer()
    inputs = layout.inputs(cfg)
    fingerprint = {"format_version": FORMAT_VERSION, **_tokenizer_info(tok), "source": cfg.source,
                   "inputs": [i.fingerprint | {"split": i.split} for i in inputs], "options": _options(cfg),
                   **layout.meta}
    if (meta := _check_out(out, cfg, tok, fingerprint)) is not None:
        print(f"{out}: up to date (same source, options and tokenizer); nothing to do (use --force to redo)",
              file=sys.stderr)
        return meta
    created = not out.exists()
    writers = _open_writers(out, layout)
    workers = num_workers(cfg.workers)
    try:
        changed, nbytes = _run(inputs, writers, cfg, tok, workers, layout.encode)
        for split, w in writers.items():
            if w.stories == 0:
                why = f" (too few {layout.unit} for val_fraction?)" if split == "val" else ""
                raise UserError(f"{', '.join(i.name for i in inputs)}: no {split} {layout.unit}{why}"
                                f"{w.empty_reason()}")
            w.finish()
        meta = _meta(cfg, layout, tok, inputs, writers, changed, command, fingerprint)
        tmp_meta = out / "meta.json.tmp"
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        discard_outputs(writers, out, created)
        name = e.filename or out
        if e.filename is None or str(name).endswith(".tmp"):
            raise UserError(f"{name}: write failed ({e.strerror or e}); the existing data was left as it was") from None
        raise UserError(f"{name}: cannot read ({e.strerror or e})") from None
    except BaseException:
        discard_outputs(writers, out, created)
        raise
    # Everything is on disk. Drop the old meta.json first so a kill between the renames leaves no valid set.
    (out / "meta.json").unlink(missing_ok=True)
    for w in writers.values():
        w.commit()
    os.replace(tmp_meta, out / "meta.json")
    fsync_dir(out)
    secs = time.perf_counter() - t0
    parts = [f"{s} {w.summary()}" for s, w in writers.items()]
    print(f"prepared {out}: {'; '.join(parts)}; {changed:,} {layout.unit} repaired; {secs:.1f}s "
          f"({nbytes / 1e6 / secs:.1f} MB/s, {sum(w.tokens for w in writers.values()) / secs:,.0f} tokens/s, "
          f"{workers} workers)", file=sys.stderr)
    return meta


def _open_writers(out: Path, layout: Layout) -> dict[str, SplitWriter]:
    """The output folder, cleared of the temp files a killed run of ours left, and a writer per split."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None
    for name in (*SPLITS.values(), "meta.json"):  # our own temp files, left by a killed run (only ours)
        (out / f"{name}.tmp").unlink(missing_ok=True)
    try:
        return {split: layout.writer(out / name) for split, name in SPLITS.items()}
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror})") from None


def _meta(cfg: PrepareConfig, layout: Layout, tok: Tokenizer, inputs: list[Input], writers: dict[str, SplitWriter],
          changed: int, command: str | None, fingerprint: dict) -> dict:
    """meta.json: the format, tokenizer, source, normalisation, split rule, each split's files and hashes."""
    return {
        **layout.meta, "format_version": FORMAT_VERSION, **_tokenizer_info(tok), "eot_id": tok.eot_id,
        "dtype": DTYPE,
        "source": cfg.source, "inputs": [i.name for i in inputs],
        "normalisation": {"strip": True, "drop_empty": True, "fix_text": cfg.fix_text,
                          "fix_text_method": "ftfy encoding fixes only (+ bare 'â€' -> '”')" if cfg.fix_text
                          else None, "stories_changed": changed},
        "split": ({"method": "blake2b(story, key=seed) < val_fraction", "val_fraction": cfg.val_fraction,
                   "seed": cfg.seed} if any(i.split == "split" for i in inputs) else "source splits"),
        "max_stories": cfg.max_stories,
        "splits": {split: w.info() for split, w in writers.items()},
        "command": command,
        "config": asdict(cfg), "fingerprint": fingerprint,
    }


def _run(inputs: list[Input], writers: dict[str, SplitWriter], cfg: PrepareConfig, tok: Tokenizer,
         workers: int, encode: Callable[[Task], TaskResult] = encode_task) -> tuple[int, int]:
    """Tokenise the tasks in ``workers`` processes and write the results in order; returns (stories
    repaired, bytes read).

    This process is one of them: it keeps the pool (``workers - 1`` processes) fed with two tasks per
    worker and encodes the next task itself whenever it would otherwise wait, so that with one worker
    per core no core is left to a process that only dispatches; the split of the work adapts to how
    much time reading and writing leave it."""
    pool = start_workers(cfg, tok, workers)
    total = None if any(i.size is None for i in inputs) else sum(i.size for i in inputs)
    out = Written(inputs, writers, cfg.max_stories, progress(total, unit="B", unit_scale=True, unit_divisor=1000,
                                                              desc="prepare", mininterval=0.5))
    tasks = out.tasks()
    pending: collections.deque = collections.deque()  # (input, _Result or the pool's AsyncResult), in order
    try:
        item = next(tasks, None)
        while item is not None or pending:
            in_pool = sum(1 for _, job in pending if not job_ready(job))
            while pool and item is not None and len(pending) < 4 * workers and in_pool < 2 * (workers - 1):
                pending.append((item[0], pool.apply_async(encode, (item[1],))))
                item, in_pool = next(tasks, None), in_pool + 1
            if pending and job_ready(pending[0][1]):
                k, job = pending.popleft()
                out.write(k, job if isinstance(job, TaskResult) else job.get())
            elif item is not None and len(pending) < 4 * workers:
                pending.append((item[0], encode(item[1])))  # rather than wait: this process's share
                item = next(tasks, None)
            else:
                k, job = pending.popleft()
                out.write(k, job.get())
    finally:
        out.bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return out.changed, out.nbytes


def verify(directory: str | os.PathLike) -> dict:
    """Recompute the sha256 of each split's file and compare with meta.json; returns the meta dict."""
    ds = TokenDataset(directory, "train")  # checks format, tokenizer and sizes
    for split, info in ds.meta["splits"].items():
        path = ds.dir / info["file"]
        if not path.is_file():
            raise UserError(f"{path}: missing")
        digest = sha256(path)
        if digest != info["sha256"]:
            raise UserError(f"{path}: sha256 {digest[:12]}… does not match meta.json ({info['sha256'][:12]}…)")
        TokenDataset(directory, split)
        print(f"{path}: OK ({info['stories']:,} stories, {info['tokens']:,} tokens)")
    return ds.meta
