"""How good is a checkpoint? ``tinygemma eval`` (loss and perplexity) and ``tinygemma samples`` (a report).

``eval`` scores the *entire* split, every token exactly once: the split is read as one stream
preceded by ``<|endoftext|>`` (so its first token is predicted too, as the first of a story), cut
into non-overlapping windows of ``block_size`` predictions. Each window starts cold, with no context
from the previous window (like training, which samples windows without a past), and the last
window is simply shorter. The result is deterministic and independent of the batch size.

Bits per byte are the same summed loss over the bytes of the text those tokens spell:
``loss * tokens / (bytes * ln 2)``, where ``bytes`` is the length of the UTF-8 text the scored tokens
decode to, each ``<|endoftext|>`` separator counting as one byte (a one-byte story separator, as in a
text file of stories; its prediction is part of the loss). Unlike loss per token, this does not
depend on the tokenizer. ``eval`` also measures *context use*: on held-out stories, the mean loss of
each story's second half given its first half, against given only ``<|endoftext|>``.

``samples`` writes a Markdown report and an HTML twin of completions for the tutorial's prompts,
with automatic measures: share of samples ending in ``<|endoftext|>``, repeated-4-gram rate,
distinct-2, mojibake count, the mean token loss of the completion under the model itself, non-words
per 100 words (pyspellchecker's English dictionary) and the Flesch-Kincaid grade (textstat).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tinygemma.config import UserError
from tinygemma.data.dataset import TokenDataset
from tinygemma.fused import IGNORE_INDEX
from tinygemma.log import progress as progress_bar
from tinygemma.model import Gemma3
from tinygemma.quant import load_for_inference
from tinygemma.rundir import read_run_config, resolve_checkpoint
from tinygemma.tokenizer import Tokenizer


# -- eval ----------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str | None = field(default=None, metadata={"help": "prepared data folder (from `tinygemma prepare`)"})
    split: str = field(default="val", metadata={"help": "split to score"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per window (default: the block size "
                                                                    "the checkpoint was trained with, else "
                                                                    "min(context, 512))"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    context_stories: int = field(default=200, metadata={"help": "held-out stories for the context-use measure "
                                                                "(the split's first ones; 0 skips it)"})

    def __post_init__(self):
        if self.block_size is not None and self.block_size <= 0:
            raise UserError(f"block_size must be positive, got {self.block_size}")
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.context_stories < 0:
            raise UserError(f"context_stories must be >= 0, got {self.context_stories}")


def token_windows(tokens: np.ndarray, block_size: int, batch_size: int, eot: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of inputs and targets (B, block_size) that predict every token of ``tokens`` once, read as one
    stream preceded by ``<|endoftext|>``, in non-overlapping windows (the last one shorter: its remaining
    targets are ``IGNORE_INDEX``)."""
    starts = list(range(0, len(tokens), block_size))
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        x = torch.full((len(group), block_size), eot, dtype=torch.long)
        y = torch.full((len(group), block_size), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(group):
            tgt = torch.from_numpy(np.asarray(tokens[s:s + block_size], dtype=np.int64))
            # input t-1 predicts target t; the token before the split is <|endoftext|>
            prev = torch.from_numpy(np.asarray(tokens[max(s - 1, 0):s + len(tgt) - 1], dtype=np.int64))
            inp = torch.cat([torch.tensor([eot]), prev]) if s == 0 else prev
            x[r, :len(tgt)], y[r, :len(tgt)] = inp, tgt
        yield x, y


@torch.inference_mode()
def evaluate_tokens(model: Gemma3, tokens: np.ndarray, block_size: int | None = None, batch_size: int = 4,
                    progress: bool = False, tokenizer: Tokenizer | None = None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte of ``model`` over all of ``tokens`` (see the module
    doc)."""
    mc = model.config
    block_size = block_size or min(mc.context_length, 512)
    if block_size > mc.context_length:
        raise UserError(f"block size {block_size} is above the model's context length {mc.context_length}")
    n = len(tokens)
    if n == 0:
        raise UserError("no tokens to evaluate")
    device = model.lm_head.weight.device
    total, t0 = 0.0, time.perf_counter()
    bar = progress_bar(n, unit="tok", desc="eval", disable=not progress)
    for x, y in token_windows(tokens, block_size, batch_size, mc.eot_token_id):
        logits = model(x.to(device))
        # summed in float64 so that the mean does not depend on how the split is batched
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")
        total += loss.double().sum().item()
        bar.update(int((y != IGNORE_INDEX).sum()))
    bar.close()
    elapsed = time.perf_counter() - t0
    mean = total / n
    n_bytes = text_bytes(tokens, tokenizer or Tokenizer())
    return {"loss": mean, "perplexity": math.exp(mean), "bits_per_byte": total / (n_bytes * math.log(2)),
            "tokens": n, "bytes": n_bytes, "windows": math.ceil(n / block_size), "block_size": block_size,
            "tokens_per_s": n / elapsed, "elapsed_s": elapsed}


@functools.lru_cache(maxsize=2)
def _token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[tokenizer.eot_id] = 1  # a story separator is one byte, not the 13 of its spelling
    return lengths


def text_bytes(tokens: np.ndarray, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the text ``tokens`` decode to, each ``<|endoftext|>`` counting as one byte.

    Byte-level BPE tokens concatenate to the text's bytes, so this is a sum of per-token lengths."""
    return int(_token_byte_lengths(tokenizer)[np.asarray(tokens, dtype=np.int64)].sum())


@torch.inference_mode()
def tail_losses(model: Gemma3, seqs: list[list[int]], first: list[int], batch_size: int = 8) -> list[float]:
    """Per sequence, the summed loss (nats) of predicting ``seq[k]`` from ``seq[:k]`` for every ``k >= first``
    (``first >= 1``). Sequences are batched with right padding, which causal attention never sees."""
    eot, device = model.config.eot_token_id, model.lm_head.weight.device
    out: list[float] = []
    for b in range(0, len(seqs), batch_size):
        group, starts = seqs[b:b + batch_size], first[b:b + batch_size]
        width = max(map(len, group)) - 1
        x = torch.full((len(group), width), eot, dtype=torch.long)
        y = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        for r, (seq, f) in enumerate(zip(group, starts, strict=True)):
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, f - 1:len(seq) - 1] = torch.tensor(seq[f:])
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=IGNORE_INDEX,
                               reduction="none")
        out += loss.double().sum(1).tolist()
    return out


def held_out_stories(tokens: np.ndarray, eot: int, count: int, max_len: int, min_len: int = 8) -> list[list[int]]:
    """The first ``count`` stories of a split (``<|endoftext|>``-separated) with at least ``min_len`` tokens,
    each cut to ``max_len`` tokens."""
    cuts = np.flatnonzero(np.asarray(tokens) == eot)
    stories, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end - start >= min_len:
            stories.append(np.asarray(tokens[start:end], dtype=np.int64)[:max_len].tolist())
            if len(stories) == count:
                break
        start = end + 1
    return stories


def context_use(model: Gemma3, stories: list[list[int]], batch_size: int = 8) -> dict:
    """Mean loss (nats/token) of each story's second half given its first half (``with_context``) and given
    only ``<|endoftext|>`` (``without_context``); ``gap`` = without - with: how much the model uses what the
    story has said so far."""
    if not stories:
        raise UserError("no held-out stories for the context-use measure")
    eot = model.config.eot_token_id
    halves = [len(s) // 2 for s in stories]
    with_ctx = tail_losses(model, [[eot] + s for s in stories], [1 + h for h in halves], batch_size)
    without = tail_losses(model, [[eot] + s[h:] for s, h in zip(stories, halves, strict=True)],
                          [1] * len(stories), batch_size)
    n = sum(len(s) - h for s, h in zip(stories, halves, strict=True))
    a, b = sum(with_ctx) / n, sum(without) / n
    return {"with_context": a, "without_context": b, "gap": b - a, "stories": len(stories), "tokens": n}


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: EvalConfig, device: str = "cpu",
                        progress: bool = False, dtype: str = "fp32") -> dict:
    """``tinygemma eval``: loss, perplexity and bits per byte over ``cfg.split``, plus context use, with the
    weights in ``dtype`` (see :func:`tinygemma.quant.for_inference`)."""
    if cfg.data is None:
        raise UserError("--data is required (a folder made by `tinygemma prepare`)")
    folder = resolve_checkpoint(checkpoint)
    model = load_for_inference(folder, device, dtype)
    block_size = cfg.block_size
    run_config = read_run_config(folder)
    if block_size is None and run_config is not None:  # score as the run was trained
        block_size = run_config["train"]["block_size"]
    ds = TokenDataset(cfg.data, cfg.split, vocab_size=model.config.vocab_size)
    res = evaluate_tokens(model, ds.tokens, block_size, cfg.batch_size, progress=progress)
    if cfg.context_stories:
        mc = model.config
        stories = held_out_stories(ds.tokens, mc.eot_token_id, cfg.context_stories, mc.context_length - 1)
        res["context_use"] = context_use(model, stories, cfg.batch_size)
    return {"checkpoint": str(checkpoint), "data": cfg.data, "split": cfg.split, "dtype": dtype, **res}


def completion_loss(model: Gemma3, prompt: list[int], completion: list[int]) -> float:
    """Summed loss (nats) of ``completion`` given ``prompt`` (which must be non-empty)."""
    return tail_losses(model, [prompt + completion], [len(prompt)])[0]
