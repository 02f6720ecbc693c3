"""GGUF export: the file's contents read back with the gguf package, bad input refused with nothing written,
and (marked ``llamacpp``, run by ``make test-gguf``) the file run by llama.cpp itself through llama-cpp-python."""

import json
import os

import gguf
import numpy as np
import pytest
import torch

from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.generate import encode_prompts, generate_ids, load_checkpoint
from tinygemma.gguf_export import export_gguf, gpt2_vocab
from tinygemma.model import FULL, PRESETS, SLIDING, Gemma3, ModelConfig
from tinygemma.prompts import TUTORIAL_PROMPTS
from tinygemma.rundir import resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import EOT_ID

# six layers (five sliding, one full), as llama.cpp's gemma3 runs them, narrow so that tests stay quick
NARROW = dict(context_length=256, hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1, head_dim=32,
              intermediate_size=128, sliding_window=16, query_pre_attn_scalar=32)


@pytest.fixture(scope="module")
def narrow_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = Gemma3(ModelConfig(**NARROW))
    with torch.no_grad():  # norm weights are zero at init; random ones check that 1 + w is stored
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "narrow")


def read(path) -> tuple[dict, dict]:
    """The file's key/values (tokens and merges left out) and tensors, as the gguf package reads them."""
    reader = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.tokens",
          "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    for k in ("tokens", "merges"):
        if f"tokenizer.ggml.{k}" in reader.fields:
            kv[f"n_{k}"] = len(reader.fields[f"tokenizer.ggml.{k}"].data)
    return kv, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def f16_file(narrow_ckpt, tmp_path_factory):
    return read(export_gguf(narrow_ckpt, tmp_path_factory.mktemp("gguf") / "m.gguf", "f16"))


# -- the tokenizer --------------------------------------------------------------------------------
def test_gpt2_vocab_is_gpt2s(tokenizer):
    tokens, merges = gpt2_vocab()
    assert len(tokens) == 50257 and len(merges) == 50000 and tokens[EOT_ID] == "<|endoftext|>"
    # the first and last lines of GPT-2's merges.txt
    assert merges[:5] == ["Ġ t", "Ġ a", "h e", "i n", "r e"] and merges[-1] == "Ġg azed"
    assert tokens[tokenizer.encode(" the")[0]] == "Ġthe" and tokens[198] == "Ċ"
    # every merge joins two tokens into a token ranked after both
    index = {t: i for i, t in enumerate(tokens)}
    for rank, m in enumerate(merges):
        a, b = m.split(" ")
        assert max(index[a], index[b]) < index[a + b] == 256 + rank


# -- the file -------------------------------------------------------------------------------------
def test_file_holds_what_llama_cpp_reads(f16_file):
    kv, tensors = f16_file
    assert kv["general.architecture"] == "gemma3" and kv["general.license"] == "apache-2.0"
    assert kv["general.dataset.0.name"] == "TinyStories" and "TinyStories" in kv["general.description"]
    expected = {"context_length": 256, "embedding_length": 64, "block_count": 6, "feed_forward_length": 128,
                "attention.head_count": 2, "attention.head_count_kv": 1, "attention.key_length": 32,
                "attention.value_length": 32, "attention.sliding_window": 16,
                "rope.freq_base": 1_000_000.0, "rope.freq_base_swa": 10_000.0}
    assert {k: kv[f"gemma3.{k}"] for k in expected} == expected
    assert kv["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert kv["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False]
    tok = {k: kv[f"tokenizer.ggml.{k}"] for k in ("model", "pre", "add_bos_token", "bos_token_id", "eos_token_id",
                                                   "padding_token_id")}
    assert tok == {"model": "gpt2", "pre": "gpt-2", "add_bos_token": False, "bos_token_id": EOT_ID,
                   "eos_token_id": EOT_ID, "padding_token_id": EOT_ID}
    assert (kv["n_tokens"], kv["n_merges"]) == (50257, 50000)
    # 2 + 6 * 13 tensors under llama.cpp's names; no output.weight (tied): llama.cpp reuses token_embd
    assert len(tensors) == 2 + 6 * 13 and "output.weight" not in tensors
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q_norm.weight", "blk.5.post_attention_norm.weight",
            "blk.5.post_ffw_norm.weight", "blk.5.ffn_gate.weight"} <= set(tensors)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_weights_stored_as_llama_cpp_computes_with_them(narrow_ckpt, f16_file, tmp_path, monkeypatch, dtype):
    if dtype == "f16":
        tensors = f16_file[1]
    else:  # 100,000 token strings make reading slow: these files go without them
        monkeypatch.setattr("tinygemma.gguf_export._add_tokenizer", lambda w: None)
        tensors = read(export_gguf(narrow_ckpt, tmp_path / "m.gguf", dtype))[1]
    state = Gemma3.from_pretrained(narrow_ckpt).state_dict()
    norm = tensors["blk.2.post_ffw_norm.weight"]  # norms: f32, and 1 + w (llama.cpp multiplies by the weight)
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(norm.data, state["model.layers.2.post_feedforward_layernorm.weight"].numpy() + 1)
    w = state["model.layers.5.mlp.down_proj.weight"].numpy()
    t = tensors["blk.5.ffn_down.weight"]
    assert t.tensor_type.name == dtype.upper() and tuple(t.shape) == (128, 64)  # ggml's order: (in, out)
    got = gguf.dequantize(t.data, t.tensor_type).reshape(w.shape)
    # f16: round to nearest, half an ulp; q8_0: one f16 scale (max |w| / 127) per 32 values, half a step
    # plus the scale's own rounding
    tol = {"f32": 0, "f16": np.abs(w).max() * 2 ** -11, "q8_0": np.abs(w).max() / 127 * 0.51}[dtype]
    assert np.abs(got - w).max() <= tol


def test_cli_export_gguf(narrow_ckpt, tmp_path, capsys):
    assert main(["export", str(narrow_ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert f"{(tmp_path / 'm.gguf').stat().st_size:,} bytes" in capsys.readouterr().out
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def _write_variant(folder, **changes):
    torch.manual_seed(0)
    return Gemma3(ModelConfig(**{**NARROW, **changes})).save_pretrained(folder)


@pytest.mark.parametrize("changes, flags, message", [
    ({}, ["--dtype", "q4_0"], "--dtype 'q4_0': choose f32, f16, q8_0"),
    ({}, ["--format", "onnx"], "--format 'onnx': choose hf or gguf"),
    ({"vocab_size": 1000, "eot_token_id": 999}, [], "vocabulary of 1000 tokens with end of text 999 is not GPT-2's"),
    ({"num_layers": 3, "layer_types": [SLIDING, SLIDING, FULL]}, [],
     "layer pattern SSF differs from llama.cpp's gemma3 pattern SSS"),
    ({"rope_local_base": 20_000.0}, [], "local RoPE base 20000 differs from llama.cpp's gemma3 10000"),
    ({"query_pre_attn_scalar": 64}, [], "query_pre_attn_scalar 64 differs from the 32 llama.cpp uses"),
    ({"intermediate_size": 100}, ["--dtype", "q8_0"], "q8_0 needs rows of a multiple of 32 values"),
])
def test_bad_input_refused_in_one_line_with_nothing_written(tmp_path, capsys, changes, flags, message):
    ckpt = _write_variant(tmp_path / "ckpt", **changes)
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", str(ckpt), str(out), "--format", "gguf", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.parent.exists()


def test_tiny_preset_refused(tmp_path):
    ckpt = Gemma3(ModelConfig(**PRESETS["tiny"])).save_pretrained(tmp_path / "tiny")
    with pytest.raises(UserError, match="layer pattern SSF"):
        export_gguf(ckpt, tmp_path / "tiny.gguf")


def test_existing_output_needs_force(narrow_ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", str(narrow_ckpt), str(out), "--format", "gguf"]) == 2
    assert "exists (use --force to replace it)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["m.gguf"]
    assert main(["export", str(narrow_ckpt), str(out), "--format", "gguf", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_no_partial_file(narrow_ckpt, tmp_path, monkeypatch, existing):
    out = tmp_path / "m.gguf"
    if existing:
        out.write_bytes(b"previous export")
    real = gguf.GGUFWriter.write_tensors_to_file

    def half_then_interrupt(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 4096)  # some tensor bytes reach the disk, then the user presses Ctrl-C
        self.fout[0].flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(narrow_ckpt, out, "f16", force=True)
    assert os.listdir(tmp_path) == (["m.gguf"] if existing else [])
    if existing:
        assert out.read_bytes() == b"previous export"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    export_gguf(narrow_ckpt, out, "f16", force=True)
    assert os.listdir(tmp_path) == ["m.gguf"]


# -- llama.cpp itself (make test-gguf) --------------------------------------------------------------
NEW_TOKENS = 120
# Measured on the trained narrow model below, over the five greedy stories (llama-cpp-python 0.3.36, 2-core x86
# CPU): f32 file vs tinygemma max |logit error| 0.0004 (f32 KV cache; 0.0037 with the default f16 one); vs the f32
# file, f16 agrees on every top-1 with max error 0.016, q8_0 on 99.7% (worst story 99.2%) with max error 0.37.
# The bounds leave a margin of 3x or more (logits span about 20).
F32_MAX_ERR = 0.002
LOW_PRECISION_BOUNDS = {"f16": (0.99, 0.05), "q8_0": (0.97, 1.0)}  # (top-1 agreement at least, max |logit error|)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-gguf` "
                                                   "installs it and runs these tests")


@pytest.fixture(scope="module")
def trained(llama_cpp, data_dir, tmp_path_factory):
    """The narrow six-layer model trained for 60 steps on the sample (~100 s of CPU): each step's top logits
    stand apart as in a real model (a random model has near-ties of 1e-4 that llama.cpp's f16 GELU table flips)."""
    out = tmp_path_factory.mktemp("narrow-run")
    (out / "narrow.json").write_text(json.dumps(NARROW))
    assert main(["train", "--data", str(data_dir), "--out", str(out / "run"), "--model", str(out / "narrow.json"),
                 "--block-size", "64", "--micro-batch", "16", "--grad-accum", "1", "--lr", "1e-2", "--max-steps",
                 "60", "--eval-interval", "60", "--eval-batches", "1", "--no-progress", "--no-compile"]) == 0
    return resolve_checkpoint(out / "run")


@pytest.fixture(scope="module")
def ggufs(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {d: export_gguf(trained, folder / f"narrow-{d}.gguf", d) for d in ("f32", "f16", "q8_0")}


def load(llama_cpp, path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                           verbose=False, **kwargs)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation, past <|endoftext|> too (argmax of its logits at each step)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.fixture(scope="module")
def greedy(trained, tokenizer):
    """tinygemma's greedy stories for the tutorial's prompts (as `generate --greedy`), NEW_TOKENS each: the
    end-of-text id is switched off so that every story runs the full length."""
    model = load_checkpoint(trained)
    model.config.eot_token_id = -1
    prompts = encode_prompts(tokenizer, TUTORIAL_PROMPTS)
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True)
    return model, [(ids, generate_ids(model, [ids], cfg)[0]) for ids in prompts]


@pytest.mark.llamacpp
def test_llama_cpp_loads_the_file_as_exported(llama_cpp, ggufs, tokenizer):
    llm = load(llama_cpp, ggufs["f32"], vocab_only=True)
    assert llm.n_vocab() == 50257 and llm.metadata["general.architecture"] == "gemma3"
    assert llm.token_bos() == llm.token_eos() == EOT_ID
    text = "Once upon a time, Lily said: \"Hi!\"\n"
    # no automatic bos even when the caller asks for special tokens; <|endoftext|> is parsed only when asked
    assert llm.tokenize(text.encode(), add_bos=True) == tokenizer.encode(text)
    assert llm.tokenize(b"<|endoftext|>Once", add_bos=False, special=True) == [EOT_ID] + tokenizer.encode("Once")
    assert llm.tokenize(b"<|endoftext|>", add_bos=False) == tokenizer.encode("<|endoftext|>")


@pytest.mark.llamacpp
def test_llama_cpp_tokenizer_equals_tiktoken_on_every_validation_story(llama_cpp, ggufs, sample_stories, tokenizer):
    llm = load(llama_cpp, ggufs["f32"], vocab_only=True)
    stories = sample_stories["val"]
    assert len(stories) == 800
    for story in stories:
        ids = tokenizer.encode(story)
        assert llm.tokenize(story.encode(), add_bos=False) == ids, story[:60]
        assert llm.detokenize(ids) == story.encode()


@pytest.mark.llamacpp
def test_llama_cpp_f32_greedy_equals_tinygemma(llama_cpp, ggufs, greedy, tokenizer):
    model, stories = greedy
    llm = load(llama_cpp, ggufs["f32"], type_k=0, type_v=0)  # f32 KV cache (llama.cpp's default is f16)
    for prompt, (ids, ours) in zip(TUTORIAL_PROMPTS, stories, strict=True):
        assert len(ours) == NEW_TOKENS
        theirs = llama_greedy(llm, ids, NEW_TOKENS)
        assert tokenizer.decode(theirs) == tokenizer.decode(ours), prompt
        assert theirs == ours
        with torch.inference_mode():
            ref = model(torch.tensor([ids + ours]))[0].numpy()
        assert np.abs(llama_logits(llm, ids + ours) - ref).max() < F32_MAX_ERR


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_f16_and_q8_0_logits_close_to_f32(llama_cpp, ggufs, greedy, dtype):
    """Every position of the five greedy stories (5 x ~130), teacher-forced through both files."""
    f32, low = load(llama_cpp, ggufs["f32"]), load(llama_cpp, ggufs[dtype])
    agree, err = [], 0.0
    for ids, ours in greedy[1]:
        a, b = llama_logits(f32, ids + ours), llama_logits(low, ids + ours)
        agree.append(np.mean(a.argmax(-1) == b.argmax(-1)))
        err = max(err, float(np.abs(a - b).max()))
    top1, max_err = LOW_PRECISION_BOUNDS[dtype]
    assert np.mean(agree) >= top1 and err <= max_err, (np.mean(agree), err)
