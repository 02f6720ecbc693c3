"""Story generation with a KV cache: ``tinygemma generate`` and the Python API behind it.

The prompt is prefilled in one forward pass, then every step feeds one token per row. Each layer
keeps its keys/values in a preallocated buffer: full-attention layers hold every position, sliding
layers only the last ``sliding_window`` positions in a ring buffer, so their memory stays bounded.

Several prompts decode together. Prompts of unequal length are left-padded; boolean masks hide the
padding and each row gets its own RoPE positions, so a row's tokens are exactly those it would get
alone. Every prompt is preceded by ``<|endoftext|>`` (how each story starts in the training data),
so an empty prompt is allowed and starts a fresh story. A prompt that does not fit in the context
together with ``max_new_tokens`` loses its oldest tokens (left truncation).
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from tinygemma.config import UserError
from tinygemma.model import FULL, SLIDING, Gemma3
from tinygemma.rundir import resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Gemma3:
    """A checkpoint folder, or a run folder (see :func:`resolve_checkpoint`), in eval mode."""
    return Gemma3.from_pretrained(resolve_checkpoint(path), device=device, dtype=dtype).eval()


def unwrap(model: torch.nn.Module) -> Gemma3:
    """The plain model inside a torch.compile and/or DDP wrapper (as training holds it)."""
    for _ in range(4):  # e.g. DDP(compile(model))
        inner = getattr(model, "_orig_mod", getattr(model, "module", None))
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


# -- KV cache ------------------------------------------------------------------------------------
class KVCache:
    """One layer's keys/values, preallocated: ``size`` slots per row, written at ``self.slots``.

    A full-attention layer has one slot per position (``ring=False``). A sliding layer has
    ``window`` slots reused in turn (``ring=True``): position c lives in slot c % window.
    """

    def __init__(self, batch: int, heads: int, size: int, head_dim: int, ring: bool, step_slot: torch.Tensor,
                 dtype: torch.dtype):
        self.k = torch.zeros(batch, heads, size, head_dim, dtype=dtype, device=step_slot.device)
        self.v = torch.zeros_like(self.k)
        self.size, self.ring = size, ring
        self.step_slot = step_slot  # (1,) long, shared by the layers of a kind; decode steps write it in place
        self.slots = self.step_slot  # where update() writes; the prefill points it at the prompt's slots
        self.visible: int | None = None  # slots to attend over (None = all); a ring sets it only to prefill

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ring and self.visible is not None:
            # prefill into an empty ring: attend over the prompt itself, keep only its last `size` positions
            n = min(k.shape[2], self.size)
            self.k.index_copy_(2, self.slots[-n:], k[:, :, -n:])
            self.v.index_copy_(2, self.slots[-n:], v[:, :, -n:])
            return k, v
        self.k.index_copy_(2, self.slots, k)
        self.v.index_copy_(2, self.slots, v)
        if self.visible is None:
            return self.k, self.v
        return self.k[:, :, :self.visible], self.v[:, :, :self.visible]


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


def _pick(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.greedy or cfg.temperature == 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# -- decoding ------------------------------------------------------------------------------------
def prompt_room(context_length: int, max_new_tokens: int) -> int:
    """How many prompt tokens fit in the context beside ``max_new_tokens`` new ones (the one place of this check)."""
    if max_new_tokens >= context_length:
        raise UserError(f"max_new_tokens ({max_new_tokens}) must be below the context length ({context_length})")
    return context_length - max_new_tokens


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Token ids given by a user (prompts as ids) must index the vocabulary."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise UserError(f"token ids must lie in [0, {vocab_size})")


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


# the buffers of compiled decoding, per model (weakly held)
_KEPT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _new_caches(model: Gemma3, batch: int, total: int, dtype: torch.dtype, device: torch.device,
                reuse: bool) -> list[KVCache]:
    """One cache per layer. With ``reuse`` (compiled decoding) the buffers of the previous call of the same
    shape are kept on the model: CUDA graphs replay over fixed addresses, so new buffers would mean
    re-recording. Stale contents need no clearing: the masks only admit slots written in this call."""
    mc = model.config
    key = (batch, total, dtype, str(device))
    kept = _KEPT_CACHES.get(model)
    if reuse and kept is not None and kept[0] == key:
        return kept[1]
    step_slots = {t: torch.zeros(1, dtype=torch.long, device=device) for t in (SLIDING, FULL)}
    caches = [KVCache(batch, mc.num_kv_heads, min(mc.sliding_window, total) if t == SLIDING else total,
                      mc.head_dim, ring=t == SLIDING, step_slot=step_slots[t], dtype=dtype) for t in mc.layer_types]
    if reuse:
        for buf in (*step_slots.values(), *(b for c in caches for b in (c.k, c.v))):
            torch._dynamo.mark_static_address(buf)  # updated in place, read by the CUDA graph
        _KEPT_CACHES[model] = (key, caches)  # one shape at a time, so memory stays bounded
    return caches


def _left_padded(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (each prompt ``cfg.num_samples`` times, prompt-major), left-padded with <|endoftext|> to the
    longest: ids (B, P) and each row's padding (B,)."""
    rows = [ids for ids in _prepare_prompts(model, prompt_ids, cfg) for _ in range(cfg.num_samples)]
    P = max(map(len, rows))
    pad = torch.tensor([P - len(r) for r in rows], device=device)
    ids = torch.tensor([[model.config.eot_token_id] * (P - len(r)) + r for r in rows], device=device)
    return ids, pad


def _prefill(model: Gemma3, ids: torch.Tensor, pad: torch.Tensor, real: torch.Tensor,
             caches: list[KVCache]) -> torch.Tensor:
    """Run the left-padded prompts ``ids`` (B, P) into the caches; the last column's logits (B, vocab).
    Causal over real tokens (+ the window on sliding layers); padding queries see only themselves, so that no
    row of the mask is all False."""
    P = ids.shape[1]
    col = torch.arange(P, device=ids.device)
    i, j = col[:, None], col[None, :]
    causal = (j <= i)[None] & real[:, None, :P]
    causal = causal | (i == j)[None]
    masks = {FULL: causal[:, None], SLIDING: (causal & (i - j < model.config.sliding_window)[None])[:, None]}
    for c in caches:
        c.slots = col % c.size if c.ring else col
        c.visible = P
    positions = (col[None, :] - pad[:, None]).clamp(min=0)
    return model(ids, positions=positions, masks=masks, cache=caches, logits_to_keep=1)[:, -1]


def _step_masks(c_now: int, pad: torch.Tensor, real: torch.Tensor, ring_slots: torch.Tensor,
                whole_buffer: bool) -> dict[str, torch.Tensor]:
    """The masks of the query at column ``c_now``: the full layers' over columns <= c_now (the whole buffer when
    compiled, so that shapes never change), the sliding layers' over the ring's slots."""
    # ring slot s holds the latest column congruent to s (mod size) that is <= c_now
    ring_cols = c_now - (c_now - ring_slots) % ring_slots.numel()
    ring_mask = (ring_cols[None, :] >= pad[:, None]) & (ring_cols[None, :] >= 0)
    col = torch.arange(real.shape[1], device=real.device)
    full_mask = real & (col[None, :] <= c_now)
    if not whole_buffer:
        full_mask = full_mask[:, :c_now + 1]
    return {FULL: full_mask[:, None, None], SLIDING: ring_mask[:, None, None]}


@torch.inference_mode()
def stream(model: Gemma3, prompt_ids: list[list[int]], cfg: SamplingConfig | None = None, *,
           compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every row (None once a row has finished).

    Rows are the prompts, each repeated ``cfg.num_samples`` times (prompt-major order). A row
    finishes after ``<|endoftext|>`` (yielded once, then None) or after ``max_new_tokens`` tokens.
    ``compile=True`` compiles the one-token decode step (static shapes; CUDA graphs on a GPU).
    """
    cfg = cfg or SamplingConfig()
    model = unwrap(model)
    mc = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    ids, pad = _left_padded(model, prompt_ids, cfg, device)
    (B, P), total = ids.shape, ids.shape[1] + cfg.max_new_tokens  # columns: padding + prompt, then new tokens
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)

    W = mc.sliding_window
    caches = _new_caches(model, B, total, dtype, device, reuse=compile)
    col = torch.arange(total, device=device)
    real = col[None, :] >= pad[:, None]  # (B, total): column holds a real token of that row
    logits = _prefill(model, ids, pad, real, caches)

    step = model
    for c in caches:
        c.slots = c.step_slot
        if c.ring or compile:
            c.visible = None  # compiled: attend over the whole buffer, masked, so that shapes never change
    if compile:
        # Static shapes, and CUDA graphs on a GPU; on a CPU, inductor fuses the ~30 small ops per layer
        # (~1.2x at batch 1 after a compile of 20-30 s). Dynamo's cache serves later calls of the same shapes.
        step = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    ring_slots = torch.arange(min(W, total), device=device)
    step_slots = {c.ring: c.step_slot for c in caches}  # one per layer kind, shared by its layers
    eot = mc.eot_token_id
    for t in range(cfg.max_new_tokens):
        tok = torch.where(done, eot, _pick(logits, cfg, gen))
        out, finished = torch.stack((tok, done.long())).tolist()  # one device->host copy per step
        yield [None if f else x for x, f in zip(out, finished, strict=True)]
        done |= tok == eot
        if t == cfg.max_new_tokens - 1 or all(f or x == eot for x, f in zip(out, finished, strict=True)):
            return
        c_now = P + t  # column of the token being fed
        for ring, slot in step_slots.items():
            slot.fill_(c_now % ring_slots.numel() if ring else c_now)
        if not compile:
            for c in caches:
                if not c.ring:
                    c.visible = c_now + 1
        masks = _step_masks(c_now, pad, real, ring_slots, whole_buffer=compile)
        positions = (c_now - pad)[:, None]
        if compile and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(tok[:, None], positions=positions, masks=masks, cache=caches)[:, -1]


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
