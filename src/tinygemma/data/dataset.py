"""A prepared split of token data, memory-mapped and checked against its meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tinygemma.config import UserError
from tinygemma.data.config import DTYPE, FORMAT_VERSION
from tinygemma.tokenizer import Tokenizer


def data_format(directory: str | os.PathLike) -> str | None:
    """meta.json's "format" of a prepared folder (None for plain story streams, and for a folder without a
    readable meta.json: opening it as a dataset then says what is wrong)."""
    try:
        meta = json.loads((Path(directory) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


class TokenDataset:
    """One split of prepared data, memory-mapped; checks meta.json before trusting the bytes."""

    format: str | None = None  # meta.json's "format": absent for plain story streams

    def _wrong_format(self) -> UserError:
        return UserError(f"{self.dir}: instruct data (records with a loss mask), not plain token data; "
                         "train on it with `tinygemma train` or `tinygemma finetune`, score it with `tinygemma eval "
                         "--instruct`")

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
        if m.get("format") != self.format:  # e.g. instruct records: their loss mask must not be ignored
            raise self._wrong_format()
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
