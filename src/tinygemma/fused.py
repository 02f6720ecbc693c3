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
# rows of logits the loss holds at once: 2,048 x 50,257 float32 = 412 MB, not N x vocab (3.3 GB at 32 x 512)
CHUNK_ROWS = 2048


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

    The same math as ``F.cross_entropy(F.linear(x, weight).float(), targets)``, in row chunks so that only one
    chunk's logits (``CHUNK_ROWS`` x vocab) ever exists: the loss needs each row's log-sum-exp, and with
    ``grad=True`` the forward also turns each chunk's logits in place into (softmax - onehot) and multiplies
    them into the gradients of x and weight right away (no log_softmax copy, no dense one-hot, no logits kept
    for backward, no recomputation). Backward only scales those by the incoming gradient / number of tokens.
    Matmuls run in the autocast dtype, as F.linear's would; the softmax statistics are float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
        # one cast of each operand to the matmul dtype (autocast's, if on), not one per chunk
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w = weight.to(dtype)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)[:, None]
        loss, grad_x_parts, grad_w = x.new_zeros((), dtype=torch.float32), [], None
        for rows in (slice(i, i + CHUNK_ROWS) for i in range(0, x.shape[0], CHUNK_ROWS)):
            xc = x[rows].to(dtype)
            z = (xc @ w.t()).float()  # a no-op in fp32; under autocast the low-precision logits go at once
            zmax = z.amax(-1, keepdim=True)
            target_logit = z.gather(1, safe[rows])
            z = z.sub_(zmax).exp_()
            total = z.sum(-1, keepdim=True)
            loss += ((zmax + total.log() - target_logit).squeeze(1) * valid[rows]).sum()
            if grad:  # rows weighted 0/1 here and by grad/N in backward, so fp16's g does not underflow
                row = valid[rows, None].float()
                g = z.mul_(row / total).scatter_add_(1, safe[rows], -row).to(dtype)  # softmax - onehot
                grad_x_parts.append(g @ w)
                part = g.t() @ xc
                grad_w = part.to(weight.dtype) if grad_w is None else grad_w.add_(part)
        count = valid.sum()
        grad_x = (torch.cat(grad_x_parts) if len(grad_x_parts) > 1 else grad_x_parts[0]) if grad else None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(grad_x, grad_w, count)
        return loss / count

    @staticmethod
    @once_differentiable  # the backward scales the saved gradients in place
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_w, count = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError("LinearCrossEntropy: backward of a forward run with grad=False")
        scale = grad / count
        return (grad_x.to(ctx.x_dtype).mul_(scale) if ctx.needs_input_grad[0] else None,
                grad_w.mul_(scale) if ctx.needs_input_grad[1] else None, None, None)
