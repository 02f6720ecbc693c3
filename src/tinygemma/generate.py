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

import argparse
import codecs
import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from tinygemma.config import UserError, add_dataclass_args, dataclass_overrides, from_dict
from tinygemma.model import FULL, SLIDING, Gemma3, ModelConfig
from tinygemma.run import resolve_checkpoint
from tinygemma.tokenizer import Tokenizer

# The tutorial's five story openings: the samples report's prompts and the studio's examples.
TUTORIAL_PROMPTS = [
    "Once upon a time there was a pumpkin.",
    "A little girl went to the woods",
    "A boy told his sister a bedtime story about a flying cat",
    "The kids sat in a circle while Uncle narrated a story about a brave knight",
    "Dad was telling the kids an adventure tale about a pirate ship",
]


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample at most"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=50, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus: smallest set with this probability mass"})
    greedy: bool = field(default=False, metadata={"help": "always take the most likely token"})
    seed: int | None = field(default=None, metadata={"help": "random seed (reproducible samples)"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples <= 0:
            raise UserError(f"num_samples must be positive, got {self.num_samples}")


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
    rows = [ids for ids in _prepare_prompts(model, prompt_ids, cfg) for _ in range(cfg.num_samples)]
    B, P = len(rows), max(map(len, rows))
    total = P + cfg.max_new_tokens  # columns: left padding + prompt, then generated tokens
    pad = torch.tensor([P - len(r) for r in rows], device=device)
    ids = torch.tensor([[mc.eot_token_id] * (P - len(r)) + r for r in rows], device=device)
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)

    W = mc.sliding_window
    caches = _new_caches(model, B, total, dtype, device, reuse=compile)
    col = torch.arange(total, device=device)
    real = col[None, :] >= pad[:, None]  # (B, total): column holds a real token of that row

    # prefill: causal over real tokens (+ window); padding queries see only themselves (no all-masked rows)
    i, j = col[:P, None], col[None, :P]
    causal = (j <= i)[None] & real[:, None, :P]
    causal = causal | (i == j)[None]
    masks = {FULL: causal[:, None], SLIDING: (causal & (i - j < W)[None])[:, None]}
    for c in caches:
        c.slots = col[:P] % c.size if c.ring else col[:P]
        c.visible = P
    positions = (col[None, :P] - pad[:, None]).clamp(min=0)
    logits = model(ids, positions=positions, masks=masks, cache=caches, logits_to_keep=1)[:, -1]

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
        # ring slot s holds the latest column congruent to s (mod size) that is <= c_now
        ring_cols = c_now - (c_now - ring_slots) % ring_slots.numel()
        ring_mask = (ring_cols[None, :] >= pad[:, None]) & (ring_cols[None, :] >= 0)
        full_mask = real & (col[None, :] <= c_now)
        if not compile:
            full_mask = full_mask[:, :c_now + 1]
        masks = {FULL: full_mask[:, None, None], SLIDING: ring_mask[:, None, None]}
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


# -- CLI -----------------------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_checkpoint_arg(p: argparse.ArgumentParser, metavar: str = "CKPT") -> None:
    p.add_argument("checkpoint", metavar=metavar,
                   help="a checkpoint folder, or a run folder (then its best/; see resolve_checkpoint)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=default_device(), help="cpu, cuda, ... (default: cuda if available)")


def parse_device(name: str | torch.device) -> torch.device:
    """``--device`` of every command: a torch device that exists here, or a one-line UserError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: unknown device (try cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can hold at most: free GPU memory, or the machine's physical memory for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return None


def check_memory(need: int, device: torch.device, what: str, flag: str) -> None:
    """Refuse a job whose (lower-bound) estimate ``need`` cannot fit at all, before anything is allocated."""
    have = available_memory(device)
    if have is not None and need > have:
        raise UserError(f"{what} needs at least ~{need / 2**30:,.1f} GiB, but the {device.type} has "
                        f"{have / 2**30:,.1f} GiB; lower {flag}")


def generation_bytes(mc: ModelConfig, rows: int, total: int, dtype: torch.dtype) -> int:
    """What :func:`stream` allocates beyond the weights: every layer's key/value buffers (sliding layers hold
    at most a window) for ``rows`` rows of ``total`` columns, and a float32 row of logits per row."""
    size = torch.finfo(dtype).bits // 8
    cache = sum(min(mc.sliding_window, total) if t == SLIDING else total for t in mc.layer_types)
    return 2 * rows * mc.num_kv_heads * mc.head_dim * cache * size + 4 * rows * mc.vocab_size


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype names (generate, serve, export)


def inference_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (what inference there runs in), fp32 elsewhere (CPUs gain nothing from bf16
    matrix-vector products, see bench/generate.py); else ``bf16`` / ``fp32``."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights and activations: auto = bf16 on CUDA, fp32 elsewhere")


def sampling_config_from_args(args: argparse.Namespace) -> SamplingConfig:
    return from_dict(SamplingConfig, dataclass_overrides(args, SamplingConfig), "sampling")


def _generate(args: argparse.Namespace) -> int:
    from tinygemma.instruct import prompt_from_args  # instruct imports this module

    cfg = sampling_config_from_args(args)
    prompts = args.prompt if args.prompt else [""]
    if (instructions := prompt_from_args(args)) is not None:  # TinyStories-Instruct header; --prompt opens the story
        prompts = [instructions + p for p in prompts]
    device = parse_device(args.device)
    model = load_checkpoint(args.checkpoint, device=device, dtype=inference_dtype(args.dtype, device))
    tok = Tokenizer()
    prompt_ids = encode_prompts(tok, prompts)
    keep = prompt_room(model.config.context_length, cfg.max_new_tokens)
    if any(len(p) > keep for p in prompt_ids):
        print(f"tinygemma generate: warning: prompt longer than {keep} tokens "
              f"(context {model.config.context_length} - max_new_tokens); keeping its last {keep}", file=sys.stderr)
    rows = [(p, s) for p in range(len(prompts)) for s in range(cfg.num_samples)]
    columns = min(max(map(len, prompt_ids)) + 1 + cfg.max_new_tokens, model.config.context_length)
    need = generation_bytes(model.config, len(rows), columns, model.lm_head.weight.dtype)
    check_memory(need, device, f"generating {len(rows)} rows", "--num-samples or --max-new-tokens")
    live = not args.no_stream and not args.json and len(rows) == 1
    printer = _RowPrinter(tok, prompts, rows, live)
    if live:
        print(prompts[0], end="", flush=True)
    t0 = time.perf_counter()
    done = generate_rows(model, prompt_ids, cfg, compile=args.compile,
                         on_token=None if args.json else printer.on_token)
    elapsed = time.perf_counter() - t0
    n_tokens = sum(map(len, done.tokens)) + sum(done.ended)
    if args.json:
        print(json.dumps({"config": asdict(cfg), "tokens_per_s": n_tokens / elapsed, "samples": [
            {"prompt": prompts[p], "sample": s, "text": tok.decode(ids), "tokens": ids, "ended_with_eot": e}
            for (p, s), ids, e in zip(rows, done.tokens, done.ended, strict=True)]}, indent=2))
        return 0
    printer.finish(done)
    print(f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


class _RowPrinter:
    """The terminal side of ``tinygemma generate``: one row streams token by token; several rows are printed
    whole, in order, each as soon as it and all rows before it have ended."""

    def __init__(self, tok: Tokenizer, prompts: list[str], rows: list[tuple[int, int]], live: bool):
        self.tok, self.prompts, self.rows, self.live = tok, prompts, rows, live
        self.text = TextStream(tok)
        self.printed = 0

    def on_token(self, done: Completions, row: int, token: int) -> None:
        if self.live:
            if token != self.tok.eot_id:
                print(self.text.push(token), end="", flush=True)
        else:
            self._flush(done, final=False)

    def _flush(self, done: Completions, final: bool) -> None:
        while self.printed < len(self.rows) and (final or done.ended[self.printed]):
            p, s = self.rows[self.printed]
            if len(self.rows) > 1:
                print(f"--- prompt {p + 1}, sample {s + 1} ---")
            print(self.prompts[p] + self.tok.decode(done.tokens[self.printed]), flush=True)
            self.printed += 1

    def finish(self, done: Completions) -> None:
        if self.live:
            print(self.text.flush())
        else:
            self._flush(done, final=True)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write stories from a checkpoint (KV-cache sampling)",
                       description="Sample stories from a checkpoint. Every prompt is preceded by <|endoftext|>; "
                                   "prompts too long for the context lose their oldest tokens.")
    add_checkpoint_arg(p)
    p.add_argument("--prompt", action="append", help="story opening (repeatable; default: an empty prompt)")
    from tinygemma.instruct import add_instruction_args  # instruct imports this module

    add_instruction_args(p)
    add_dataclass_args(p, SamplingConfig)
    p.add_argument("--no-stream", action="store_true", help="print each story once finished")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_arg(p)
    add_dtype_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: CUDA graphs on a GPU; ~1.2x on a CPU after a 20-30 s compile")
    p.set_defaults(func=_generate)
