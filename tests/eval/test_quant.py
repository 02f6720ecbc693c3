"""Lower-precision weights for inference (tinygemma.quant) and what they cost (tinygemma.eval.quality)."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.core.test_generate import greedy_without_cache
from tinygemma.cli import main
from tinygemma.data.dataset import TokenDataset
from tinygemma.eval.loss import evaluate_tokens
from tinygemma.eval.quality import quality
from tinygemma.generate import generate_ids, load_checkpoint, stream
from tinygemma.model import Gemma3, load_model_config
from tinygemma.quant import Int8Linear, for_inference, quantize_rows, weight_bytes
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.app import create_app

GREEDY = SamplingConfig(max_new_tokens=30, greedy=True)
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The unit tests' trained tiny checkpoint in fp32 (random weights would make agreement meaningless)."""
    return load_checkpoint(tiny_run / "best")


def converted(model, dtype):
    return for_inference(copy.deepcopy(model), dtype)


def block_linears(model):
    return [getattr(part, name) for layer in model.model.layers for part in (layer.self_attn, layer.mlp)
            for name in BLOCK_LINEARS if hasattr(part, name)]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_rows_quantize_symmetrically_within_half_a_step(scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different magnitudes
    w[5] = 0.0
    q, scale = quantize_rows(w, scale_dtype)
    assert q.dtype == torch.int8 and scale.dtype == scale_dtype and scale.shape == (37,)
    assert q.abs().max() <= 127
    nonzero = [r for r in range(37) if r != 5]
    exact = w[nonzero].abs().amax(1) / 127
    s = scale.double()[:, None]
    assert (scale[nonzero].double() >= exact.double()).all()  # rounded up: nothing is clipped
    if scale_dtype == torch.float32:
        assert torch.equal(scale[nonzero], exact)
    assert ((q.double() * s - w.double()).abs() <= s / 2).all()
    assert (q[5] == 0).all() and scale[5] == 1


def test_int8_linear_is_the_dequantized_product_of_bf16_inputs():
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(48, 20, bias=False))
    assert layer.scales.dtype == torch.bfloat16  # the CPU kernel's fast path: bf16 activations and scales
    x = torch.randn(3, 5, 48)
    dequantized = layer.qweight.double() * layer.scales.double()[:, None]
    expected = x.bfloat16().double() @ dequantized.T
    y = layer(x)
    assert y.dtype == torch.float32
    # the product of the bf16-rounded inputs, rounded once more to bf16 (relative error <= 2^-9)
    torch.testing.assert_close(y.double(), expected, rtol=2 ** -8, atol=1e-6)
    assert torch.equal(layer(x[:, -1:]), y[:, -1:])  # a strided slice; a row does not depend on the others
    assert torch.equal(layer(x[1:2]), y[1:2])


def test_int8_block_matrices_take_a_quarter_of_the_bytes():
    torch.manual_seed(0)
    fp32 = Gemma3(load_model_config("tiny")).eval()
    q = copy.deepcopy(fp32)
    config = q.config
    assert for_inference(q, "int8") is q and q.config is config  # in place, config kept
    with pytest.raises(ValueError, match="int8 weights already"):
        for_inference(q, "bf16")
    before, after = block_linears(fp32), block_linears(q)
    assert len(after) == 7 * fp32.config.num_layers and all(isinstance(m, Int8Linear) for m in after)
    for lin, qlin in zip(before, after, strict=True):
        out, inp = lin.weight.shape
        assert qlin.qweight.dtype == torch.int8 and qlin.qweight.nbytes == out * inp
        assert qlin.scales.nbytes == 2 * out  # bf16
    fp32_bytes = sum(m.weight.nbytes for m in before)
    int8_bytes = sum(m.qweight.nbytes + m.scales.nbytes for m in after)
    smallest_in = min(m.in_features for m in after)  # each row adds one 2-byte scale to its `in` bytes
    assert fp32_bytes / 4 < int8_bytes <= fp32_bytes / 4 * (1 + 2 / smallest_in)
    # the tied head is quantized too; its float matrix stays for the embedding lookup, which is exact
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.weight is q.model.embed_tokens.weight
    assert torch.equal(q.model.embed_tokens.weight, fp32.model.embed_tokens.weight)
    head = q.lm_head.qweight.nbytes + q.lm_head.scales.nbytes
    norms = sum(p.nbytes for n, p in q.named_parameters() if "norm" in n)
    assert weight_bytes(q) == int8_bytes + head + norms
    assert weight_bytes(fp32) == fp32_bytes + fp32.lm_head.weight.nbytes + norms


def test_quality_against_direct_computation(trained, data_dir):
    tokens = TokenDataset(data_dir, "val").tokens
    same = quality(trained, trained, tokens, positions=1000, block_size=100)
    direct = evaluate_tokens(trained, np.asarray(tokens[:1000]), block_size=100)["loss"]
    assert same["positions"] == 1000 and same["top1_agreement"] == 1.0 and same["loss_delta"] == 0.0
    assert same["loss_fp32"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_quality_bounds_on_the_trained_checkpoint(trained, data_dir, dtype):
    # the targets for the demo checkpoint: >= 99% top-1 agreement, loss +<= 0.02 nats
    res = quality(trained, converted(trained, dtype), TokenDataset(data_dir, "val").tokens, positions=10_000)
    assert res["positions"] == 10_000
    assert res["top1_agreement"] >= 0.99, res
    assert abs(res["loss_delta"]) <= 0.02, res


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_converted_model_decodes_with_the_cache_and_stops_at_eot(trained, tokenizer, dtype):
    model = converted(trained, dtype)
    prompt = [tokenizer.eot_id] + tokenizer.encode("Once upon a time, there was a little")
    ids = generate_ids(model, [prompt], GREEDY)[0]
    assert ids == greedy_without_cache(model, prompt, 30)  # the KV-cache path of the converted weights
    stop = ids[4]  # pretend this token is <|endoftext|>: the row ends with it
    model.config.eot_token_id = stop  # the converted copy's own config
    steps = [s[0] for s in stream(model, [prompt], GREEDY)]
    assert steps == ids[:ids.index(stop) + 1]


@pytest.mark.slow  # torch.compile: tens of seconds on a CPU
def test_int8_model_compiles_to_one_graph(trained):
    from torch._dynamo.utils import counters

    model = converted(trained, "int8")
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: a graph break would raise
        torch.testing.assert_close(compiled, model(x), rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]


@pytest.mark.slow
def test_compiled_int8_decoding_equals_eager(trained, tokenizer):
    model = converted(trained, "int8")
    prompts = [[tokenizer.eot_id] + tokenizer.encode(p) for p in ("Once upon a time", "Tom had a red")]
    assert generate_ids(model, prompts, GREEDY, compile=True) == generate_ids(model, prompts, GREEDY)


def test_dtype_flag_of_generate_eval_samples_serve(tiny_run, prepared_sample, tmp_path, capsys):
    ckpt, data = str(tiny_run / "best"), str(prepared_sample(8))
    assert main(["generate", ckpt, "--prompt", "Once", "--greedy", "--max-new-tokens", "8", "--dtype", "int8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["tokens"]
    losses = {}
    for dtype in ("fp32", "int8"):
        assert main(["eval", ckpt, "--data", data, "--context-stories", "0", "--dtype", dtype,
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["dtype"] == dtype
        losses[dtype] = res["loss"]
    assert losses["int8"] != losses["fp32"] and losses["int8"] == pytest.approx(losses["fp32"], abs=0.02)
    assert main(["samples", ckpt, "--out", str(tmp_path / "s.md"), "--max-new-tokens", "8", "--num-samples", "1",
                 "--dtype", "int8"]) == 0
    app = create_app(ckpt, dtype="int8")
    try:
        assert isinstance(app.state.engine.model.lm_head, Int8Linear)
    finally:
        app.state.engine.shutdown()
    for command in (["generate", ckpt], ["eval", ckpt], ["samples", ckpt], ["serve", ckpt]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--dtype", "int4"])
        assert e.value.code == 2
        assert "invalid choice: 'int4'" in capsys.readouterr().err
