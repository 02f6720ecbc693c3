"""Lower-precision weights for inference: ``--dtype fp32|bf16|int8`` of generate, eval, samples and serve.

Decoding one token reads every weight once, so at batch 1 its speed is bound by weight bytes: bf16 halves
them, int8 quarters them.

- ``bf16``: every weight in bf16 (embedding and head too); the RMSNorms still compute their statistics in
  float32 (see :func:`tinygemma.fused.rms_norm`). Meant for GPUs and CPUs with native bf16 (AVX512-BF16/AMX,
  Ampere and later): elsewhere the matmuls are emulated and may be slower than fp32.
- ``int8``: weight-only, symmetric, one scale per output channel (``w ~ q * scale``, ``q`` in [-127, 127]),
  for every Linear of the blocks and for the LM head; the residual stream, norms, KV cache and logits stay
  float32. On a CPU the products run torch's ``aten._weight_int8pack_mm``, which reads the int8 weights as they
  are; its vectorized (AVX512) path takes bf16 activations, so each product's input and output are rounded to
  bf16 (with float32 inputs the op runs a scalar loop, slower than fp32 weights) and the scales are bf16. A
  row's result does not depend on the other rows of the batch. On other devices the product is
  ``linear(x, q.to(x.dtype)) * scale`` in the activations' dtype, which torch.compile fuses into one kernel.
  The embedding lookup stays exact: the tied matrix is kept in float32 beside its int8 copy (one row of it is
  read per token), and the head keeps it as ``.weight`` so that code asking the head for the model's device and
  compute dtype keeps working.

Conversions are in place, as :meth:`torch.nn.Module.to` is; a converted model is for inference only
(``save_pretrained`` of an int8 model is not a transformers folder).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygemma.config import UserError
from tinygemma.device import inference_dtype
from tinygemma.generate import load_checkpoint
from tinygemma.log import warn
from tinygemma.model import Gemma3, RMSNorm

INFERENCE_DTYPES = ("fp32", "bf16", "int8")  # --dtype of generate, eval, samples and serve (besides "auto")
INT8_MAX = 127  # symmetric: -128 is never used, so that q and -q are both representable


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``q`` (out, in) and ``scale`` (out,) in ``scale_dtype`` with ``weight ~ q * scale[:, None]``, one
    scale per row (output channel): the row's largest magnitude / 127, rounded up to ``scale_dtype`` so that no
    entry is clipped (every entry is within scale / 2 of its value); an all-zero row gets scale 1."""
    w = weight.detach().float()
    exact = w.abs().amax(dim=1) / INT8_MAX
    scale = exact.to(scale_dtype)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(exact > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free Linear computing ``x @ (q * scale[:, None]).T`` with int8 ``q`` (buffers ``qweight`` and
    ``scales``; see the module doc for the dtypes). ``weight``, when given (the LM head), is the float matrix
    kept beside it for the exact embedding lookup; the product never reads it."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, weight: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if weight is not None:
            self.weight = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_weight: bool = False) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (Gemma 3's Linears have none)")
        w = linear.weight
        q, scale = quantize_rows(w, torch.bfloat16 if w.device.type == "cpu" else w.dtype)
        return cls(q, scale, w if keep_weight else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.scales.dtype).contiguous(), self.qweight, self.scales)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: Gemma3) -> Gemma3:
    """Every Linear of the blocks (q/k/v/o, gate/up/down) and the LM head as :class:`Int8Linear`, in place."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    model.lm_head = Int8Linear.from_linear(model.lm_head, keep_weight=True)
    return model


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions that oneDNN uses (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def for_inference(model: Gemma3, dtype: str) -> Gemma3:
    """``model`` in eval mode with its weights in ``dtype`` (fp32, bf16 or int8; see the module doc), converted
    in place and returned; its ``config`` is unchanged."""
    if dtype not in INFERENCE_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose {', '.join(INFERENCE_DTYPES)}")
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("the model has int8 weights already: convert the float model")
    model.eval()
    if dtype == "bf16":
        if model.lm_head.weight.device.type == "cpu" and not native_bf16_cpu():
            warn("bf16 on a CPU without native bf16 instructions is emulated: expect it slower than fp32")
        return model.to(torch.bfloat16)
    model.float()
    return quantize_int8(model) if dtype == "int8" else model


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> Gemma3:
    """A checkpoint or run folder (as :func:`load_checkpoint` takes it) in ``dtype``: ``auto`` (bf16 on CUDA GPUs
    with native bf16, fp32 elsewhere), fp32, bf16 or int8; None keeps the stored dtype."""
    model = load_checkpoint(path, device=device)
    if dtype is None:
        return model
    if dtype == "auto":
        dtype = "bf16" if inference_dtype("auto", device) == torch.bfloat16 else "fp32"
    return for_inference(model, dtype)


def weight_bytes(model: Gemma3) -> int:
    """Bytes of weights one decoding step reads: every matrix it multiplies by (the head's included; a tied
    head's once), their int8 scales, and the norms' weights. The embedding lookup reads one row: not counted."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, Int8Linear):
            tensors = (m.qweight, m.scales)
        elif isinstance(m, (nn.Linear, RMSNorm)):
            tensors = (m.weight,)
        else:
            continue
        for t in tensors:
            seen[t.data_ptr()] = t.nbytes
    return sum(seen.values())
