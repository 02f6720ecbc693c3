import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygemma.cli import main
from tinygemma.data.dataset import TokenDataset
from tinygemma.eval.loss import context_use, evaluate_tokens, held_out_stories
from tinygemma.eval.ngrams import repeated_ngram_rate
from tinygemma.eval.samples import (
    mojibake_count,
    nonwords,
    reading_level,
    sample_report,
    write_samples_report,
)
from tinygemma.generate import generate_ids, load_checkpoint
from tinygemma.model import Gemma3, load_model_config
from tinygemma.prompts import TUTORIAL_PROMPTS
from tinygemma.sampling import SamplingConfig


@pytest.fixture(scope="module")
def tiny_data(prepared_sample):
    """8 stories per split: enough windows to test eval, quick to score."""
    return prepared_sample(8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return Gemma3(load_model_config("tiny")).save_pretrained(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)


@torch.no_grad()
def direct_mean_loss(model, tokens, block):
    """Every token once: the stream is <|endoftext|> + split; window w predicts split[w*block:(w+1)*block]."""
    seq = torch.cat([torch.tensor([model.config.eot_token_id]), torch.from_numpy(tokens.astype("int64"))])
    total = 0.0
    for s in range(0, len(tokens), block):
        y = seq[s + 1:s + block + 1]
        x = seq[s:s + len(y)]
        _, loss = model(x[None], y[None])
        total += loss.item() * len(y)
    return total / len(tokens)


def test_eval_equals_direct_computation(model, tiny_data):
    tokens = TokenDataset(tiny_data, "val").tokens
    assert len(tokens) % 100  # a short last window is exercised
    expected = direct_mean_loss(model, tokens, 100)
    for batch in (1, 3, 7):
        res = evaluate_tokens(model, tokens, block_size=100, batch_size=batch)
        assert res["tokens"] == len(tokens) and res["windows"] == math.ceil(len(tokens) / 100)
        assert res["loss"] == pytest.approx(expected, rel=1e-6)
        assert res["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    # deterministic: the same numbers twice
    assert evaluate_tokens(model, tokens, 100, 3)["loss"] == evaluate_tokens(model, tokens, 100, 3)["loss"]


def test_bits_per_byte_on_a_known_text(model, tokenizer):
    stories = ["Lily said “hi” to the café cat. 🐱", "Tom ran.\nThe end."]
    tokens = np.array([t for s in stories for t in tokenizer.encode(s) + [tokenizer.eot_id]])
    n_bytes = sum(len(s.encode("utf-8")) for s in stories) + len(stories)  # each separator is one byte
    res = evaluate_tokens(model, tokens, block_size=7, batch_size=2)
    assert res["bytes"] == n_bytes and res["tokens"] == len(tokens)
    assert res["loss"] == pytest.approx(direct_mean_loss(model, tokens, 7), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * len(tokens) / (n_bytes * math.log(2)), rel=1e-12)


def test_context_use_equals_direct_computation(model, tiny_data):
    eot = model.config.eot_token_id
    stories = held_out_stories(TokenDataset(tiny_data, "val").tokens, eot, count=5, max_len=90)
    assert len(stories) == 5 and max(map(len, stories)) == 90  # a long story was cut
    res = context_use(model, stories, batch_size=2)
    with_sum = without_sum = n = 0.0
    with torch.no_grad():
        for s in stories:
            h = len(s) // 2
            seq = torch.tensor([eot] + s)
            logits = model(seq[None, :-1])[0, h:]  # predictions of s[h:] from <|endoftext|> + s[:k]
            with_sum += F.cross_entropy(logits, seq[1 + h:], reduction="sum").item()
            _, loss = model(torch.tensor([[eot] + s[h:-1]]), torch.tensor([s[h:]]))
            without_sum += loss.item() * (len(s) - h)
            n += len(s) - h
    assert res["tokens"] == n and res["stories"] == 5
    assert res["with_context"] == pytest.approx(with_sum / n, rel=1e-5)
    assert res["without_context"] == pytest.approx(without_sum / n, rel=1e-5)
    assert res["gap"] == pytest.approx(res["without_context"] - res["with_context"])


def test_eval_cli_json(ckpt, model, tiny_data, capsys):
    assert main(["eval", str(ckpt), "--data", str(tiny_data), "--block-size", "128", "--json",
                 "--context-stories", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    tokens = TokenDataset(tiny_data, "val").tokens
    assert res["split"] == "val" and res["tokens"] == len(tokens) and res["tokens_per_s"] > 0
    assert res["loss"] == pytest.approx(direct_mean_loss(model, tokens, 128), rel=1e-6)
    assert res["bits_per_byte"] > 0 and res["context_use"]["stories"] == 3
    assert main(["eval", str(ckpt), "--data", str(tiny_data), "--split", "train"]) == 0
    assert "train: loss" in capsys.readouterr().out


def test_eval_bad_input(ckpt, tiny_data, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("val.bin", "train.bin"):
        (other / name).write_bytes((tiny_data / name).read_bytes())
    meta = json.loads((tiny_data / "meta.json").read_text())
    meta["tokenizer"], meta["bpe_sha256"] = "llama", "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    cases = [(["--data", str(tiny_data), "--block-size", "513"], "above the model's context length 512"),
             (["--data", str(other)], "made with tokenizer 'llama'"),
             ([], "--data is required"),
             (["--data", str(tiny_data), "--split", "test"], "no split 'test'"),
             (["--data", str(tiny_data), "--batch-size", "0"], "batch_size must be positive")]
    for flags, message in cases:
        assert main(["eval", str(ckpt), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["eval", str(tmp_path), "--data", str(tiny_data)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_measures():
    assert repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4, 1]) == (2, 6)
    assert repeated_ngram_rate([1, 2, 3]) == (0, 0)
    assert mojibake_count("Lily said “hi” — café") == 0
    assert mojibake_count("cafÃ© and \ufffd") == 2


def test_spelling():
    text = "Once upon a time, a girl named Zorbina saw a bigg dog. Zorbina didn’t wented home. Flurp said hi."
    # words: 19; unknown: bigg, wented, flurp (capitalised only at a sentence start, so not a name);
    # Zorbina is a name (capitalised mid-sentence), didn’t is a word
    assert nonwords(text) == (3, 19)
    assert nonwords("Flurp said hi.", context="Then Flurp came.") == (0, 3)
    assert nonwords("") == (0, 0)


def test_reading_level():
    # 2 sentences, 11 words, 12 syllables (happy has two): 0.39 * 11/2 + 11.8 * 12/11 - 15.59
    assert reading_level("The cat sat on the mat. It was a happy cat.") == pytest.approx(
        0.39 * 11 / 2 + 11.8 * 12 / 11 - 15.59)
    # 1 sentence, 7 words, 13 syllables (e-le-phant, beau-ti-ful, yes-ter-day)
    assert reading_level("The elephant saw a beautiful bird yesterday.") == pytest.approx(
        0.39 * 7 + 11.8 * 13 / 7 - 15.59)
    assert math.isnan(reading_level("... !"))


def test_samples_report_measures(model, tokenizer, tmp_path):
    cfg = SamplingConfig(max_new_tokens=12, greedy=True)
    first = generate_ids(model, [[tokenizer.eot_id] + tokenizer.encode(TUTORIAL_PROMPTS[0])], cfg)[0]
    old = model.config.eot_token_id
    model.config.eot_token_id = first[3]  # pretend the 4th token ends the story
    model.train()
    try:
        report = write_samples_report(model, tokenizer, tmp_path / "r" / "report.md", cfg=cfg)
    finally:
        model.config.eot_token_id = old
    assert model.training  # restored for the trainer
    model.eval()
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == TUTORIAL_PROMPTS
    assert samples[0]["token_ids"] == first[:3] and samples[0]["ended_with_eot"]
    ended = sum(s["ended_with_eot"] for s in samples)
    assert report["overall"]["ended_with_eot"] == pytest.approx(ended / 5)
    # mean token loss of sample 0: its three tokens and the end of the story, under the model itself
    ids = torch.tensor([[tokenizer.eot_id] + tokenizer.encode(TUTORIAL_PROMPTS[0]) + first[:4]])
    with torch.no_grad():
        logits = model(ids)[0, -5:-1]
    assert samples[0]["mean_token_loss"] == pytest.approx(F.cross_entropy(logits, ids[0, -4:]).item(), rel=1e-5)
    for s in samples:
        rep, total = repeated_ngram_rate(s["token_ids"])
        assert s["repeated_4gram_rate"] == pytest.approx(rep / total if total else 0.0)
        bigrams = list(zip(s["token_ids"], s["token_ids"][1:], strict=False))
        assert s["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
        assert s["text"] == tokenizer.decode(s["token_ids"])
    md = (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    for p in TUTORIAL_PROMPTS:
        assert p in md and p in html
    assert "distinct-2" in md and "<table>" in html and "Flesch-Kincaid grade" in md
    for s in samples:
        bad, words = nonwords(s["text"], context=s["prompt"] + s["text"])
        assert s["nonwords_per_100"] == (pytest.approx(100 * bad / words) if words else pytest.approx(math.nan,
                                                                                                        nan_ok=True))


def test_samples_seeded_report_is_reproducible(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, seed=5, num_samples=2)
    a = sample_report(model, tokenizer, ["Tom had a red ball."], cfg)
    assert a == sample_report(model, tokenizer, ["Tom had a red ball."], cfg)
    assert len(a["samples"]) == 2 and a["overall"]["samples"] == 2


def test_samples_cli(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The dog found a <shiny> *star*\n\n")
    out = tmp_path / "out" / "samples.md"
    assert main(["samples", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6"]) == 0
    assert "wrote" in capsys.readouterr().out
    md = out.read_text()
    assert md.count("\n## ") == 6 and r"The dog found a \<shiny\> \*star\*" in md
    assert "The dog found a &lt;shiny&gt; *star*" in out.with_suffix(".html").read_text()
    assert main(["samples", str(ckpt), "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read prompts" in capsys.readouterr().err


def test_report_accepts_a_compiled_training_model(model, tokenizer):
    wrapped = torch.compile(model)  # not run: the report must use the plain model inside
    cfg = SamplingConfig(max_new_tokens=5, greedy=True)
    assert sample_report(wrapped, tokenizer, ["Hi"], cfg) == sample_report(model, tokenizer, ["Hi"], cfg)
