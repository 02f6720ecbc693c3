"""One decode step = one graph: a fixed set of rows ("slots") decoding together, gpt-fast style.

Everything a step reads lives on the device at a fixed address: every layer's keys/values for every slot
(full-attention layers one entry per position up to a bucketed ``max_len``, sliding layers a ring of
``sliding_window`` entries), and per slot the token to feed, its position, whether the slot is in use, its
sampling settings and its seed. A step feeds one token per slot; the write positions, the attention masks (each
row's own length, the window) and the RoPE angles are computed inside the step from the positions, the next
token is sampled inside it too, and the positions advance in place. So nothing in a step depends on a Python
value that changes between steps: compiled (``torch.compile(fullgraph=True)``, CUDA graphs on a GPU) it runs
as one graph for the whole life of the decoder, whatever the prompts' lengths, with no host sync.

A row joins with :meth:`Decoder.add` (its prompt prefilled eagerly into a free slot, all but its last token) and
leaves with :meth:`Decoder.remove`; rows never see each other, so a row's tokens do not depend on its batch mates.

Sampling is the "exponential race": with E_i ~ Exponential(1) independent, argmax_i p_i / E_i is distributed as
p, like ``torch.multinomial``, but it needs no generator and no host sync. E_i comes from a counter-based hash of
(seed, position, token id), so a row's draws depend only on its own seed and position. Temperature, then top-k,
then top-p, as in transformers; a greedy row (temperature 0) takes the argmax of the logits.
"""

from __future__ import annotations

import re
import secrets
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinygemma.config import UserError
from tinygemma.device import cache_positions
from tinygemma.model import FULL, SLIDING, Gemma3
from tinygemma.sampling import SamplingConfig
from tinygemma.train.hardware import use_compile

# Sampling rows whose top_k is 1..CANDIDATES draw from the top CANDIDATES logits (exact: top-k cuts there anyway,
# and top-p keeps a subset of top-k); a row with top_k 0 (all) makes the step sort the whole vocabulary instead,
# ~4 ms a row on a CPU core. A batch of greedy rows only takes an argmax.
CANDIDATES = 128
GREEDY = 0  # the step's variant when every row is greedy
CPU_MODES = ("default", "cpp_wrapper", "max-autotune-no-cudagraphs")  # inductor settings for a CPU step
M32 = 0xFFFFFFFF
# a kernel launch in inductor's generated Python wrapper: fused C++/Triton kernels, extern matmuls, ATen fallbacks
KERNEL_CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.[\w.]+"
                         r"|aten\.[\w.]+)\(", re.M)


def unwrap(model: torch.nn.Module) -> Gemma3:
    """The plain model inside a torch.compile and/or DDP wrapper (as training holds it)."""
    for _ in range(4):  # e.g. DDP(compile(model))
        inner = getattr(model, "_orig_mod", getattr(model, "module", None))
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Token ids given by a user (prompts as ids) must index the vocabulary."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise UserError(f"token ids must lie in [0, {vocab_size})")


def kernel_calls(code: str) -> list[str] | None:
    """The kernels one run of a compiled graph launches, in order, read from inductor's generated Python wrapper
    (what ``torch._inductor.utils.run_and_get_code`` returns for the call that compiled it); None for a C++
    wrapper (``cpu_mode="cpp_wrapper"``). The tests and the benches count a compiled step with this."""
    if "def call(" not in code:
        return None
    return KERNEL_CALL.findall(code[code.index("def call("):])


def row_seed(seed: int | None, sample: int) -> int | None:
    """The seed of the ``sample``-th row (0, 1, ...) of one prompt sampled with ``seed``: distinct per sample and
    independent of the other prompts in the batch (None: each row draws its own random seed)."""
    return None if seed is None else (seed + sample * 0x9E3779B97F4A7C15) % 2**64


# -- caches ----------------------------------------------------------------------------------------------------
class SlotCache:
    """One layer's keys/values for every slot, (rows, kv_heads, size, head_dim). A full-attention layer holds
    position p at index p; a sliding layer (``ring``) holds the last ``size`` positions, p at p % size. ``pos``
    is the decoder's (rows,) positions: :meth:`update` writes each row's new key/value there (the step's write)."""

    def __init__(self, rows: int, heads: int, size: int, head_dim: int, ring: bool, pos: torch.Tensor,
                 dtype: torch.dtype):
        self.k = torch.zeros(rows, heads, size, head_dim, dtype=dtype, device=pos.device)
        self.v = torch.zeros_like(self.k)
        self.size, self.ring, self.pos = size, ring, pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.pos % self.size if self.ring else self.pos
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, at] = k[:, :, 0]  # index_put_: written in place, also when compiled
        self.v[rows, :, at] = v[:, :, 0]
        return self.k, self.v

    def head(self, n: int, pos: torch.Tensor) -> SlotCache:
        """The first ``n`` rows as views (``pos`` their positions): writes through them land in this cache."""
        view = object.__new__(SlotCache)
        view.k, view.v, view.size, view.ring, view.pos = self.k[:n], self.v[:n], self.size, self.ring, pos
        return view


class PrefillCache:
    """Writes a prompt's keys/values into one slot of a :class:`SlotCache` (a ring keeps its last ``size``);
    the prompt attends over itself (the model's causal and window masks)."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, T = self.cache, k.shape[2]
        n = min(T, c.size)
        at = torch.arange(T - n, T, device=k.device) % c.size
        c.k[self.slot].index_copy_(1, at, k[0, :, T - n:])
        c.v[self.slot].index_copy_(1, at, v[0, :, T - n:])
        return k, v


@dataclass
class DecodeState:
    """What one step reads and updates, per slot (rows,): the token to feed and its position, whether the slot is
    in use, the sampling settings (temperature 0 = greedy; top_k 0 = all; top_p 1 = all) and the seed's halves."""

    tok: torch.Tensor
    pos: torch.Tensor
    active: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed_lo: torch.Tensor
    seed_hi: torch.Tensor
    caches: list[SlotCache]

    def tensors(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.active, self.temperature, self.top_k, self.top_p, self.seed_lo,
                self.seed_hi, *(t for c in self.caches for t in (c.k, c.v))]

    def head(self, n: int) -> DecodeState:
        """The first ``n`` rows as views: a step on them updates this state in place."""
        pos = self.pos[:n]
        return DecodeState(self.tok[:n], pos, self.active[:n], self.temperature[:n], self.top_k[:n],
                           self.top_p[:n], self.seed_lo[:n], self.seed_hi[:n], [c.head(n, pos) for c in self.caches])


# -- the step --------------------------------------------------------------------------------------------------
def step_masks(pos: torch.Tensor, full_size: int, ring_size: int) -> dict[str, torch.Tensor]:
    """Each row's keys for the query at ``pos`` (rows,): full layers positions <= pos; a ring slot s holds the
    latest position congruent to s that is <= pos, valid once written (>= 0); the ring is the window."""
    p = pos[:, None]
    full = torch.arange(full_size, device=pos.device)[None] <= p
    s = torch.arange(ring_size, device=pos.device)[None]
    ring = p - (p - s) % ring_size >= 0
    return {FULL: full[:, None, None], SLIDING: ring[:, None, None]}


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), a bijective 32-bit integer hash, in int64: its products stay below 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def exponential_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, pos: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
    """Exponential(1) noise (rows, n) for ``tokens`` (rows, n), a function of each row's seed, position and the
    token id only."""
    row = _mix(_mix(_mix(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ pos)
    bits = _mix(_mix(row[:, None] ^ tokens) ^ 0x85EBCA6B)
    u = ((bits >> 8).float() + 0.5) * 2.0 ** -24  # 24 bits, strictly inside (0, 1)
    return -torch.log(u)


def pick_tokens(logits: torch.Tensor, s: DecodeState, variant: int) -> torch.Tensor:
    """The next token of every row from its logits (rows, vocab): argmax for greedy rows, else an exponential race
    over the ``variant`` most likely tokens after temperature, top-k and top-p (``variant`` is CANDIDATES, or the
    vocabulary size when a row keeps more, or GREEDY when every row is greedy)."""
    greedy = logits.argmax(-1)
    if variant == GREEDY:
        return greedy
    sampling = s.temperature > 0
    z = logits.float() / torch.where(sampling, s.temperature, 1.0)[:, None]
    vals, ids = torch.topk(z, variant)  # sorted, most likely first
    k = torch.where((s.top_k > 0) & (s.top_k < variant), s.top_k, variant)
    vals = vals.masked_fill(vals < vals.gather(1, k[:, None] - 1), float("-inf"))
    p = torch.softmax(vals, dim=-1)
    # top-p: keep the most likely tokens until their mass reaches top_p (always at least one)
    drop = (torch.cumsum(p, dim=-1) - p >= s.top_p[:, None]) & (s.top_p < 1)[:, None]
    p = p.masked_fill(drop, 0.0)
    won = (p / exponential_noise(s.seed_lo, s.seed_hi, s.pos, ids)).argmax(-1, keepdim=True)
    return torch.where(sampling, ids.gather(1, won)[:, 0], greedy)


def decode_step(model: Gemma3, s: DecodeState, variant: int) -> torch.Tensor:
    """Feed every slot's token at its position, sample the next one; the state advances in place (positions of
    slots in use only). Returns the new tokens (rows,)."""
    full = next((c.size for c in s.caches if not c.ring), 1)
    ring = next((c.size for c in s.caches if c.ring), 1)
    logits = model(s.tok[:, None], positions=s.pos[:, None], masks=step_masks(s.pos, full, ring),
                   cache=s.caches)[:, -1]
    nxt = pick_tokens(logits, s, variant)
    s.tok.copy_(nxt)
    s.pos.add_(s.active.long())
    return nxt


# -- the decoder -----------------------------------------------------------------------------------------------
class Decoder:
    """``rows`` slots decoding together, one token per slot per :meth:`step`, one graph per step when compiled.

    Rows join (:meth:`add`) and leave (:meth:`remove`) between steps; each keeps its own position, sampling
    settings and seed. Caches are allocated once: full-attention layers sized to ``max_len`` rounded up to a
    power of two (>= 256, at most the context), sliding layers a ring of ``sliding_window`` entries.
    ``compile``: None follows training's rule (on for CUDA GPUs, off on a CPU); on a GPU the step runs as CUDA
    graphs, on a CPU ``cpu_mode`` picks inductor's settings (one of CPU_MODES). ``backend`` is torch.compile's
    (tests trace with "aot_eager").
    """

    def __init__(self, model: Gemma3, rows: int, max_len: int, *, compile: bool | None = None,
                 cpu_mode: str = "default", backend: str | Callable = "inductor") -> None:
        model = unwrap(model)
        mc = model.config
        if rows < 1 or max_len < 2:
            raise ValueError(f"a decoder needs rows >= 1 and max_len >= 2, got {rows} and {max_len}")
        if max_len > mc.context_length:
            raise UserError(f"max_len {max_len} exceeds the model's context ({mc.context_length})")
        if cpu_mode not in CPU_MODES:
            raise ValueError(f"cpu_mode must be one of {CPU_MODES}, got {cpu_mode!r}")
        weight = model.model.embed_tokens.weight  # Linear layers may be swapped (int8): the embedding stays
        self.model, self.rows, self.max_len = model, rows, cache_positions(max_len, mc.context_length)
        with torch.inference_mode():
            self.state = self._new_state(weight.device, weight.dtype)
        self._cfg: list[SamplingConfig | None] = [None] * rows  # per slot; None = free
        self._left = [0] * rows  # steps each row may still take (its max_new_tokens)
        self._variant = GREEDY
        self.compiled = use_compile(compile, weight.device)
        self._cuda_graphs = self.compiled and weight.device.type == "cuda"
        self._step = decode_step
        if self.compiled:
            if self._cuda_graphs:
                for t in self.state.tensors():
                    torch._dynamo.mark_static_address(t)  # updated in place between the graph's replays
                kwargs = {"mode": "reduce-overhead"}
            else:
                kwargs = {"options": {"cpp_wrapper": True}} if cpu_mode == "cpp_wrapper" else \
                    {"mode": None if cpu_mode == "default" else cpu_mode}
            # Dynamo keeps its compiled graphs per code object and falls back to eager past its recompile limit (8):
            # each decoder compiles its own copy of the step, so that decoders of other shapes cannot use it up
            step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, "decode_step")
            self._step = torch.compile(step, fullgraph=True, dynamic=False, backend=backend, **kwargs)

    def _new_state(self, device: torch.device, dtype: torch.dtype) -> DecodeState:
        mc, R = self.model.config, self.rows
        pos = torch.zeros(R, dtype=torch.long, device=device)
        ring = min(mc.sliding_window, self.max_len)
        caches = [SlotCache(R, mc.num_kv_heads, ring if t == SLIDING else self.max_len, mc.head_dim,
                            ring=t == SLIDING, pos=pos, dtype=dtype) for t in mc.layer_types]
        longs = [torch.zeros(R, dtype=torch.long, device=device) for _ in range(4)]
        return DecodeState(tok=longs[0], pos=pos, active=torch.zeros(R, dtype=torch.bool, device=device),
                           temperature=torch.zeros(R, device=device), top_k=longs[1],
                           top_p=torch.ones(R, device=device), seed_lo=longs[2], seed_hi=longs[3], caches=caches)

    @property
    def active(self) -> list[int]:
        """The slots in use."""
        return [i for i, c in enumerate(self._cfg) if c is not None]

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], cfg: SamplingConfig, seed: int | None = None) -> int:
        """Prefill ``prompt_ids`` (empty: ``<|endoftext|>``, a new story) into a free slot and return the slot.
        The row's first new token comes from the next :meth:`step`, which feeds the prompt's last token. ``seed``
        (0 <= seed < 2**64) defaults to ``cfg.seed``; if both are None, add draws a random one. The row may take
        ``cfg.max_new_tokens`` steps; prompt + max_new_tokens must fit in ``max_len``. After a failed step,
        removing every row leaves the decoder usable."""
        mc = self.model.config
        ids = list(prompt_ids) or [mc.eot_token_id]
        check_token_ids(ids, mc.vocab_size)
        if len(ids) + cfg.max_new_tokens > self.max_len:
            raise UserError(f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceed the "
                            f"decoder's {self.max_len} positions")
        free = [i for i, c in enumerate(self._cfg) if c is None]
        if not free:
            raise UserError(f"all {self.rows} rows of the decoder are in use")
        slot = free[0]
        seed = (secrets.randbits(64) if cfg.seed is None else cfg.seed) if seed is None else seed
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
        if len(ids) > 1:
            self.model(torch.tensor([ids[:-1]], device=self.state.pos.device), logits_to_keep=1,
                       cache=[PrefillCache(c, slot) for c in self.state.caches])
        s, greedy = self.state, cfg.greedy or cfg.temperature == 0
        for t, value in ((s.tok, ids[-1]), (s.pos, len(ids) - 1), (s.active, True),
                         (s.temperature, 0.0 if greedy else cfg.temperature), (s.top_k, cfg.top_k),
                         (s.top_p, cfg.top_p), (s.seed_lo, seed & M32), (s.seed_hi, seed >> 32)):
            t[slot] = value
        self._cfg[slot], self._left[slot] = cfg, cfg.max_new_tokens
        self._variant = self._pick_variant()
        return slot

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Free ``slot`` at once; the next :meth:`add` may reuse it."""
        if not 0 <= slot < self.rows or self._cfg[slot] is None:
            raise ValueError(f"slot {slot} is not in use (in use: {self.active})")
        self.state.active[slot] = False
        self._cfg[slot] = None
        self._variant = self._pick_variant()

    def _pick_variant(self) -> int:
        sampling = [c for c in self._cfg if c is not None and not (c.greedy or c.temperature == 0)]
        if not sampling:
            return GREEDY
        vocab = self.model.config.vocab_size
        if all(0 < c.top_k <= CANDIDATES for c in sampling) and CANDIDATES < vocab:
            return CANDIDATES
        return vocab

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Each slot's next token, (rows,) long on the model's device (free slots: any value). No host sync.
        The tensor may be the step's own output buffer: read or copy it before the next step."""
        active = self.active
        if spent := [slot for slot in active if self._left[slot] == 0]:
            raise ValueError(f"slot {spent[0]} has taken its max_new_tokens steps: remove it first")
        for slot in active:
            self._left[slot] -= 1
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.compiled:  # one shape for the graph: every slot, in use or not
            return self._step(self.model, self.state, self._variant)
        # eager: only the slots up to the last one in use (add fills the lowest free slot), so that one request
        # on a decoder of 16 rows costs a batch of 1, not 16; the state's token row holds the new tokens
        self._step(self.model, self.state.head(max(active, default=self.rows - 1) + 1), self._variant)
        return self.state.tok
