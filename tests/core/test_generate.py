import json

import pytest
import torch

from tinygemma import decode
from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.device import inference_dtype
from tinygemma.generate import (
    TextStream,
    generate_ids,
    generate_text,
    load_checkpoint,
    next_token_probs,
    stream,
    stream_text,
    top_next_tokens,
)
from tinygemma.model import PRESETS, Gemma3, ModelConfig
from tinygemma.sampling import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=40, greedy=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny model (window 16) with large random weights: decisive logits and varied greedy outputs
    (at the default init a random model repeats one token, which would hide cache bugs)."""
    torch.manual_seed(0)
    model = Gemma3(ModelConfig(**{**PRESETS["tiny"], "tie_embeddings": False}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "embed" in name else 0.1 if "norm" in name else 0.3)
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The tutorial's method: re-run the whole sequence for every new token."""
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == model.config.eot_token_id:
            break
        out.append(t)
        ids.append(t)
    return out


def test_cache_equals_no_cache_past_the_window(model):
    assert model.config.sliding_window == 16
    for prompt in prompts_of([40, 3]):  # prompt longer than the window; output wraps the ring twice
        assert generate_ids(model, [prompt], GREEDY)[0] == greedy_without_cache(model, prompt, 40)


def test_equals_transformers_generate(ckpt, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    for prompt in prompts_of([25, 1], seed=2):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=40)[0, len(prompt):].tolist()
        ours = generate_ids(model, [prompt], GREEDY)[0]
        assert len(ours) == 40
        assert ours == out


def test_batched_unequal_prompts_equal_one_by_one(model):
    prompts = prompts_of([1, 5, 30, 17], seed=3)
    batched = generate_ids(model, prompts, SamplingConfig(max_new_tokens=24, greedy=True))
    assert batched == [generate_ids(model, [p], SamplingConfig(max_new_tokens=24, greedy=True))[0] for p in prompts]
    assert len({tuple(b) for b in batched}) == 4


def test_sliding_layers_keep_only_the_window(model, monkeypatch):
    sizes = []

    class Spy(decode.SlotCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sizes.append((self.ring, tuple(self.k.shape)))

    monkeypatch.setattr(decode, "SlotCache", Spy)
    generate_ids(model, prompts_of([100]), SamplingConfig(max_new_tokens=50, greedy=True))
    # 150 positions: the full layer's cache is the bucket of 256
    assert sizes == [(True, (1, 1, 16, 16)), (True, (1, 1, 16, 16)), (False, (1, 1, 256, 16))]


def test_eot_stops_a_row_and_others_continue(model):
    prompts = prompts_of([9, 4], seed=4)
    full = generate_ids(model, prompts, GREEDY)
    stop = full[0][5]  # pretend this token is <|endoftext|>
    assert stop not in full[0][:5]
    old = model.config.eot_token_id
    model.config.eot_token_id = stop
    try:
        steps = list(stream(model, prompts, GREEDY))
        ids = generate_ids(model, prompts, GREEDY)
    finally:
        model.config.eot_token_id = old
    assert [s[0] for s in steps[:6]] == full[0][:5] + [stop]
    assert all(s[0] is None for s in steps[6:])
    assert ids[0] == full[0][:5]
    if stop not in full[1]:
        assert ids[1] == full[1] and len(steps) == 40


def test_all_rows_finished_ends_the_stream(model):
    prompt = prompts_of([6], seed=5)[0]
    first = generate_ids(model, [prompt], GREEDY)[0][0]
    old = model.config.eot_token_id
    model.config.eot_token_id = first
    try:
        assert list(stream(model, [prompt], GREEDY)) == [[first]]
    finally:
        model.config.eot_token_id = old


def test_probs_against_known_distribution():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    logits = p.log()
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0, 1.0), p)
    t2 = p.sqrt() / p.sqrt().sum()
    torch.testing.assert_close(next_token_probs(logits, 2.0, 0, 1.0), t2)
    torch.testing.assert_close(next_token_probs(logits, 1.0, 2, 1.0), torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]))
    # nucleus: the smallest set whose mass reaches top_p
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0, 0.5), torch.tensor([[1.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0, 0.7), torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]))
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0, 0.8), torch.tensor([[4 / 7, 2 / 7, 1 / 7, 0, 0]]))
    # temperature first, then top-k, then top-p
    top2 = t2[:, :2] / t2[:, :2].sum()  # k=3 leaves (.45, .32, .23): the first two reach 0.6
    torch.testing.assert_close(next_token_probs(logits, 2.0, 3, 0.6), torch.cat([top2, torch.zeros(1, 3)], 1))


def rows_sampling(cfg, n):
    """A decoder state of ``n`` rows sampling with ``cfg``, seeds 0..n-1, all at position 0 (no caches)."""
    full = lambda value, dtype=torch.long: torch.full((n,), value, dtype=dtype)
    return decode.DecodeState(tok=full(0), pos=full(0), active=full(True, torch.bool),
                              temperature=full(0.0 if cfg.greedy else cfg.temperature, torch.float32),
                              top_k=full(cfg.top_k), top_p=full(cfg.top_p, torch.float32),
                              seed_lo=torch.arange(n), seed_hi=full(0), caches=[])


def test_sampling_frequencies_match_the_distribution():
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    n = 40_000
    logits = p.log().expand(n, -1)
    cases = [(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0), p),
             (SamplingConfig(temperature=2.0, top_k=0, top_p=1.0), p.sqrt() / p.sqrt().sum()),
             (SamplingConfig(temperature=1.0, top_k=3, top_p=1.0), torch.tensor([4, 2, 1, 0, 0]) / 7),
             (SamplingConfig(temperature=1.0, top_k=0, top_p=0.7), torch.tensor([2, 1, 0, 0, 0]) / 3)]
    # the whole vocabulary (a row with top_k 0), and the top CANDIDATES of a larger one (tokens >= 5 never drawn)
    wide = torch.cat([logits, torch.full((n, 300), float("-inf"))], 1)
    for cfg, expected in cases:
        for rows, variant in ((logits, 5), (wide, decode.CANDIDATES)):
            if variant == decode.CANDIDATES and not 0 < cfg.top_k <= variant:
                continue
            freq = torch.bincount(decode.pick_tokens(rows, rows_sampling(cfg, n), variant), minlength=5) / n
            sigma = (expected * (1 - expected) / n).sqrt()
            assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (cfg, variant, freq, expected)


def test_seed_reproduces_and_topk1_is_greedy(model):
    prompts = prompts_of([7, 12], seed=6)
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, seed=3, num_samples=2)
    a, b = generate_ids(model, prompts, cfg), generate_ids(model, prompts, cfg)
    assert a == b and len(a) == 4
    assert generate_ids(model, prompts, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=4, num_samples=2)) != a
    assert a[0] != a[1]  # the samples of one prompt differ
    greedy = generate_ids(model, prompts, SamplingConfig(max_new_tokens=30, greedy=True))
    assert generate_ids(model, prompts, SamplingConfig(max_new_tokens=30, top_k=1, seed=9)) == greedy
    assert generate_ids(model, prompts, SamplingConfig(max_new_tokens=30, temperature=0.0)) == greedy


def test_long_prompt_is_left_truncated(model):
    prompt = prompts_of([600], seed=7)[0]  # context is 512
    cfg = SamplingConfig(max_new_tokens=12, greedy=True)
    assert generate_ids(model, [prompt], cfg) == generate_ids(model, [prompt[-500:]], cfg)
    with pytest.raises(UserError, match="below the context length"):
        generate_ids(model, [prompt], SamplingConfig(max_new_tokens=512))


def test_empty_prompt_starts_after_endoftext(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, greedy=True)
    expected = generate_ids(model, [[tokenizer.eot_id]], cfg)[0]
    assert generate_ids(model, [[]], cfg)[0] == expected
    assert generate_text(model, tokenizer, [""], cfg) == [tokenizer.decode(expected)]


def test_text_stream_handles_split_characters(tokenizer):
    text = "Lily saw a 🐉 and said “héllo” — 魔法!"
    ids = tokenizer.encode(text)
    def whole(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(tokenizer.decode_bytes([t])) for t in ids)  # some tokens split a character
    s = TextStream(tokenizer)
    pieces = [s.push(t) for t in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_text_pieces_make_the_sampled_story(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=30, seed=3)
    pieces = list(stream_text(model, tokenizer, "Tom had a dog", cfg))
    assert len(pieces) > 1 and "".join(pieces) == generate_text(model, tokenizer, ["Tom had a dog"], cfg)[0]
    with pytest.raises(UserError, match="one story at a time"):
        next(stream_text(model, tokenizer, "Tom", SamplingConfig(num_samples=2)))


def test_top_next_tokens_are_the_softmax_of_the_last_logits(model, tokenizer):
    ids = [tokenizer.eot_id] + tokenizer.encode("Once upon a time")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
    expected, order = probs.topk(5)
    top = top_next_tokens(model, tokenizer, "Once upon a time", k=5)
    assert [text for text, _ in top] == [tokenizer.decode([t]) for t in order.tolist()]
    assert [p for _, p in top] == pytest.approx(expected.tolist(), rel=1e-4)
    cut = top_next_tokens(model, tokenizer, "Once upon a time", k=5, temperature=0.5, top_k=2)
    assert cut[0][1] + cut[1][1] == pytest.approx(1.0) and cut[2][1] == 0.0


def test_load_checkpoint_accepts_run_folder(ckpt, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best").symlink_to(ckpt, target_is_directory=True)
    assert load_checkpoint(run).config.sliding_window == 16
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_cli_streams_the_same_text(ckpt, model, tokenizer, capsys):
    assert main(["generate", str(ckpt), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "20"]) == 0
    expected = generate_text(model, tokenizer, ["Once upon a time"], SamplingConfig(max_new_tokens=20, greedy=True))
    assert capsys.readouterr().out == "Once upon a time" + expected[0] + "\n"


def test_cli_json_batch(ckpt, capsys):
    argv = ["generate", str(ckpt), "--prompt", "A cat", "--prompt", "", "--num-samples", "2",
            "--max-new-tokens", "8", "--seed", "1", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert [(s["prompt"], s["sample"]) for s in first["samples"]] == [("A cat", 0), ("A cat", 1), ("", 0), ("", 1)]
    assert all(len(s["tokens"]) <= 8 for s in first["samples"])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == first["samples"]
    assert main(argv[:-1] + ["--no-stream"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 4 and first["samples"][3]["text"] in out


@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be positive"),
    (["--max-new-tokens", "512"], "below the context length"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--num-samples", "0"], "num_samples must be positive"),
    (["--words", " , "], "--words ' , ': no words"),
    (["--words", "frog", "--features", "Dialogue, Funny"], "unknown feature 'Funny'"),
])
def test_cli_bad_input_is_one_line(ckpt, capsys, flags, message):
    assert main(["generate", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("tinygemma generate: error:")


def test_cli_not_a_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", str(tmp_path)]) == 2
    assert "needs config.json and model.safetensors" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", str(tmp_path)]) == 2
    assert "not a Gemma 3 text model" in capsys.readouterr().err


def test_logits_to_keep_is_the_same_logits(model):
    x = torch.tensor(prompts_of([30], seed=8))
    with torch.no_grad():
        # the head sees 1 row instead of 30: same values up to matmul blocking (float32 rounding)
        torch.testing.assert_close(model(x, logits_to_keep=1), model(x)[:, -1:], rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x, logits_to_keep=0), model(x))


@pytest.mark.slow  # runs torch.compile (tens of seconds of compilation on a CPU)
def test_compiled_decoding_equals_eager(model):
    # the compiled step attends over the whole (masked) buffer, so its shapes never change
    prompts = prompts_of([40, 3, 17])
    cfg = SamplingConfig(max_new_tokens=24, greedy=True)
    assert generate_ids(model, prompts, cfg, compile=True) == generate_ids(model, prompts, cfg)


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch, native_bf16, expected):
    # a T4 or V100 only emulates bf16: auto picks fp32 there (fp16 would overflow Gemma's residual stream)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native_bf16)
    assert inference_dtype("auto", "cuda") == expected and asked == [False]
    assert inference_dtype("auto", "cpu") == torch.float32 and inference_dtype("bf16", "cuda") == torch.bfloat16


def test_dtype_flag(ckpt, capsys):
    assert inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype("bf16", "cpu") == torch.bfloat16
    assert main(["generate", str(ckpt), "--prompt", "Once", "--greedy", "--max-new-tokens", "8", "--dtype", "bf16",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"][0]["tokens"]) > 0
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--dtype", "fp8"])
    assert e.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
