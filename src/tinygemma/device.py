"""Devices, dtypes and memory checks shared by training, decoding, serving and export."""

from __future__ import annotations

import os

import torch

from tinygemma.config import UserError
from tinygemma.model import SLIDING, ModelConfig


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str | torch.device) -> torch.device:
    """``--device`` of every command: a torch device that exists here (``auto``: CUDA when there is one), or a
    one-line UserError."""
    if name == "auto":
        name = default_device()
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


def cache_positions(total: int, context: int) -> int:
    """Positions a decoder's full-attention caches hold for ``total`` (prompt + new tokens): a power of two, at
    least 256, at most the context, so that calls of nearby lengths share one compiled decoding step."""
    return min(max(256, 1 << (total - 1).bit_length()), context)


def generation_bytes(mc: ModelConfig, rows: int, total: int, dtype: torch.dtype) -> int:
    """What :func:`stream` allocates beyond the weights: every layer's key/value buffers (full layers hold
    :func:`cache_positions`, sliding layers at most a window) for ``rows`` rows, and a float32 row of logits
    per row."""
    size = torch.finfo(dtype).bits // 8
    total = cache_positions(total, mc.context_length)
    cache = sum(min(mc.sliding_window, total) if t == SLIDING else total for t in mc.layer_types)
    return 2 * rows * mc.num_kv_heads * mc.head_dim * cache * size + 4 * rows * mc.vocab_size


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype names (generate, serve, export)


def inference_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA GPUs with native bf16 (Ampere and later), fp32 elsewhere: older GPUs only emulate
    bf16, fp16 weights would put the residual stream in fp16, where Gemma 3's activations overflow, and CPUs gain
    nothing from bf16 matrix-vector products (bench/generate.py); else ``bf16`` / ``fp32``."""
    if name == "auto":
        native = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


