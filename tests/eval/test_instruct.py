"""TinyStories-Instruct: parsing, prompts, derived instructions, prepared records, reading, measuring."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.dataset import TokenDataset
from tinygemma.data.instruct import prepare_instruct, read_records
from tinygemma.eval.instruct import check_story, masked_loss, uses_word, wilson
from tinygemma.prompts import Malformed, Record, build_prompt, derive_record, parse_record, stem
from tinygemma.train.sampler import PAD_MULTIPLE, InstructDataset

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories-instruct" / \
    "TinyStories-Instruct-sample.txt"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def raw() -> str:
    if not FIXTURE.is_file():
        pytest.fail(f"TinyStories-Instruct fixture not found at {FIXTURE}")
    return FIXTURE.read_text(encoding="utf-8")


def _story_bytes(raw: str, k: int) -> str:
    """Record k's story exactly as the file has it: after 'Story: ' and the blank line, up to the separator."""
    record = raw.split(f"\n{EOT}\n")[k]
    return record.split("Story: \n\n", 1)[1]


def test_real_records_parse_exactly(raw):
    texts = [t for t in raw.split(EOT) if t.strip()]
    a, b = parse_record(texts[0]), parse_record(texts[1])
    assert a.features == ["Dialogue"] and a.words == ["quit", "oak", "gloomy"] and a.sentence is None
    assert a.summary.startswith("Sara and Ben were playing in the park") and a.summary.endswith("hot cocoa.")
    assert a.order == ["features", "words", "summary"]
    assert b.features == ["Dialogue", "BadEnding", "MoralValue"] and b.words == ["ride", "work", "upset"]
    assert b.order == ["summary", "words", "features"]
    assert b.summary.endswith("The moral of the story is not to steal.")
    for k, rec in enumerate((a, b)):
        assert rec.story == _story_bytes(raw, k)
        assert rec.story.encode() in raw.encode()
    assert a.story.startswith("Sara and Ben were playing") and b.story.endswith("what is best for you.")


def test_prompt_builder_gives_the_dataset_layout(raw):
    """The header as the file has it (each record's own order), 'Story: ' with its space, a blank line."""
    for text in (t for t in raw.split(EOT) if t.strip()):
        rec = parse_record(text)
        assert text.strip("\n").startswith(rec.prompt()) and rec.prompt() + rec.story == text.strip("\n")
    assert build_prompt(words=["frog", "jump", "shiny"], features=["dialogue"], sentence="It was hot.") == (
        "Features: Dialogue\nWords: frog, jump, shiny\nRandom sentence: It was hot.\nStory: \n\n")
    assert build_prompt() == "Story: \n\n"
    with pytest.raises(UserError, match="unknown feature 'Funny'"):
        build_prompt(features=["Funny"])


def test_header_order_missing_fields_and_line_endings():
    text = "Random sentence: The sun was hot.\nWords: sun, hot, play\nStory: \n\nThe sun was hot. They play.\n"
    rec = parse_record(text)
    assert (rec.sentence, rec.words, rec.features, rec.summary) == ("The sun was hot.", ["sun", "hot", "play"], [],
                                                                   None)
    assert rec.order == ["sentence", "words"] and rec.story == "The sun was hot. They play."
    assert parse_record(text.replace("\n", "\r\n")) == rec
    assert parse_record(text.replace("Story: \n", "Story:\n")) == rec  # no trailing space
    assert parse_record("Story: \n\nJust a story.").story == "Just a story."
    for bad, why in [("Words: a, b, c\nThe end.", "no 'Story:' line"), ("Words: a\nStory: \n\n  ", "empty story"),
                     ("Mood: happy\nStory: \n\nHi.", "unknown header line"),
                     ("Features: Funny\nStory: \n\nHi.", "unknown feature"),
                     ("Words: a\nWords: b\nStory: \n\nHi.", "repeated Words: line")]:
        with pytest.raises(Malformed, match=why):
            parse_record(bad)
    assert parse_record("Words: ,\nFeatures: \nStory: \n\nHi.") == Record(story="Hi.")  # empty lines ask nothing


def test_derived_instructions(sample_stories):
    story = ('Tom saw a red ball. He ran to the ball and kicked it high. "Look!" said Tom. The ball flew over the '
             'fence and landed in the garden. The moral of the story is to play safely.')
    rec = derive_record(story, seed=1)
    assert rec == derive_record(story, seed=1) and rec.summary is None
    assert rec.features == ["Dialogue", "MoralValue"]
    assert len(rec.words) == 3 and len({stem(w) for w in rec.words}) == 3
    assert all(w.islower() and w != "tom" and w in story for w in rec.words)
    assert rec.sentence in story and '"' not in rec.sentence
    assert check_story(rec, story) == {"words": True, "sentence": True, "dialogue": True}
    assert sorted(rec.order) == ["features", "sentence", "words"]
    assert derive_record("A cat sat.", seed=1) == Record(story="A cat sat.")
    words = {tuple(derive_record(s, seed=1).words) for s in sample_stories["val"][:20]}
    assert len(words) == 20  # seeded per story, not one choice for all
    assert {tuple(derive_record(s, seed=2).words) for s in sample_stories["val"][:20]} != words


def test_inflections_match():
    for base, forms in [("jump", "jumps jumped jumping"), ("cry", "cries cried crying"), ("run", "runs ran running"),
                        ("hope", "hopes hoped hoping"), ("stop", "stopped stopping"), ("box", "boxes"),
                        ("go", "goes went going gone"), ("ride", "rode riding rides"), ("fall", "fell falling"),
                        ("puppy", "puppies"), ("kiss", "kissed kisses")]:
        for form in forms.split():
            assert stem(form) == stem(base), (base, form)
            assert uses_word(f"Once, she {form} there.", base), (base, form)
    assert not uses_word("The jumpy dog ran.", "jump")
    assert not uses_word("He sang a song.", "sing song bird")  # every part of a multi-word entry
    assert uses_word("He SANG.", "sing")


def test_wilson_interval():
    # by definition, the bounds are the p0 at which the score test |p - p0| / sqrt(p0 (1 - p0) / n) equals z
    for k, n in [(47, 100), (3, 20), (1, 5)]:
        for p0 in wilson(k, n):
            assert abs(k / n - p0) / (p0 * (1 - p0) / n) ** 0.5 == pytest.approx(1.96, rel=1e-9)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def _instruct_folder(tmp_path: Path, raw: str, extra_train: str = "") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "TinyStories-Instruct-train.txt").write_text(raw + extra_train, encoding="utf-8")
    (src / "TinyStories-Instruct-valid.txt").write_text(raw.replace("\n", "\r\n"), encoding="utf-8", newline="")
    return src


def test_prepare_instruct_writes_records_and_mask(tmp_path, raw, tokenizer, capsys):
    malformed = f"Words: a, b\nno story line here\n{EOT}\nMood: odd\nStory: \n\nHi.\n{EOT}\n"
    src = _instruct_folder(tmp_path, raw, malformed)
    out = tmp_path / "out"
    meta = prepare_instruct(PrepareConfig(source=str(src), out=str(out), workers=1), InstructOptions(instruct=True))
    assert "train: skipped 2 malformed records (1 no 'Story:' line, 1 unknown header line)" in capsys.readouterr().err
    assert meta["format"] == "instruct" and meta["prompt_version"] == 1
    assert meta["splits"]["train"]["records"] == 2 and meta["splits"]["train"]["skipped"] == 2
    assert meta["splits"]["val"]["records"] == 2 and meta["splits"]["val"]["truncated"] == 0
    texts = [t for t in raw.split(EOT) if t.strip()]
    for split in ("train", "val"):  # the CRLF val file gives the same records
        ds = InstructDataset(out, split)
        assert len(ds) == 2
        for k, text in enumerate(texts):
            rec = parse_record(text)
            ids, mask = ds.record(k)
            prompt = [tokenizer.eot_id] + tokenizer.encode(rec.prompt())
            story = tokenizer.encode(rec.story) + [tokenizer.eot_id]
            assert ids.tolist() == prompt + story
            assert mask.tolist() == [0] * len(prompt) + [1] * len(story)  # the story and the final end-of-text
            assert tokenizer.decode(ids[mask == 1][:-1].tolist()) == rec.story
    assert [r.story for r in read_records(out)] == [parse_record(t).story for t in texts]
    assert not list(out.glob("*.tmp"))


def test_max_stories_counts_only_the_malformed_records_read(tmp_path, raw):
    """--max-stories N stops after the N-th kept record: malformed ones after it are never read, so not counted."""
    bad = f"Words: a, b\nno story line here\n{EOT}\n"
    records = [t.strip("\n") + f"\n{EOT}\n" for t in raw.split(EOT) if t.strip()]
    src = tmp_path / "src"
    src.mkdir()
    (src / "TinyStories-Instruct-train.txt").write_text(bad + records[0] + bad + records[1] + bad, encoding="utf-8")
    (src / "TinyStories-Instruct-valid.txt").write_text(raw, encoding="utf-8")
    for limit, skipped in ((1, 1), (2, 2), (None, 3)):
        meta = prepare_instruct(PrepareConfig(source=str(src), out=str(tmp_path / f"o{limit}"), workers=1,
                                              max_stories=limit), InstructOptions(instruct=True))
        assert meta["splits"]["train"]["records"] == (limit or 2) and meta["splits"]["train"]["skipped"] == skipped


def test_hub_path_downloads_the_instruct_files(tmp_path, raw, monkeypatch):
    """Without a local source, the two .txt files come from roneneldan/TinyStories (here: local copies)."""
    import huggingface_hub

    src = _instruct_folder(tmp_path, raw)
    asked = []

    def download(repo_id, filename, repo_type=None):
        asked.append((repo_id, filename, repo_type))
        return str(src / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert main(["prepare", "--instruct", "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert asked == [("roneneldan/TinyStories", "TinyStories-Instruct-train.txt", "dataset"),
                     ("roneneldan/TinyStories", "TinyStories-Instruct-valid.txt", "dataset")]
    assert len(InstructDataset(tmp_path / "o", "val")) == 2


def test_max_record_tokens_truncates(tmp_path, raw):
    src = _instruct_folder(tmp_path, raw)
    meta = prepare_instruct(PrepareConfig(source=str(src), out=str(tmp_path / "o"), workers=1),
                            InstructOptions(instruct=True, max_record_tokens=300))
    assert meta["splits"]["train"]["truncated"] == 2 and meta["splits"]["train"]["tokens"] == 600
    ids, mask = InstructDataset(tmp_path / "o", "train").record(0)
    assert len(ids) == 300 and ids[-1] != 50256 and mask[-1] == 1


def test_batch_targets_follow_the_mask(tmp_path, raw):
    src = _instruct_folder(tmp_path, raw)
    prepare_instruct(PrepareConfig(source=str(src), out=str(tmp_path / "o"), workers=1), InstructOptions(instruct=True))
    ds = InstructDataset(tmp_path / "o", "train", vocab_size=50257)
    ids, mask = ds.record(0)
    n, other = len(ids), len(ds.record(1)[0])
    width = -(-(max(n, other) - 1) // PAD_MULTIPLE) * PAD_MULTIPLE  # the longest row, rounded up
    x, y = ds.batch(np.array([0, 1]), 1024)  # a block longer than both records: padded to the longest
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, width) and width < 1024
    assert x[0, :n - 1].tolist() == ids[:-1].tolist() and (x[0, n - 1:] == 50256).all()
    expect = [int(t) if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert y[0, :n - 1].tolist() == expect and (y[0, n - 1:] == -100).all()
    assert ds.batch(np.array([0, 1]), width - 3)[0].shape == (2, width - 3)  # never past the block
    x, y = ds.batch(np.array([0]), 50)  # shorter than the record: cut from the end
    assert x.shape == (1, 50) and x[0].tolist() == ids[:50].tolist()
    assert y[0].tolist() == [int(t) if m else -100 for t, m in zip(ids[1:51], mask[1:51], strict=True)]


def test_derive_instructions_prepares_plain_stories(tmp_path, sample_dir):
    out = tmp_path / "derived"
    assert main(["prepare", "--derive-instructions", "--source", str(sample_dir), "--out", str(out),
                 "--max-stories", "20", "--workers", "2", "--seed", "3"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["instructions"] == "derived from stories" and meta["splits"]["val"]["records"] == 20
    assert "--derive-instructions" in meta["command"]
    records = read_records(out)
    stories = [s.strip() for s in (sample_dir / "TinyStories-valid.txt").read_text().split(EOT) if s.strip()][:20]
    assert [r.story for r in records] == stories
    assert [r for r in records] == [derive_record(s, 3) for s in stories]  # same records, same tokenising path
    assert sum(bool(r.words) for r in records) >= 18 and not any(r.summary for r in records)


def test_instruct_share_mixes_instructed_and_plain_records(tmp_path, sample_dir, capsys):
    """--instruct-share F: each record is either the derived record (instruction lines kept) or the control's
    (--no-headers: "Story:" only), the same in both splits' files, a seeded choice near share F."""
    folders = {}
    for name, flags in (("full", []), ("control", ["--no-headers"]), ("mix", ["--instruct-share", "0.3"]),
                        ("again", ["--instruct-share", "0.3", "--workers", "1"])):
        folders[name] = tmp_path / name
        assert main(["prepare", "--derive-instructions", "--source", str(sample_dir), "--out", str(folders[name]),
                     "--max-stories", "200", "--workers", "2", *flags]) == 0
    full, control, mix, again = (read_records(folders[n]) for n in ("full", "control", "mix", "again"))
    kept = [m == f for m, f in zip(mix, full, strict=True)]
    assert all(k or m == c for k, m, c in zip(kept, mix, control, strict=True))
    assert mix == again and 0.2 * 200 <= sum(kept) <= 0.4 * 200  # 0.3 +- 3.1 sigma of a binomial
    ds = {n: InstructDataset(folders[n], "val") for n in ("full", "control", "mix")}
    for k, keep in enumerate(kept):  # the tokens and mask too
        ids, mask = ds["mix"].record(k)
        want_ids, want_mask = ds["full" if keep else "control"].record(k)
        assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
    meta = json.loads((folders["mix"] / "meta.json").read_text())
    assert meta["instruct_share"] == 0.3 and meta["headers"] is True
    capsys.readouterr()
    for bad in ("0", "1.5", "-1", "nan"):
        assert main(["prepare", "--derive-instructions", "--instruct-share", bad, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--instruct-share must be in (0, 1], got {float(bad)}" in err[0]
    for flags, why in ((["--derive-instructions", "--no-headers"], "exclude each other"),
                       ([], "goes with --instruct or --derive-instructions")):
        assert main(["prepare", *flags, "--instruct-share", "0.5", "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]
    assert not (tmp_path / "b").exists()


def test_bad_inputs(tmp_path, raw, data_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "TinyStories-Instruct-train.txt").write_text(f"Words: a\nno story\n{EOT}\nHello\n{EOT}\n")
    (src / "TinyStories-Instruct-valid.txt").write_text(raw)
    assert main(["prepare", "--instruct", "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no train records; 2 malformed (2 no 'Story:' line)" in err and not (tmp_path / "o").exists()
    (src / "TinyStories-Instruct-valid.txt").write_text("")
    assert main(["prepare", "--instruct", "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "TinyStories-Instruct-valid.txt: empty file" in capsys.readouterr().err
    (src / "TinyStories-Instruct-valid.txt").unlink()
    assert main(["prepare", "--instruct", "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "has only TinyStories-Instruct-train.txt" in capsys.readouterr().err
    assert main(["prepare", "--instruct", "--derive-instructions", "--source", str(src)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"plain token data, not instruct records; .*prepare --instruct"):
        InstructDataset(data_dir, "train")
    (tmp_path / "x").mkdir()
    src2 = _instruct_folder(tmp_path / "x", raw)
    prepare_instruct(PrepareConfig(source=str(src2), out=str(tmp_path / "ok"), workers=1),
                     InstructOptions(instruct=True))
    capsys.readouterr()
    with pytest.raises(UserError, match="instruct data .*`tinygemma train` or `tinygemma finetune`"):
        TokenDataset(tmp_path / "ok", "train")


def test_masked_loss_equals_direct_computation(tmp_path, raw):
    from tinygemma.model import Gemma3, load_model_config

    src = _instruct_folder(tmp_path, raw)
    prepare_instruct(PrepareConfig(source=str(src), out=str(tmp_path / "o"), workers=1), InstructOptions(instruct=True))
    ds = InstructDataset(tmp_path / "o", "val")
    torch.manual_seed(0)
    model = Gemma3(load_model_config("tiny")).eval()
    loss, count = masked_loss(model, ds, np.arange(2), batch_size=1)
    padded = masked_loss(model, ds, np.arange(2), batch_size=2)  # the shorter record padded to the longer
    total, n = 0.0, 0
    with torch.no_grad():
        for k in range(2):
            ids, mask = ds.record(k)
            ids = torch.from_numpy(ids.astype(np.int64))
            keep = torch.from_numpy(mask[1:].astype(bool))
            logits = model(ids[None, :-1])[0]
            total += F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum").item()
            n += int(keep.sum())
    assert count == n == int(sum(ds.record(k)[1].sum() for k in range(2)))
    assert loss == pytest.approx(total / n, rel=1e-5) and padded[0] == pytest.approx(total / n, rel=1e-5)
    assert padded[1] == n


@pytest.fixture(scope="module")
def derived_dir(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("derived")
    prepare_instruct(PrepareConfig(source=str(sample_dir), out=str(out), max_stories=6, workers=1),
                     InstructOptions(derive_instructions=True))
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tinygemma.model import Gemma3, load_model_config

    torch.manual_seed(0)
    return Gemma3(load_model_config("tiny")).save_pretrained(tmp_path_factory.mktemp("ckpt"))


def test_evaluate_instructions(tiny_ckpt, derived_dir, tokenizer, tmp_path, capsys):
    from tinygemma.eval.instruct import evaluate_instructions
    from tinygemma.generate import generate_rows, load_checkpoint
    from tinygemma.sampling import SamplingConfig

    model = load_checkpoint(tiny_ckpt)
    sampling = SamplingConfig(max_new_tokens=12, seed=5)
    res = evaluate_instructions(model, tokenizer, derived_dir, n=4, sampling=sampling, batch_size=2,
                                out=tmp_path / "instruct_eval.json")
    assert json.loads((tmp_path / "instruct_eval.json").read_text()) == json.loads(json.dumps(res))
    records = read_records(derived_dir)[:4]
    # the stories are those of the records' prompts, seeded per batch of 2
    first, _ = generate_rows(model, [[50256] + tokenizer.encode(r.prompt()) for r in records[:2]],
                             SamplingConfig(max_new_tokens=12, seed=5))
    assert [s["story"] for s in res["samples"][:2]] == [tokenizer.decode(ids) for ids in first]
    # the samples report's measures of the stories, pooled: share ended by <|endoftext|>, repeated 4-grams
    rows = [generate_rows(model, [[50256] + tokenizer.encode(r.prompt()) for r in records[b:b + 2]],
                          SamplingConfig(max_new_tokens=12, seed=5 + b // 2)) for b in (0, 2)]
    tokens, ended = rows[0].tokens + rows[1].tokens, rows[0].ended + rows[1].ended
    assert [s["ended_with_eot"] for s in res["samples"]] == ended and res["ended_with_eot"] == sum(ended) / 4
    grams = [[tuple(ids[i:i + 4]) for i in range(len(ids) - 3)] for ids in tokens]
    repeats = sum(len(g) - len(set(g)) for g in grams)
    assert res["repeated_4gram_rate"] == pytest.approx(repeats / sum(map(len, grams)))
    checks = [check_story(r, s["story"]) for r, s in zip(records, res["samples"], strict=True)]
    words = [c["words"] for c in checks if "words" in c]
    assert res["constraints"]["words"]["n"] == len(words) and res["constraints"]["words"]["satisfied"] == sum(words)
    assert res["overall"]["n"] == sum(bool(c) for c in checks)
    loss, count = masked_loss(model, InstructDataset(derived_dir, "val"), np.arange(4))
    assert res["story_loss"] == pytest.approx(loss) and res["story_tokens"] == count
    # the CLI calls the same function and prints one line per measure
    assert main(["eval", str(tiny_ckpt), "--instruct", str(derived_dir), "--records", "2",
                 "--instruct-max-new-tokens", "8", "--report", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "story loss" in out and "repeated 4-grams" in out
    assert json.loads((tmp_path / "e.json").read_text())["records"] == 2
    assert main(["samples", str(tiny_ckpt), "--out", str(tmp_path / "s.md"), "--max-new-tokens", "8",
                 "--instruct", str(derived_dir), "--records", "1", "--instruct-max-new-tokens", "8"]) == 0
    md = (tmp_path / "s.md").read_text()
    assert "## Instructions" in md and "### Record 1" in md and "Instructions</h2>" in (tmp_path / "s.html").read_text()


def test_generate_with_instructions(tiny_ckpt, tokenizer, capsys):
    from tinygemma.generate import generate_text, load_checkpoint
    from tinygemma.sampling import SamplingConfig

    assert main(["generate", str(tiny_ckpt), "--words", "frog, jump,shiny", "--features", "dialogue",
                 "--sentence", "The frog  was happy.", "--prompt", "Once", "--greedy", "--max-new-tokens", "6"]) == 0
    prompt = ("Features: Dialogue\nWords: frog, jump, shiny\nRandom sentence: The frog was happy.\nStory: \n\nOnce")
    expected = generate_text(load_checkpoint(tiny_ckpt), tokenizer, [prompt], SamplingConfig(max_new_tokens=6,
                                                                                           greedy=True))[0]
    assert capsys.readouterr().out == prompt + expected + "\n"
