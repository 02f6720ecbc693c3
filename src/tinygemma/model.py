"""Gemma 3 text model (the gemma-3-270m architecture) in plain PyTorch.

Semantics and parameter names are those of transformers' ``Gemma3ForCausalLM``
(``model_type`` ``gemma3_text``), so a folder written by :meth:`Gemma3.save_pretrained`
loads in transformers with no conversion and gives the same logits. This module is pure:
compile, DDP and mixed precision are applied by the training code.

Initialisation follows transformers' Gemma 3: every Linear and the embedding ~ N(0, 0.02),
RMSNorm weights zero (the norm multiplies by ``1 + w``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinygemma.config import UserError, from_dict, load_json
from tinygemma.files import atomic_write, atomic_write_text, follow_umask
from tinygemma.fused import IGNORE_INDEX, LinearCrossEntropy, RMSNormFunction, rms_norm

SLIDING, FULL = "sliding_attention", "full_attention"
# fp16 tops out at 65,504, and Gemma 3's attention and MLP outputs can exceed it before their post-norms. Under
# fp16 autocast they are computed 2^8 smaller (a power of two: exact), clamped to the fp16 range as a last resort
# (transformers' T5 guard) and scaled back in float32 as the post-norm reads them, so eps sees the true scale.
FP16_SHRINK = 2.0 ** -8
FP16_LIMIT = torch.finfo(torch.float16).max - 1000


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 32768
    hidden_size: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)  # empty: full attention on every 6th layer
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    query_pre_attn_scalar: int = 256
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    eot_token_id: int = 50256

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "intermediate_size", "sliding_window", "query_pre_attn_scalar"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.hidden_size % self.num_heads:  # transformers' Gemma3TextConfig refuses this too
            raise UserError(f"hidden_size ({self.hidden_size}) is not a multiple of num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.layer_types:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers)]
        if len(self.layer_types) != self.num_layers:
            raise UserError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if bad := set(self.layer_types) - {SLIDING, FULL}:
            raise UserError(f"unknown layer type {sorted(bad)[0]!r} (use {SLIDING!r} or {FULL!r})")
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise UserError(f"eot_token_id {self.eot_token_id} is outside the vocabulary")

    # -- sizes, used by `tinygemma info` and for MFU -------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim  # q,k,v,o + q_norm, k_norm
        mlp = 3 * h * self.intermediate_size
        block = attn + mlp + 4 * h  # four RMSNorms
        out = {"embedding": self.vocab_size * h, "per_block": block, "blocks": block * self.num_layers,
               "final_norm": h, "lm_head": 0 if self.tie_embeddings else self.vocab_size * h}
        out["total"] = out["embedding"] + out["blocks"] + out["final_norm"] + out["lm_head"]
        return out

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x matmul parameters (head included) + attention scores/values,
        12 * heads * head_dim * keys seen per layer (nanoGPT/PaLM accounting, window-aware)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        n_matmul = self.num_layers * (2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size)
        n_matmul += self.vocab_size * h
        keys = sum(min(seq_len, self.sliding_window) if t == SLIDING else seq_len for t in self.layer_types)
        return 6 * n_matmul + 12 * q * keys

    # -- transformers' config.json -------------------------------------------------------------
    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": self.vocab_size, "max_position_embeddings": self.context_length,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base},
                                FULL: {"rope_type": "default", "rope_theta": self.rope_global_base}},
            "query_pre_attn_scalar": self.query_pre_attn_scalar, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings, "initializer_range": self.init_std,
            "bos_token_id": self.eot_token_id, "eos_token_id": self.eot_token_id, "pad_token_id": self.eot_token_id,
            "attention_bias": False, "attention_dropout": 0.0, "final_logit_softcapping": None,
            "attn_logit_softcapping": None, "use_bidirectional_attention": False, "use_cache": True,
            "dtype": str(dtype).removeprefix("torch."),
        }

    @classmethod
    def from_folder(cls, directory: Path) -> ModelConfig:
        """The config.json of a model folder."""
        if not (directory / "config.json").is_file():
            raise UserError(f"{directory}: not a model folder (no config.json)")
        return cls.from_hf(load_json(directory / "config.json"), str(directory / "config.json"))

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict) or d.get("model_type") != "gemma3_text":
            got = d.get("model_type") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where}: model_type {got!r} is not a Gemma 3 text model ('gemma3_text')")
        allowed = {"final_logit_softcapping": (None,), "attn_logit_softcapping": (None,),
                   "attention_bias": (False, None), "use_bidirectional_attention": (False, None),
                   "hidden_activation": ("gelu_pytorch_tanh",)}
        for key, ok in allowed.items():
            if key in d and d[key] not in ok:
                raise UserError(f"{where}: {key}={d[key]!r} is not supported by tinygemma")
        rope = d.get("rope_parameters") or {}
        for kind in rope.values():
            if kind.get("rope_type", "default") != "default":
                raise UserError(f"{where}: rope_type {kind['rope_type']!r} is not supported by tinygemma")
        eos = d.get("eos_token_id", 50256)
        mapped = {
            "vocab_size": d.get("vocab_size"), "context_length": d.get("max_position_embeddings"),
            "hidden_size": d.get("hidden_size"), "num_layers": d.get("num_hidden_layers"),
            "num_heads": d.get("num_attention_heads"), "num_kv_heads": d.get("num_key_value_heads"),
            "head_dim": d.get("head_dim"), "intermediate_size": d.get("intermediate_size"),
            "sliding_window": d.get("sliding_window"), "layer_types": d.get("layer_types"),
            "rope_local_base": rope.get(SLIDING, {}).get("rope_theta", d.get("rope_local_base_freq", 10_000.0)),
            "rope_global_base": rope.get(FULL, {}).get("rope_theta", d.get("rope_theta", 1_000_000.0)),
            "query_pre_attn_scalar": d.get("query_pre_attn_scalar"), "rms_norm_eps": d.get("rms_norm_eps"),
            "tie_embeddings": d.get("tie_word_embeddings", True), "init_std": d.get("initializer_range"),
            "eot_token_id": eos[0] if isinstance(eos, list) else eos,
        }
        return from_dict(cls, {k: v for k, v in mapped.items() if v is not None}, where)


PRESETS: dict[str, dict] = {
    "gemma3-270m": {},
    # CPU presets keep every feature: MQA, a window shorter than test sequences, a full layer.
    "tiny": dict(context_length=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16,
                 intermediate_size=128, sliding_window=16, query_pre_attn_scalar=16,
                 layer_types=[SLIDING, SLIDING, FULL]),
    "small": dict(context_length=1024, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=1, head_dim=64,
                  intermediate_size=768, sliding_window=64, query_pre_attn_scalar=64),
    # CPU-shaped: the GPT-2 head (50,257 x hidden) is most of a small model's compute, so a narrow stream
    # buys the most tokens per second; bench/cpu_speedrun.py picked it for `make demo`.
    "mini": dict(context_length=1024, hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=1, head_dim=32,
                 intermediate_size=512, sliding_window=64, query_pre_attn_scalar=32),
}


def param_table(cfg: ModelConfig) -> str:
    """The parameter counts of a model, one row per part (what `tinygemma info` prints)."""
    sizes = cfg.param_breakdown()
    rows = [("embedding", sizes["embedding"]), (f"per block (x{cfg.num_layers})", sizes["per_block"]),
            ("blocks", sizes["blocks"]), ("final norm", sizes["final_norm"])]
    if sizes["lm_head"]:
        rows.append(("lm head (untied)", sizes["lm_head"]))
    rows.append(("total", sizes["total"]))
    return "\n".join(f"  {name:<22}{n:>15,}" for name, n in rows)


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset name, a tinygemma ModelConfig JSON, or a transformers config.json / model folder."""
    if name_or_path in PRESETS:
        return ModelConfig(**PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a config file")
    data = load_json(path)
    if isinstance(data, dict) and "model_type" in data:
        return ModelConfig.from_hf(data, str(path))
    return from_dict(ModelConfig, data, str(path))


# -- modules ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # statistics in float32 even under bf16
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)[0]  # the same ops, without autograd's bookkeeping


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin of shape (B|1, 1, T, head_dim) for absolute ``positions`` (B|1, T), in float32 then cast.

    The first half of sin comes negated, so that :func:`apply_rope` needs no negation (exactly equal)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (base ** exponent)
    freqs = (positions.float()[..., None] * inv_freq)[:, None]
    cos, sin = freqs.cos(), freqs.sin()  # each half of the head uses the same frequencies
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate-half: x * cos + cat(-x2, x1) * sin, with the sign folded into sin
    return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, shrink=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        y = attend(q, k, v, mask, self.scale, expand_kv=q.is_cuda).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if shrink is None else y * shrink)


@torch.compiler.assume_constant_result  # a property of the GPU: a constant for torch.compile, not a graph break
def flash_capable(device_index: int | None) -> bool:
    """Whether torch's flash-attention kernel runs on this CUDA GPU (compute capability 8.0 or newer)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def sdpa_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            expand_kv: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The K, V and ``enable_gqa`` that :func:`attend` hands to SDPA (also what the kernel probe asks about).
    On CUDA (``expand_kv``) only flash takes ``enable_gqa`` besides math, so K/V are expanded to the query heads
    wherever flash cannot run: with a mask, in fp32, and on GPUs older than sm80 (T4, V100)."""
    groups = q.shape[1] // k.shape[1]
    flash = mask is None and q.dtype in (torch.float16, torch.bfloat16)
    if groups > 1 and expand_kv and not (flash and flash_capable(q.device.index)):
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False
    return k, v, groups > 1


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           expand_kv: bool = False) -> torch.Tensor:
    """SDPA of ``q`` (B, H, T, D) over ``k``/``v`` (B, KV, S, D) with KV dividing H. enable_gqa shares each K/V
    head across its query group without a copy. On CUDA (``expand_kv``) torch 2.13 takes enable_gqa only in the
    flash and math kernels, so where flash cannot run (a mask, fp32, pre-sm80 GPUs) K/V are expanded to the query
    heads instead, and the memory-efficient or cuDNN kernels run rather than math (O(T^2) float32 scores)."""
    k, v, gqa = sdpa_kv(q, k, v, mask, expand_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, shrink=None):
        if shrink is None:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        h = F.gelu(self.gate_proj(x), approximate="tanh") * (self.up_proj(x) * shrink)  # smaller before the product
        return self.down_proj(h.clamp(-FP16_LIMIT, FP16_LIMIT))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, shrink=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, shrink)
        x = x + post_norm(self.post_attention_layernorm, attn, shrink)
        return x + post_norm(self.post_feedforward_layernorm, self.mlp(self.pre_feedforward_layernorm(x), shrink),
                             shrink)


def fp16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


def post_norm(norm: RMSNorm, y: torch.Tensor, shrink: float | None) -> torch.Tensor:
    """``norm(y)``; for a ``y`` computed ``shrink`` times smaller in fp16, the norm of the true ``y`` in float32."""
    if shrink is None:
        return norm(y)
    return norm(y.clamp(-FP16_LIMIT, FP16_LIMIT).float() * (1.0 / shrink))


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a buffer, so that .to(dtype) rounds it exactly as transformers does
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5), persistent=False)


def window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool (q_len, k_len) mask for queries at the last q_len of k_len positions: 0 <= i - j < window."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


class Gemma3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.zeros_(module.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, masks: dict | None = None, cache: list | None = None,
                logits_to_keep: int = 0, return_logits: bool = True):
        """Logits (B, T, vocab), plus the mean cross-entropy when ``targets`` is given (``IGNORE_INDEX`` is ignored).

        With targets and ``return_logits=False`` it returns ``(None, loss)`` through the fused
        :class:`LinearCrossEntropy`: same loss and gradients, less time and memory (what training uses).

        ``positions`` (B|1, T) are absolute positions (default 0..T-1). Generation with a KV ``cache``
        (one object per layer with ``update(k, v) -> (k, v)``) passes explicit bool ``masks`` per layer type.
        ``logits_to_keep`` > 0 computes logits for the last that many positions only (generation's prefill).
        """
        cfg = self.config
        # ids on the CPU are checked here at no cost; on an accelerator that would be a host sync per forward, so
        # there the embedding's own device-side assert stands (users' ids are checked where they come in)
        if input_ids.device.type == "cpu" and cache is None and not torch.compiler.is_compiling() \
                and input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got {int(lo)}..{int(hi)}")
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)[None]
        if masks is None:  # causal flag where the window cannot bind; one window mask for all sliding layers
            window = window_mask(T, T, cfg.sliding_window, input_ids.device) if T > cfg.sliding_window else None
            masks = {FULL: None, SLIDING: window}
        embed = self.model.embed_tokens
        x = embed(input_ids) * self.model.embed_scale.to(embed.weight.dtype)
        rope = {t: rope_cos_sin(positions, cfg.head_dim, base, x.dtype)
                for t, base in ((SLIDING, cfg.rope_local_base), (FULL, cfg.rope_global_base))}
        shrink = FP16_SHRINK if fp16_autocast(input_ids.device.type) else None
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope[layer.layer_type]
            x = layer(x, cos, sin, masks[layer.layer_type], None if cache is None else cache[i], shrink)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.model.norm(x)
        if targets is not None and not return_logits:
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1),
                                                  torch.is_grad_enabled())
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    # -- Hugging Face folder I/O -----------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` with transformers' names; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        dtype = next(self.parameters()).dtype
        atomic_write(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        follow_umask(directory / "model.safetensors")  # safetensors creates its file 0600
        atomic_write_text(directory / "config.json", json.dumps(self.config.to_hf(dtype), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> Gemma3:
        directory = Path(directory)
        cfg = ModelConfig.from_folder(directory)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{weights}: missing")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{weights}: unreadable, truncated or corrupt ({e})") from None
        model = cls(cfg)
        expected = model.state_dict()
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        if missing := sorted(set(expected) - set(state)):
            raise UserError(f"{weights}: missing tensor {missing[0]} ({len(missing)} missing)")
        if unexpected := sorted(set(state) - set(expected)):
            raise UserError(f"{weights}: unexpected tensor {unexpected[0]} (config.json disagrees)")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise UserError(f"{weights}: {key} has shape {tuple(tensor.shape)}, "
                                f"config.json implies {tuple(expected[key].shape)}")
        if bad := [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
            raise UserError(f"{weights}: the checkpoint holds non-finite weights (NaN or inf in {bad[0]}"
                            f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}); use an earlier one")
        model.load_state_dict(state, strict=False)  # strict=False only for the tied lm_head
        return model.to(device=device, dtype=dtype)
