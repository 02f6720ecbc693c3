"""What lower-precision weights cost: a converted model (``--dtype bf16|int8``) against the fp32 one on the same
tokens. Used by the tests and by ``bench/gguf.py``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tinygemma.config import UserError
from tinygemma.eval.loss import token_windows
from tinygemma.fused import IGNORE_INDEX
from tinygemma.model import Gemma3


@torch.inference_mode()
def quality(model_fp32: Gemma3, model_q: Gemma3, val_tokens: np.ndarray, positions: int = 10_000,
            block_size: int | None = None, batch_size: int = 4) -> dict:
    """Both models over the first ``positions`` tokens of ``val_tokens``, scored as ``tinygemma eval`` scores a
    split (one stream after ``<|endoftext|>``, non-overlapping windows of ``block_size``, default
    min(context, 512)): ``top1_agreement``, the share of positions where both models' most likely next token
    is the same; ``loss_fp32`` and ``loss_q``, their mean losses (nats/token); ``loss_delta`` = loss_q - loss_fp32."""
    mc = model_fp32.config
    tokens = np.asarray(val_tokens[:positions])
    if len(tokens) == 0:
        raise UserError("no tokens to compare the models on")
    block_size = block_size or min(mc.context_length, 512)
    agree, loss_a, loss_b = 0, 0.0, 0.0
    for x, y in token_windows(tokens, block_size, batch_size, mc.eot_token_id):
        y = y.flatten()
        valid = y != IGNORE_INDEX
        a = model_fp32(x.to(model_fp32.lm_head.weight.device)).float().flatten(0, 1).cpu()
        b = model_q(x.to(model_q.lm_head.weight.device)).float().flatten(0, 1).cpu()
        agree += int((a.argmax(-1) == b.argmax(-1))[valid].sum())
        # summed in float64, as eval does, so that the means do not depend on the batching
        loss_a += F.cross_entropy(a, y, ignore_index=IGNORE_INDEX, reduction="none").double().sum().item()
        loss_b += F.cross_entropy(b, y, ignore_index=IGNORE_INDEX, reduction="none").double().sum().item()
    n = len(tokens)
    return {"positions": n, "top1_agreement": agree / n, "loss_fp32": loss_a / n, "loss_q": loss_b / n,
            "loss_delta": (loss_b - loss_a) / n}
