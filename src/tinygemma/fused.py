"""Hand-written autograd for the elementwise-heavy parts of the training step (same math, fewer passes).

Eager PyTorch runs every elementwise op as its own pass over memory, and autograd saves and replays each
one; on CPU (and in eager mode on GPU) the loss over a 50,257-token vocabulary and the many RMSNorms cost
as much as the matmuls around them. Both functions here compute exactly what the plain expressions in
their docstrings compute (the forward bit for bit for RMSNorm, the loss up to float summation order), and
tests/test_model.py checks them and their gradients against autograd.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # cross_entropy's ignore_index: targets not trained on


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm and its 1/rms: statistics in float32, scale by ``1 + weight``, back to x's dtype."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * (1.0 + weight.float())).type_as(x), r


class RMSNormFunction(torch.autograd.Function):
    """``(x.float() * rsqrt(mean(x.float()**2, -1) + eps) * (1 + weight.float())).type_as(x)``.

    The forward is those very ops (so bf16 results stay transformers'); the backward is the closed form
    g_x = r * (g - x_hat * mean(g * x_hat)) with g = grad * (1 + w), instead of replaying seven ops.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, r = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        x_hat, grad = x.float() * r, grad.float()
        grad_w = (grad * x_hat).flatten(0, -2).sum(0).type_as(weight) if ctx.needs_input_grad[1] else None
        g = grad * (1.0 + weight.float())
        grad_x = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(r).type_as(x)
        return grad_x, grad_w, None


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` (N, vocab) against ``targets`` (N,), ``IGNORE_INDEX`` ignored.

    The same math as ``F.cross_entropy(F.linear(x, weight).float(), targets)`` with fewer passes over the
    N x vocab logits, which dominate a small model's step: the forward turns them in place into exp(z - max)
    (the loss needs their sum anyway) and the backward into (softmax - onehot) * grad / N, so there is no
    log_softmax copy, no dense one-hot zero fill and no log_softmax backward pass. Only the loss comes out
    (the logits are overwritten); matmuls run in the autocast dtype, as F.linear's would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = x @ weight.t()  # autocast (if on) picks the matmul dtype here
        ctx.dtype = logits.dtype
        z = logits.float()  # a no-op in fp32; the softmax statistics are float32 either way
        valid = targets != IGNORE_INDEX
        scale = valid.float() / valid.sum()  # the mean over non-ignored tokens
        safe = torch.where(valid, targets, 0)[:, None]
        zmax = z.amax(-1, keepdim=True)
        target_logit = z.gather(1, safe)
        z = z.sub_(zmax).exp_()
        total = z.sum(-1, keepdim=True)
        loss = ((zmax + total.log() - target_logit).squeeze(1) * scale).sum()
        ctx.save_for_backward(x, weight, z, total, scale, safe)
        return loss

    @staticmethod
    @once_differentiable  # the backward consumes the saved logits in place
    def backward(ctx, grad: torch.Tensor):
        x, weight, z, total, scale, safe = ctx.saved_tensors
        row = (grad * scale)[:, None]
        g = z.mul_(row / total).scatter_add_(1, safe, -row).to(ctx.dtype)  # (softmax - onehot) * grad / N
        grad_x = (g @ weight.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ x.to(ctx.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None
