"""Numerics of the model under each precision: the chunked fused loss."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import saved_bytes
from tinygemma import fused
from tinygemma.fused import LinearCrossEntropy
from tinygemma.model import Gemma3, load_model_config


def loss_and_grads(fn, x0, w0, targets, upstream=3.0):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fn(x, w, targets)
    (upstream * loss).backward()
    return loss.detach(), x.grad, w.grad


def reference_loss(x, w, targets):
    return F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_rows", [7, 64, 2048])
def test_chunked_loss_equals_cross_entropy_of_full_logits(monkeypatch, chunk_rows):
    # the loss works through CHUNK_ROWS rows at a time (a ragged last chunk included): loss and both gradients
    # are those of F.cross_entropy over the full logits, to float32 rounding
    monkeypatch.setattr(fused, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    x, w = torch.randn(50, 32), torch.randn(1000, 32) * 0.3
    targets = torch.randint(0, 1000, (50,))
    targets[3:9] = -100
    ours = loss_and_grads(lambda x, w, t: LinearCrossEntropy.apply(x, w, t, True), x, w, targets)
    ref = loss_and_grads(reference_loss, x, w, targets)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    assert ours[1][3:9].abs().max() == 0  # ignored rows get no gradient


def test_chunked_loss_under_bf16_autocast_matches_the_reference(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ROWS", 16)
    torch.manual_seed(0)
    x, w = torch.randn(40, 32), torch.randn(500, 32) * 0.3
    targets = torch.randint(0, 500, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(lambda x, w, t: LinearCrossEntropy.apply(x, w, t, True), x, w, targets)
        ref = loss_and_grads(reference_loss, x, w, targets)
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_loss_keeps_no_logits_for_backward():
    # it used to keep the float32 exp-logits for backward, tokens x vocab x 4 bytes (3.3 GB at 32 x 512)
    torch.manual_seed(0)
    model = Gemma3(load_model_config("tiny"))
    ids, targets = torch.randint(0, 50257, (2, 64)), torch.randint(0, 50257, (2, 64))
    kept = saved_bytes(lambda: model(ids, targets, return_logits=False)[1], exclude=model.parameters())
    assert kept < ids.numel() * 50257 * 4


def test_evaluation_loss_computes_no_gradients():
    torch.manual_seed(0)
    x, w = torch.randn(20, 16), torch.randn(300, 16)
    targets = torch.randint(0, 300, (20,))
    with torch.no_grad():
        loss = LinearCrossEntropy.apply(x, w, targets, False)
    torch.testing.assert_close(loss, reference_loss(x, w, targets), rtol=1e-6, atol=0)
