"""TinyStories -> GPT-2 token memmaps (``train.bin``, ``val.bin``, ``meta.json``), and the reader.

Every story is stripped, optionally repaired with ftfy, encoded with GPT-2's BPE and followed by
``<|endoftext|>`` (50256), so the model learns where stories end.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygemma.config import UserError
from tinygemma.tokenizer import Tokenizer

FORMAT_VERSION = 1
DTYPE = "uint16"
SPLITS = {"train": "train.bin", "val": "val.bin"}
TXT_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}


@dataclass
class PrepareConfig:
    source: str = "roneneldan/TinyStories"
    out: str = "data/tinystories"
    max_stories: int | None = None
    fix_text: bool = True
    force: bool = False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if "<|endoftext|>" not in text:
        raise UserError(f"{path}: no <|endoftext|> separator")
    return text.split("<|endoftext|>")


def _normalise(stories: list[str], fix_text: bool) -> tuple[list[str], int]:
    import ftfy

    out, changed = [], 0
    for s in stories:
        s = s.strip()
        if not s:
            continue
        if fix_text:
            fixed = ftfy.fix_text(s)
            changed += fixed != s
            s = fixed
        out.append(s)
    return out, changed


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenise ``cfg.source`` (a folder with the original .txt files) into ``cfg.out``."""
    src, out = Path(cfg.source), Path(cfg.out)
    tok = Tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "tokenizer": tok.name, "bpe_sha256": tok.bpe_sha256,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": DTYPE, "source": str(src),
            "normalisation": {"strip": True, "drop_empty": True, "fix_text": cfg.fix_text, "stories_changed": 0},
            "splits": {}}
    for split, name in SPLITS.items():
        stories, changed = _normalise(_read_txt(src / TXT_FILES[split]), cfg.fix_text)
        stories = stories[: cfg.max_stories]
        meta["normalisation"]["stories_changed"] += changed
        ids = [t for story in tok.encode_batch(stories) for t in (*story, tok.eot_id)]
        tmp = out / (name + ".tmp")
        np.asarray(ids, dtype=DTYPE).tofile(tmp)
        os.replace(tmp, out / name)
        meta["splits"][split] = {"file": name, "stories": len(stories), "tokens": len(ids),
                                 "sha256": _sha256(out / name)}
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / "meta.json.tmp", out / "meta.json")
    return meta


class TokenDataset:
    """One split of prepared data, memory-mapped; checks meta.json before trusting the bytes."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", vocab_size: int | None = None):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path}: missing (run `tinygemma prepare` first)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path}: not valid JSON") from None
        m = self.meta
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{meta_path}: format version {m.get('format_version')}, expected {FORMAT_VERSION}")
        if m.get("dtype") != DTYPE:
            raise UserError(f"{meta_path}: dtype {m.get('dtype')!r}, expected {DTYPE!r}")
        if m.get("tokenizer") != Tokenizer.name or m.get("bpe_sha256") != Tokenizer.bpe_sha256:
            raise UserError(f"{meta_path}: made with tokenizer {m.get('tokenizer')!r} "
                            f"({str(m.get('bpe_sha256'))[:12]}…), not GPT-2's")
        if vocab_size is not None and m.get("vocab_size") != vocab_size:
            raise UserError(f"{meta_path}: vocab size {m.get('vocab_size')} does not match the model's {vocab_size}")
        if split not in m.get("splits", {}):
            raise UserError(f"{meta_path}: no split {split!r} (have {', '.join(m.get('splits', {}))})")
        info = m["splits"][split]
        path = self.dir / info["file"]
        itemsize = np.dtype(DTYPE).itemsize
        if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
            size = path.stat().st_size if path.is_file() else "missing"
            raise UserError(f"{path}: size {size} does not match {info['tokens']} tokens in meta.json")
        self.split = split
        self.path = path
        self.tokens = np.memmap(path, dtype=DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)
