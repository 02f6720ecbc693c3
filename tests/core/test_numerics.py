"""Numerics of the model under each precision: the chunked fused loss, fp16's overflow guard, and that the
guard leaves fp32 and bf16 bit for bit as they were."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import saved_bytes
from tinygemma import fused
from tinygemma.fused import LinearCrossEntropy
from tinygemma.model import FULL, PRESETS, SLIDING, Gemma3, ModelConfig, load_model_config, rope_cos_sin, window_mask

FP16_MAX = torch.finfo(torch.float16).max


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


# -- fp16 -------------------------------------------------------------------------------------------------
def overflowing(preset: str, factor: float) -> Gemma3:
    """A model whose first MLP is scaled so that its down projection leaves fp16's range."""
    torch.manual_seed(0)
    model = Gemma3(load_model_config(preset)).eval()
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(factor)
    return model


def first_down_projection(model: Gemma3, ids: torch.Tensor) -> torch.Tensor:
    """The first layer's down projection output in float32 (what fp16 must hold)."""
    layer, cfg = model.model.layers[0], model.config
    x = model.model.embed_tokens(ids) * model.model.embed_scale
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1])[None], cfg.head_dim, cfg.rope_local_base, x.dtype)
    mask = window_mask(ids.shape[1], ids.shape[1], cfg.sliding_window, ids.device)
    x = x + layer.post_attention_layernorm(layer.self_attn(layer.input_layernorm(x), cos, sin, mask))
    h = layer.pre_feedforward_layernorm(x)
    mlp = layer.mlp
    return mlp.down_proj(F.gelu(mlp.gate_proj(h), approximate="tanh") * mlp.up_proj(h))


@pytest.mark.parametrize("preset, factor", [("tiny", 300.0), pytest.param("gemma3-270m", 80.0, marks=pytest.mark.slow)])
def test_fp16_autocast_stays_finite_where_the_down_projection_overflows(preset, factor):
    model = overflowing(preset, factor)
    ids = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        exact = model(ids)
        assert first_down_projection(model, ids).abs().max() > 2 * FP16_MAX  # fp16 cannot hold it
        with torch.autocast("cpu", dtype=torch.float16):
            half = model(ids)
    assert torch.isfinite(half).all()
    # and right, not only finite: as close to fp32 as fp16's 11 bits allow
    assert (half.float() - exact).abs().max() <= 0.01 * exact.abs().max()


def test_fp16_autocast_trains_through_the_overflow():
    model = overflowing("tiny", 300.0).train()
    ids, targets = torch.randint(0, 50257, (2, 40)), torch.randint(0, 50257, (2, 40))
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = model(ids, targets, return_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def plain_forward(model: Gemma3, ids: torch.Tensor) -> torch.Tensor:
    """Gemma3's forward written out with the blocks' formula of transformers (no fp16 guard)."""
    cfg, T = model.config, ids.shape[1]
    x = model.model.embed_tokens(ids) * model.model.embed_scale
    rope = {t: rope_cos_sin(torch.arange(T)[None], cfg.head_dim, base, x.dtype)
            for t, base in ((SLIDING, cfg.rope_local_base), (FULL, cfg.rope_global_base))}
    masks = {SLIDING: window_mask(T, T, cfg.sliding_window, ids.device) if T > cfg.sliding_window else None, FULL: None}
    for layer in model.model.layers:
        cos, sin = rope[layer.layer_type]
        x = x + layer.post_attention_layernorm(layer.self_attn(layer.input_layernorm(x), cos, sin,
                                                               masks[layer.layer_type]))
        h, mlp = layer.pre_feedforward_layernorm(x), layer.mlp
        x = x + layer.post_feedforward_layernorm(mlp.down_proj(F.gelu(mlp.gate_proj(h), approximate="tanh")
                                                               * mlp.up_proj(h)))
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fp32_and_bf16_logits_are_bit_for_bit_the_plain_formula(amp):
    torch.manual_seed(0)
    model = Gemma3(ModelConfig(**PRESETS["tiny"])).eval()
    ids = torch.randint(0, 50257, (2, 40))
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        assert torch.equal(model(ids), plain_forward(model, ids))
