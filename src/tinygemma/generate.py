"""Story generation: ``tinygemma generate`` and the Python API behind it.

Decoding runs on a :class:`tinygemma.decode.Decoder`: each prompt (times ``num_samples``) takes a slot, its
prompt is prefilled in one forward pass, then every step feeds one token per row through one graph
(compiled with ``compile=True``) that also samples the next token on the device. Rows keep their own
positions, so prompts of unequal length need no padding and a row's tokens are exactly those it would get
alone. The new tokens are copied to the host every ``COPY_EVERY`` steps, not every step.

Every prompt is preceded by ``<|endoftext|>`` (how each story starts in the training data), so an empty
prompt is allowed and starts a fresh story. A prompt that does not fit in the context together with
``max_new_tokens`` loses its oldest tokens (left truncation).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from tinygemma.config import UserError
from tinygemma.decode import Decoder, check_token_ids, row_seed, unwrap
from tinygemma.device import cache_positions
from tinygemma.model import Gemma3
from tinygemma.rundir import resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Gemma3:
    """A checkpoint folder, or a run folder (see :func:`resolve_checkpoint`), in eval mode."""
    return Gemma3.from_pretrained(resolve_checkpoint(path), device=device, dtype=dtype).eval()


# -- sampling ------------------------------------------------------------------------------------
def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities (B, V) after temperature, then top-k, then top-p (the order transformers uses)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        # keep the most likely tokens until their mass reaches top_p (always at least one)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# -- decoding ------------------------------------------------------------------------------------
COPY_EVERY = 8  # decode steps between copies of the new tokens to the host


def prompt_room(context_length: int, max_new_tokens: int) -> int:
    """How many prompt tokens fit in the context beside ``max_new_tokens`` new ones (the one place of this check)."""
    if max_new_tokens >= context_length:
        raise UserError(f"max_new_tokens ({max_new_tokens}) must be below the context length ({context_length})")
    return context_length - max_new_tokens


def _prepare_prompts(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
    mc = model.config
    keep = prompt_room(mc.context_length, cfg.max_new_tokens)
    if not prompt_ids:
        raise UserError("no prompts")
    rows = []
    for ids in prompt_ids:
        ids = list(ids) or [mc.eot_token_id]  # an empty prompt starts a new story
        check_token_ids(ids, mc.vocab_size)
        rows.append(ids[-keep:])  # left truncation so that prompt + output fit in the context
    return rows


def _decoder(model: Gemma3, rows: int, max_len: int, compile: bool) -> Decoder:
    """A decoder for this call. A compiled one is kept on the model (one shape at a time) and reused by the next
    call of the same shape: CUDA graphs replay over fixed addresses, so new buffers would mean re-recording."""
    kept = getattr(model, "_tinygemma_decoder", None)
    if kept is not None and not kept.active and (kept.rows, kept.max_len, kept.compiled) == \
            (rows, cache_positions(max_len, model.config.context_length), compile):
        return kept
    decoder = Decoder(model, rows, max_len, compile=compile)
    if compile:
        model._tinygemma_decoder = decoder  # a cycle model <-> decoder, freed with the model
    return decoder


def _host_chunks(decoder: Decoder, steps: int) -> Iterator[list[list[int]]]:
    """The new tokens of every slot, ``COPY_EVERY`` steps at a time, as host lists [step][slot]. Tokens are
    gathered on the device and copied without blocking; on a GPU the host reads a chunk while the next one
    decodes (a CPU runs the steps in the call, so there each chunk is read at once)."""
    device = decoder.state.pos.device
    lag = int(device.type == "cuda")
    pending = []
    for start in range(0, steps, COPY_EVERY):
        n = min(COPY_EVERY, steps - start)
        chunk = torch.empty(n, decoder.rows, dtype=torch.long, device=device)
        for j in range(n):
            chunk[j] = decoder.step()  # before the next step, which may reuse the step's output buffer
        event = torch.cuda.Event() if lag else None
        pending.append((chunk.to("cpu", non_blocking=True), event))
        if event is not None:
            event.record()
        if len(pending) > lag:
            yield _read(*pending.pop(0))
    while pending:
        yield _read(*pending.pop(0))


def _read(copy: torch.Tensor, event: torch.cuda.Event | None) -> list[list[int]]:
    if event is not None:
        event.synchronize()
    return copy.tolist()


@torch.inference_mode()
def stream(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig | None = None, *,
           compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every row (None once a row has finished).

    Rows are the prompts, each repeated ``cfg.num_samples`` times (prompt-major order). A row
    finishes after ``<|endoftext|>`` (yielded once, then None) or after ``max_new_tokens`` tokens.
    Row j of a prompt samples with seed ``row_seed(cfg.seed, j)``, so its tokens do not depend on the other
    prompts. ``compile=True`` runs each step as one compiled graph (CUDA graphs on a GPU); see :mod:`decode`.
    """
    cfg = cfg or SamplingConfig()
    model = unwrap(model)
    prompts = _prepare_prompts(model, prompt_ids, cfg)
    rows = [(ids, j) for ids in prompts for j in range(cfg.num_samples)]
    decoder = _decoder(model, len(rows), max(map(len, prompts)) + cfg.max_new_tokens, compile)
    eot, finished = model.config.eot_token_id, [False] * len(rows)
    try:
        slots = [decoder.add(ids, cfg, row_seed(cfg.seed, j)) for ids, j in rows]
        for chunk in _host_chunks(decoder, cfg.max_new_tokens):
            for step in chunk:
                out = [None if f else step[s] for s, f in zip(slots, finished, strict=True)]
                finished = [f or t == eot for f, t in zip(finished, out, strict=True)]
                yield out
                if all(finished):
                    return
    finally:
        for slot in decoder.active:
            decoder.remove(slot)


class Completions(NamedTuple):
    """New tokens per row (prompt-major, ``num_samples`` per prompt) without the final ``<|endoftext|>``,
    and whether each row ended with it (else it hit ``max_new_tokens``)."""

    tokens: list[list[int]]
    ended: list[bool]


def generate_rows(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig | None = None, *,
                  compile: bool = False, on_token: Callable[[Completions, int, int], None] | None = None,
                  ) -> Completions:
    """Decode every row to the end; ``on_token(completions, row, token)`` sees each new token as it comes
    (``<|endoftext|>`` included), after it was added, so that a caller can stream."""
    cfg = cfg or SamplingConfig()
    n = len(prompt_ids) * cfg.num_samples
    rows = Completions([[] for _ in range(n)], [False] * n)
    eot = unwrap(model).config.eot_token_id
    for step in stream(model, prompt_ids, cfg, compile=compile):
        for r, tok in enumerate(step):
            if tok is None:
                continue
            if tok == eot:
                rows.ended[r] = True
            else:
                rows.tokens[r].append(tok)
            if on_token is not None:
                on_token(rows, r, tok)
    return rows


def generate_ids(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig | None = None, *,
                 compile: bool = False) -> list[list[int]]:
    """New tokens per row (prompt-major, ``num_samples`` per prompt), stopping before ``<|endoftext|>``."""
    return generate_rows(model, prompt_ids, cfg, compile=compile).tokens


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt preceded by ``<|endoftext|>``, as stories are in the training data."""
    return [[tokenizer.eot_id] + tokenizer.encode(p) for p in prompts]


def generate_text(model: Gemma3, tokenizer: Tokenizer, prompts: list[str], cfg: SamplingConfig | None = None,
                  ) -> list[str]:
    """The completions (without the prompt), ``num_samples`` per prompt in prompt-major order."""
    return [tokenizer.decode(ids) for ids in generate_ids(model, encode_prompts(tokenizer, prompts), cfg)]


class TextStream:
    """Text pieces of one row as its tokens arrive; holds back bytes of a character split across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def stream_text(model: Gemma3, tokenizer: Tokenizer, prompt: str, cfg: SamplingConfig | None = None
                ) -> Iterator[str]:
    """The completion of one prompt as text pieces, as its tokens arrive (for printing live)."""
    cfg = cfg or SamplingConfig()
    if cfg.num_samples != 1:
        raise UserError(f"stream_text tells one story at a time (num_samples=1), got {cfg.num_samples}")
    text = TextStream(tokenizer)
    for (tok,) in stream(model, encode_prompts(tokenizer, [prompt]), cfg):
        if tok is not None and tok != tokenizer.eot_id:
            yield text.push(tok)
    yield text.flush()


@torch.inference_mode()
def top_next_tokens(model: Gemma3, tokenizer: Tokenizer, prompt: str, k: int = 10, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` and their probabilities under the given sampling
    settings (by default the model's own distribution), most likely first."""
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    ids = torch.tensor(encode_prompts(tokenizer, [prompt]), device=model.lm_head.weight.device)
    logits = model(ids[:, -model.config.context_length:], logits_to_keep=1)[:, -1]
    probs = next_token_probs(logits, temperature, top_k, top_p)[0]
    values, tokens = torch.topk(probs, k)
    return [(tokenizer.decode([t]), p) for t, p in zip(tokens.tolist(), values.tolist(), strict=True)]
