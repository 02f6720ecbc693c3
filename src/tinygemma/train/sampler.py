"""Batches for training: random windows of a token stream, or whole instruct records with their mask."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from tinygemma.config import UserError
from tinygemma.data.config import MASK_DTYPE
from tinygemma.data.dataset import TokenDataset
from tinygemma.fused import IGNORE_INDEX

PAD_MULTIPLE = 64  # fine-tuning rows are padded to the batch's longest record, rounded up to this


class InstructDataset(TokenDataset):
    """One split of instruct records: tokens, mask and record offsets, checked against meta.json."""

    format = "instruct"

    def _wrong_format(self) -> UserError:
        return UserError(f"{self.dir}: plain token data, not instruct records; make instruct data with "
                         "`tinygemma prepare --instruct` (or --derive-instructions)")

    def __init__(self, directory: str | os.PathLike, split: str = "train", vocab_size: int | None = None):
        super().__init__(directory, split, vocab_size)
        info = self.meta["splits"][split]
        mask_path, idx_path = self.dir / info["mask_bin"], self.dir / info["idx_npy"]
        if not mask_path.is_file() or mask_path.stat().st_size != info["tokens"]:
            raise UserError(f"{mask_path}: missing or not {info['tokens']} bytes as meta.json says")
        try:
            self.starts = np.load(idx_path)
        except (OSError, ValueError):
            raise UserError(f"{idx_path}: missing or not a .npy file") from None
        if self.starts.shape != (info["records"] + 1,) or self.starts[-1] != info["tokens"]:
            raise UserError(f"{idx_path}: does not index {info['records']} records of {info['tokens']} tokens")
        self.mask = np.memmap(mask_path, dtype=MASK_DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.starts) - 1

    def prompt_lengths(self) -> np.ndarray:
        """Per record, the offset of its first trained token (the record's length when it has none)."""
        trained = np.flatnonzero(np.asarray(self.mask, dtype=bool))
        starts, ends = self.starts[:-1], self.starts[1:]
        i = np.minimum(np.searchsorted(trained, starts), max(len(trained) - 1, 0))
        first = trained[i] if len(trained) else ends
        return np.minimum(np.where(first >= starts, first, ends), ends) - starts

    def check_block_size(self, block_size: int) -> None:
        """Refuse a block that cuts most records before their story starts (nothing to train on: a NaN loss)."""
        prompts = self.prompt_lengths()
        short = int((prompts > block_size).sum())
        if short * 2 > len(prompts):
            raise UserError(f"block_size {block_size} ends before the story in {short} of {len(prompts)} "
                            f"{self.split} records (their instructions take {int(np.median(prompts))} tokens, "
                            "median); raise --block-size")

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of record ``i``."""
        s, e = self.starts[i], self.starts[i + 1]
        return self.tokens[s:e], self.mask[s:e]

    def batch(self, indices: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y (B, T), int64: one record per row from its start, cut from the end when
        longer than block_size + 1, padded with ``<|endoftext|>`` in x when shorter; y is the next token, IGNORE_INDEX
        on padding and where that token is not trained on (its mask is 0). T is the longest row rounded up to
        a multiple of PAD_MULTIPLE, at most block_size: the full block would add padding to every row (a fifth
        more positions at 16 x 512 on TinyStories records), and the rounding keeps the shapes a compiled
        model sees few."""
        rows = [self.record(int(i)) for i in indices]
        longest = max(len(ids) for ids, _ in rows) - 1
        width = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        eot = self.meta["eot_id"]
        x = torch.full((len(indices), width), eot, dtype=torch.long)
        y = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids = torch.from_numpy(ids[:block_size + 1].astype(np.int64))
            keep = torch.from_numpy(mask[1:block_size + 1].astype(bool))
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = ids[1:].masked_fill(~keep, IGNORE_INDEX)
        return x, y


# -- data -----------------------------------------------------------------------------------------------
class Sampler:
    """Random windows of block_size + 1 tokens; the global batch of a step depends only on (seed, step).

    A step draws micro x world x accum window starts in one flat sequence from a generator seeded with
    (seed, step); micro-batch i of rank r takes its slice. Any layout with the same product therefore trains
    on the same sequences in a step, which is what lets a resume re-split micro-batch, accumulation and ranks.
    """

    kind = "random_windows"

    def __init__(self, tokens: np.ndarray, block_size: int, micro_batch: int, grad_accum: int,
                 rank: int, world: int, seed: int):
        self.tokens, self.block, self.micro, self.accum = tokens, block_size, micro_batch, grad_accum
        self.rank, self.world, self.seed = rank, world, seed

    def _choices(self) -> int:
        return len(self.tokens) - self.block  # window starts

    def _batch(self, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.tokens[i: i + self.block + 1] for i in starts]).astype(np.int64))

    def _draw(self, rng: np.random.Generator, count: int) -> list:
        """``count`` global batches from ``rng``; this rank's slice of each."""
        picks = rng.integers(0, self._choices(), size=(count, self.world, self.micro))
        return [self._batch(picks[i, self.rank]) for i in range(count)]

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches for optimizer step ``step``: grad_accum tensors of (micro, block+1)."""
        return self._draw(np.random.default_rng([self.seed, 0, step]), self.accum)

    def fixed_batches(self, purpose: int, rows: int) -> list:
        """The same ``rows`` sequences at every evaluation, in global batches of micro x world (this rank's
        slice of each); a layout whose micro x world does not divide ``rows`` adds rows to fill the last batch.
        The sequences depend on ``rows``, not on the layout, so a re-split resume evaluates the same ones."""
        return self._draw(np.random.default_rng([self.seed, purpose]), -(-rows // (self.micro * self.world)))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "world": self.world, "micro_batch": self.micro,
                "grad_accum": self.accum, "block_size": self.block}


class RecordSampler(Sampler):
    """Fine-tuning: whole instruct records, one per row from its start (padded, never packed, so no row
    attends across records); batches are (x, y) with y = IGNORE_INDEX where the loss does not train."""

    kind = "random_records"

    def _choices(self) -> int:
        return len(self.tokens)  # records of an InstructDataset

    def _batch(self, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.batch(records, self.block)
