"""`prepare --instruct`: TinyStories-Instruct records into token files with a loss mask."""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tinygemma.config import UserError
from tinygemma.data.config import DTYPE, MASK_DTYPE, InstructOptions, PrepareConfig
from tinygemma.data.prepare import Layout, prepare
from tinygemma.data.sources import Input, Task, file_input, hub_txt_inputs, resolve_source
from tinygemma.data.workers import WORKER, TaskResult, failed_result, in_val_split, task_texts
from tinygemma.data.writer import SplitWriter
from tinygemma.prompts import PROMPT_VERSION, Malformed, Record, derive_record, parse_record
from tinygemma.tokenizer import Tokenizer

INSTRUCT_FILES = {"train": "TinyStories-Instruct-train.txt", "val": "TinyStories-Instruct-valid.txt"}


@dataclass
class _Records(TaskResult):
    """Encoded records of one task: tokens with their mask, per-record fields, what was skipped."""

    mask: np.ndarray | None = None
    records: list[dict] = field(default_factory=list)
    truncated: np.ndarray | None = None  # per record
    # malformed records as (records kept before it, why, in val): --max-stories cuts them too
    skipped: list[tuple[int, str, bool]] = field(default_factory=list)

    def head(self, n: int) -> _Records:
        cut = int(self.lengths[:n].sum())
        return replace(super().head(n), mask=self.mask[:cut], records=self.records[:n], truncated=self.truncated[:n],
                       skipped=[s for s in self.skipped if s[0] < n])

    def select(self, val: bool) -> _Records:
        keep = self.is_val if val else ~self.is_val
        return replace(super().select(val), mask=self.mask[np.repeat(keep, self.lengths)],
                       records=[r for r, k in zip(self.records, keep, strict=True) if k],
                       truncated=self.truncated[keep], skipped=[s for s in self.skipped if s[2] == val])


def encode_record(tok: Tokenizer, record: Record, max_tokens: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``<|endoftext|>`` + prompt + story + ``<|endoftext|>`` and its mask (1 = trained on: the story and the
    final end-of-text), cut to ``max_tokens``; and whether it was cut."""
    prompt = [tok.eot_id] + tok.encode(record.prompt())
    if len(prompt) >= max_tokens:
        raise Malformed("prompt longer than max_record_tokens")
    story = tok.encode(record.story) + [tok.eot_id]
    ids = np.array(prompt + story, dtype=DTYPE)
    mask = np.concatenate([np.zeros(len(prompt), MASK_DTYPE), np.ones(len(story), MASK_DTYPE)])
    return ids[:max_tokens], mask[:max_tokens], len(ids) > max_tokens


def keeps_headers(text: str, seed: int, share: float) -> bool:
    """Whether a record keeps its instruction lines under ``--instruct-share share``: a hash of (seed, text), so
    the choice is independent of order and workers, and of the one that picks a derived record's words."""
    if share >= 1:
        return True
    h = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True), person=b"share")
    return int.from_bytes(h.digest(), "little") < share * 2**64


def _concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def encode_records(opts: InstructOptions, seed: int, task: Task) -> _Records:
    """The worker side of ``prepare``: parse (or derive) and encode the records of one task."""
    empty = dict(tokens=np.empty(0, DTYPE), lengths=np.empty(0, np.int64), is_val=None,
                 repaired=np.empty(0, bool), nbytes=task.nbytes)
    try:
        texts, repaired = task_texts(task)
    except UnicodeDecodeError as e:
        return _Records(**empty | {"error": failed_result(task, e).error})
    tok: Tokenizer = WORKER["tok"]
    ids, masks, records, truncated, is_val, fixed = [], [], [], [], [], []
    skipped = []
    for text, was_repaired in zip(texts, repaired, strict=True):
        val = task.split_val and in_val_split(text)
        try:
            record = derive_record(text, seed) if opts.derive_instructions else parse_record(text)
            if not (opts.headers and keeps_headers(text, seed, opts.instruct_share)):
                record = Record(story=record.story)
            rec_ids, rec_mask, cut = encode_record(tok, record, opts.max_record_tokens)
        except Malformed as e:
            skipped.append((len(ids), str(e), bool(val)))
            continue
        ids.append(rec_ids)
        masks.append(rec_mask)
        records.append(asdict(record))
        truncated.append(cut)
        is_val.append(val)
        fixed.append(was_repaired)
    return _Records(**empty | dict(
        tokens=_concat(ids, DTYPE), lengths=np.array([len(i) for i in ids], dtype=np.int64),
        is_val=np.array(is_val, dtype=bool) if task.split_val else None, repaired=np.array(fixed, dtype=bool)),
        mask=_concat(masks, MASK_DTYPE), records=records, truncated=np.array(truncated, dtype=bool),
        skipped=skipped)


def _reasons(counts: collections.Counter) -> str:
    return ", ".join(f"{n:,} {why}" for why, n in counts.most_common())


class _RecordWriter(SplitWriter):
    """``SPLIT.bin`` (tokens), ``SPLIT.mask.bin`` (uint8), ``SPLIT.idx.npy`` (int64 record starts, records + 1)
    and, for val, ``val.records.jsonl`` (each record's fields, for evaluation)."""

    def __init__(self, path: Path):
        super().__init__(path)
        split = path.stem
        self.parts = {kind: path.with_name(f"{split}.{kind}") for kind in ("mask.bin", "idx.npy", "records.jsonl")}
        self.mask_f = open(self._tmp("mask.bin"), "wb")
        self.records_f = open(self._tmp("records.jsonl"), "w", encoding="utf-8") if split == "val" else None
        self.starts = [np.zeros(1, np.int64)]
        self.skipped: collections.Counter = collections.Counter()
        self.truncated = self.trained = 0

    def _tmp(self, kind: str) -> Path:
        return self.parts[kind].with_name(self.parts[kind].name + ".tmp")

    def add(self, res: _Records) -> None:
        self.starts.append(self.tokens + np.cumsum(res.lengths))
        super().add(res)
        self.mask_f.write(res.mask.tobytes())
        self.trained += int(res.mask.sum())
        self.skipped.update(why for _, why, _ in res.skipped)
        self.truncated += int(res.truncated.sum())
        if self.records_f is not None:
            self.records_f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in res.records)

    def info(self) -> dict:
        info = super().info()
        return {"file": info["file"], "records": info.pop("stories"), "skipped": sum(self.skipped.values()),
                "skipped_reasons": dict(self.skipped), "truncated": self.truncated, "tokens": self.tokens,
                "trained_tokens": self.trained, "sha256": info["sha256"],
                **{kind.replace(".", "_"): p.name for kind, p in self.parts.items() if kind != "records.jsonl"
                   or self.records_f is not None}}

    def summary(self) -> str:
        skipped = f", {sum(self.skipped.values()):,} skipped" if self.skipped else ""
        return (f"{self.stories:,} records{skipped}, {self.truncated:,} truncated, {self.tokens:,} tokens "
                f"({self.trained:,} trained on)")

    def empty_reason(self) -> str:
        return f"; {sum(self.skipped.values()):,} malformed ({_reasons(self.skipped)})" if self.skipped else ""

    def finish(self) -> None:
        super().finish()
        with open(self._tmp("idx.npy"), "wb") as f:
            np.save(f, np.concatenate(self.starts))
        for f in (self.mask_f, self.records_f):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def commit(self) -> None:
        super().commit()
        for kind, p in self.parts.items():
            if kind != "records.jsonl" or self.records_f is not None:
                os.replace(self._tmp(kind), p)

    def discard(self) -> None:
        super().discard()
        for f in (self.mask_f, self.records_f):
            if f is not None:
                f.close()
        for kind in self.parts:
            self._tmp(kind).unlink(missing_ok=True)


def _instruct_inputs(cfg: PrepareConfig) -> list[Input]:
    """TinyStories-Instruct: a folder with the hub's two files, one file (split by seeded hash), or the hub."""
    if cfg.v2:
        raise UserError("--v2 has no TinyStories-Instruct files; use --derive-instructions --v2")
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return [file_input(path, "split")]
    if path.is_dir():
        found = {split: path / name for split, name in INSTRUCT_FILES.items() if (path / name).is_file()}
        if len(found) < 2:
            have = f"has only {next(iter(found.values())).name}" if found else "has neither file"
            raise UserError(f"{path}: {have} of {' / '.join(INSTRUCT_FILES.values())}; pass --source FILE to "
                            f"split one file ({cfg.val_fraction:.0%} val, seed {cfg.seed})")
        return [file_input(p, split) for split, p in found.items()]
    return hub_txt_inputs(cfg, INSTRUCT_FILES)


def layout(opts: InstructOptions, seed: int) -> Layout:
    """``prepare``'s layout for instruct records, real (``opts.instruct``) or derived."""
    kind = "derived from stories" if opts.derive_instructions else "TinyStories-Instruct"
    return Layout(inputs=resolve_source if opts.derive_instructions else _instruct_inputs,
                       encode=functools.partial(encode_records, opts, seed), writer=_RecordWriter, unit="records",
                       meta={"format": "instruct", "prompt_version": PROMPT_VERSION, "instructions": kind,
                             "max_record_tokens": opts.max_record_tokens, "headers": opts.headers,
                             "instruct_share": opts.instruct_share})


def prepare_instruct(cfg: PrepareConfig, opts: InstructOptions, command: str | None = None) -> dict:
    """``tinygemma prepare --instruct`` / ``--derive-instructions``: an instruct data folder; returns meta.json."""
    meta = prepare(cfg, command, layout(opts, cfg.seed))
    for split, info in meta["splits"].items():
        if info["skipped"]:
            print(f"{split}: skipped {info['skipped']:,} malformed records "
                  f"({_reasons(collections.Counter(info['skipped_reasons']))})", file=sys.stderr)
    return meta


def read_records(directory: str | os.PathLike, split: str = "val") -> list[Record]:
    """The fields of a split's records (``val.records.jsonl``), in order."""
    path = Path(directory) / f"{split}.records.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing (made by `tinygemma prepare --instruct` for the val split)")
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f]
