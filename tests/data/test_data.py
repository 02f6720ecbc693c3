"""`tinygemma prepare` and TokenDataset on the real TinyStories sample, checked against direct tiktoken encoding."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.data import sources, writer
from tinygemma.data.config import PrepareConfig
from tinygemma.data.dataset import TokenDataset
from tinygemma.data.prepare import prepare
from tinygemma.data.sources import repair_mojibake

EOT = 50256
SRC = Path(__file__).resolve().parents[2] / "src"


def _bytes(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in ("train.bin", "val.bin")}


def _write_txt(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def _expected_tokens(tokenizer, stories: list[str]) -> np.ndarray:
    ids = []
    for s in stories:
        ids += tokenizer.enc.encode_ordinary(repair_mojibake(s.strip())) + [EOT]
    return np.array(ids, dtype=np.uint16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("prepared")
    meta = prepare(PrepareConfig(source=str(sample_dir), out=str(out), workers=1))
    return out, meta


@pytest.fixture
def small_dir(tmp_path, sample_stories):
    d = tmp_path / "small"
    d.mkdir()
    _write_txt(d / "TinyStories-train.txt", sample_stories["train"][:40])
    _write_txt(d / "TinyStories-valid.txt", sample_stories["val"][:10])
    return d


# --- the real sample ---------------------------------------------------------------------------


def test_sample_tokens_equal_direct_tiktoken(prepared, sample_stories, tokenizer):
    out, meta = prepared
    for split in ("train", "val"):
        ds = TokenDataset(out, split, vocab_size=50257)
        expected = _expected_tokens(tokenizer, sample_stories[split])
        np.testing.assert_array_equal(np.asarray(ds.tokens), expected)
        info = meta["splits"][split]
        assert info["stories"] == len(sample_stories[split]) == int((expected == EOT).sum())
        assert info["tokens"] == len(expected)
        assert info["sha256"] == hashlib.sha256((out / info["file"]).read_bytes()).hexdigest()
    assert (meta["splits"]["train"]["stories"], meta["splits"]["val"]["stories"]) == (6581, 800)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"


def test_val_decodes_back_to_the_stories_in_order(prepared, sample_stories, tokenizer):
    tokens = np.asarray(TokenDataset(prepared[0], "val").tokens)
    assert tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    stories = [tokenizer.decode(t.tolist()) for t in np.split(tokens, ends + 1)[:-1]]
    assert [s[:-len("<|endoftext|>")] for s in stories] == [repair_mojibake(s) for s in sample_stories["val"]]


def test_mojibake_repaired_and_counted_legit_text_untouched(prepared, sample_stories, tokenizer):
    out, meta = prepared
    broken = {split: [s for s in stories if "â€" in s] for split, stories in sample_stories.items()}
    assert (len(broken["train"]), len(broken["val"])) == (34, 40)
    assert meta["normalisation"]["fix_text"] is True
    assert meta["normalisation"]["stories_changed"] == 74
    text = tokenizer.decode(np.asarray(TokenDataset(out, "val").tokens).tolist())
    assert "â€" not in text and "Ben’s boat" in text and "“Who are you?”" in text
    # Only mojibake changes: every other story (curly quotes, dashes, "¡Atrapar!") is kept as it is,
    # unlike ftfy's defaults, which straighten quotes and turn a bare "â€ " into a dagger.
    for stories in sample_stories.values():
        assert [s for s in stories if repair_mojibake(s) != s] == [s for s in stories if "â€" in s]
    assert repair_mojibake("“Curly” ‘quotes’ — ﬁne…") == "“Curly” ‘quotes’ — ﬁne…"
    assert repair_mojibake("He said, â€œHi.â€ Then â€œyes!â€\nIâ€™m") == "He said, “Hi.” Then “yes!”\nI’m"


def test_repaired_count_covers_only_the_stories_kept(data_dir, sample_stories):
    """--max-stories 300 keeps the first 300 stories of each split: only their repairs are counted."""
    meta = json.loads((data_dir / "meta.json").read_text())
    expected = sum(repair_mojibake(s) != s for stories in sample_stories.values() for s in stories[:300])
    assert 0 < expected < 74
    assert meta["normalisation"]["stories_changed"] == expected


def test_no_fix_text_keeps_the_bytes(small_dir, tmp_path, tokenizer):
    _write_txt(small_dir / "TinyStories-valid.txt", ["Benâ€™s boat.", "Fine."])
    meta = prepare(PrepareConfig(source=str(small_dir), out=str(tmp_path / "o"), fix_text=False, workers=1))
    assert meta["normalisation"]["stories_changed"] == 0
    assert tokenizer.decode(TokenDataset(tmp_path / "o", "val").tokens.tolist()).startswith("Benâ€™s boat.")


@pytest.mark.slow
def test_workers_give_identical_files(prepared, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BATCH_BYTES", 50_000)  # many tasks, shared between the pool and this process
    for workers in (2, 3):
        prepare(PrepareConfig(source=str(sample_dir), out=str(tmp_path / f"w{workers}"), workers=workers))
        assert _bytes(tmp_path / f"w{workers}") == _bytes(prepared[0]), workers


def test_streaming_reader_chunk_boundaries(prepared, sample_dir, tmp_path, monkeypatch):
    # Reads smaller than the separator and tiny batches: the separator straddles every boundary.
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    monkeypatch.setattr(sources, "BATCH_BYTES", 5000)
    d = tmp_path / "src"
    d.mkdir()
    for name in ("TinyStories-train.txt", "TinyStories-valid.txt"):
        (d / name).write_bytes((sample_dir / "TinyStories-valid.txt").read_bytes())
    prepare(PrepareConfig(source=str(d), out=str(tmp_path / "o"), workers=1))
    assert (tmp_path / "o" / "val.bin").read_bytes() == (prepared[0] / "val.bin").read_bytes()


def test_max_stories(prepared, sample_dir, tmp_path):
    meta = prepare(PrepareConfig(source=str(sample_dir), out=str(tmp_path / "m"), max_stories=100, workers=2))
    for split in ("train", "val"):
        assert meta["splits"][split]["stories"] == 100
        full = np.asarray(TokenDataset(prepared[0], split).tokens)
        cut = np.flatnonzero(full == EOT)[99] + 1
        np.testing.assert_array_equal(np.asarray(TokenDataset(tmp_path / "m", split).tokens), full[:cut])


# --- other published forms ---------------------------------------------------------------------


def test_jsonl_json_and_hub_parquet_give_the_txt_tokens(prepared, sample_stories, tmp_path):
    jl = tmp_path / "jsonl"
    jl.mkdir()
    for split, name in (("train", "train.jsonl"), ("val", "valid.jsonl")):
        (jl / name).write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_stories[split]))
    js = tmp_path / "json"  # the original archive's form: a JSON array of records with a "story" field
    js.mkdir()
    for split, name in (("train", "train.json"), ("val", "validation.json")):
        (js / name).write_text(json.dumps([{"story": s, "instruction": {}} for s in sample_stories[split]]))
    hub = tmp_path / "hub"  # the hub's layout, read through datasets like the hub itself
    (hub / "data").mkdir(parents=True)
    for split, name in (("train", "train-00000-of-00001.parquet"), ("val", "validation-00000-of-00001.parquet")):
        pq.write_table(pa.table({"text": sample_stories[split]}), hub / "data" / name)
    for src in (jl, js, hub):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / f"out-{src.name}"), workers=2))
        assert _bytes(tmp_path / f"out-{src.name}") == _bytes(prepared[0]), src.name


def test_special_token_text_inside_a_record_is_ordinary_text(tmp_path, tokenizer):
    # JSON records may contain the text "<|endoftext|>": it is encoded as plain text, as encode_ordinary does
    stories = ["Tom wrote <|endoftext|> on the wall.", "Sue said <|endoftext|><|endoftext|> twice."]
    for name in ("train.jsonl", "valid.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    prepare(PrepareConfig(source=str(tmp_path), out=str(tmp_path / "o"), workers=1))
    expected = [t for s in stories for t in tokenizer.enc.encode_ordinary(s) + [EOT]]
    assert TokenDataset(tmp_path / "o", "val").tokens.tolist() == expected


def test_hub_dataset_code_path(prepared, sample_stories, tmp_path, monkeypatch):
    import datasets

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": sample_stories["train"][:300]}), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": sample_stories["val"]}), hub / "data" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": sample_stories["train"][300:]}), hub / "data" / "train-00001-of-00002.parquet")
    calls = []
    real = datasets.load_dataset

    def fake_load(path, **kw):  # the hub, served from the local copy of its layout
        calls.append((path, kw))
        assert path == "roneneldan/TinyStories"
        return real(str(hub), cache_dir=str(tmp_path / "cache"), **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    prepare(PrepareConfig(out=str(tmp_path / "full"), workers=2))
    assert calls[-1] == ("roneneldan/TinyStories", {"streaming": False})
    assert _bytes(tmp_path / "full") == _bytes(prepared[0])
    meta = prepare(PrepareConfig(out=str(tmp_path / "part"), max_stories=500, workers=1))
    assert calls[-1] == ("roneneldan/TinyStories", {"streaming": True})
    assert meta["splits"]["train"]["stories"] == meta["splits"]["val"]["stories"] == 500


def test_hub_offline_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="roneneldan/TinyStories: cannot load the dataset"):
        prepare(PrepareConfig(out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_v2_local_names_and_hub_files(sample_stories, tmp_path, monkeypatch, tokenizer):
    import huggingface_hub

    d = tmp_path / "v2"
    d.mkdir()
    _write_txt(d / "TinyStoriesV2-GPT4-train.txt", sample_stories["train"][:30])
    _write_txt(d / "TinyStoriesV2-GPT4-valid.txt", sample_stories["val"][:5])
    meta = prepare(PrepareConfig(source=str(d), out=str(tmp_path / "a"), workers=1))
    assert meta["inputs"][0].endswith("TinyStoriesV2-GPT4-train.txt") and meta["splits"]["val"]["stories"] == 5
    _write_txt(d / "TinyStories-train.txt", ["V1 story."])
    _write_txt(d / "TinyStories-valid.txt", ["V1 story."])
    assert prepare(PrepareConfig(source=str(d), out=str(tmp_path / "b"), workers=1))["splits"]["val"]["stories"] == 1
    assert prepare(PrepareConfig(source=str(d), out=str(tmp_path / "c"), v2=True, workers=1))["splits"]["val"][
        "stories"] == 5

    downloads = []

    def fake_download(repo_id, filename, repo_type=None):
        downloads.append((repo_id, filename, repo_type))
        return str(d / filename)

    class FakeFS:  # HfFileSystem's streaming open, served from the local files
        def open(self, path, mode):
            assert path.startswith("datasets/roneneldan/TinyStories/") and mode == "rb"
            return open(d / path.rsplit("/", 1)[1], mode)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeFS)
    meta = prepare(PrepareConfig(out=str(tmp_path / "h"), v2=True, workers=1))
    assert downloads == [("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt", "dataset"),
                         ("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt", "dataset")]
    assert _bytes(tmp_path / "h") == _bytes(tmp_path / "c")
    meta = prepare(PrepareConfig(out=str(tmp_path / "s"), v2=True, max_stories=3, workers=1))
    assert meta["splits"]["train"]["stories"] == 3 and len(downloads) == 2


def test_single_file_is_split_deterministically(sample_dir, sample_stories, tmp_path, tokenizer):
    src = str(sample_dir / "TinyStories-train.txt")
    meta = prepare(PrepareConfig(source=src, out=str(tmp_path / "a"), workers=1))
    n_train, n_val = meta["splits"]["train"]["stories"], meta["splits"]["val"]["stories"]
    assert n_train + n_val == 6581 and 0.04 < n_val / 6581 < 0.06
    assert meta["split"] == {"method": "blake2b(story, key=seed) < val_fraction", "val_fraction": 0.05,
                             "seed": 1337}
    prepare(PrepareConfig(source=src, out=str(tmp_path / "b"), workers=2))
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    prepare(PrepareConfig(source=src, out=str(tmp_path / "c"), workers=1, seed=7))
    assert _bytes(tmp_path / "c") != _bytes(tmp_path / "a")
    # Each story lands in exactly one split, in source order.
    val = tokenizer.decode(TokenDataset(tmp_path / "a", "val").tokens.tolist()).split("<|endoftext|>")[:-1]
    train = tokenizer.decode(TokenDataset(tmp_path / "a", "train").tokens.tolist()).split("<|endoftext|>")[:-1]
    stories = [repair_mojibake(s) for s in sample_stories["train"]]
    assert [s for s in stories if s in set(val)] == val
    assert sorted(train + val) == sorted(stories)


# --- re-runs, atomicity, verification -----------------------------------------------------------


def test_rerun_is_a_noop_unless_force_or_changed(small_dir, tmp_path, capsys):
    out = tmp_path / "o"
    meta = prepare(PrepareConfig(source=str(small_dir), out=str(out), workers=1))
    mtime = (out / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert prepare(PrepareConfig(source=str(small_dir), out=str(out), workers=2)) == meta
    assert "up to date" in capsys.readouterr().err and (out / "train.bin").stat().st_mtime_ns == mtime
    prepare(PrepareConfig(source=str(small_dir), out=str(out), force=True, workers=1))
    assert "up to date" not in capsys.readouterr().err and (out / "train.bin").stat().st_mtime_ns != mtime
    assert prepare(PrepareConfig(source=str(small_dir), out=str(out), max_stories=5))["splits"]["train"][
        "stories"] == 5


@pytest.mark.slow
def test_killed_mid_way_then_rerun_is_byte_identical(sample_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "TinyStories-train.txt").write_bytes((sample_dir / "TinyStories-train.txt").read_bytes() * 3)
    shutil.copy(sample_dir / "TinyStories-valid.txt", src)
    ref = tmp_path / "ref"
    prepare(PrepareConfig(source=str(src), out=str(ref), workers=2))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "tinygemma", "prepare", "--source", str(src), "--out", str(out),
                             "--workers", "2"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    tmp = out / "train.bin.tmp"
    while not (tmp.exists() and tmp.stat().st_size > 0) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its workers, as a killed job
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "meta.json").exists(), "prepare finished before the kill"
    for split in ("train", "val"):
        with pytest.raises(UserError, match="missing"):
            TokenDataset(out, split)
    prepare(PrepareConfig(source=str(src), out=str(out), workers=1))
    assert _bytes(out) == _bytes(ref)
    assert json.loads((out / "meta.json").read_text())["splits"] == json.loads((ref / "meta.json").read_text())[
        "splits"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_interrupted_between_renames_leaves_nothing_valid(small_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    prepare(PrepareConfig(source=str(small_dir), out=str(out), workers=1))
    real, calls = os.replace, []

    def replace_then_die(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(source=str(small_dir), out=str(out), max_stories=3, workers=1))
    with pytest.raises(UserError, match="missing"):
        TokenDataset(out, "train")


def test_verify_and_reader_checks(small_dir, tmp_path, capsys):
    out = tmp_path / "o"
    prepare(PrepareConfig(source=str(small_dir), out=str(out), workers=1))
    assert main(["prepare", "--verify", str(out)]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
    raw = bytearray((out / "val.bin").read_bytes())
    raw[10] ^= 1
    (out / "val.bin").write_bytes(bytes(raw))
    assert main(["prepare", "--verify", str(out)]) == 2
    assert "val.bin: sha256" in capsys.readouterr().err
    with pytest.raises(UserError, match="vocab size 50257 does not match the model's 1000"):
        TokenDataset(out, "train", vocab_size=1000)
    (out / "val.bin").write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match="does not match"):
        TokenDataset(out, "val")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "bpe_sha256": "0" * 64}))
    with pytest.raises(UserError, match="not GPT-2's"):
        TokenDataset(out, "train")


# --- bad input: one line naming the file and the problem, exit 2, nothing written ---------------


def _fails(capsys, args: list[str], *needles: str) -> str:
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tinygemma prepare: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs(tmp_path, capsys, small_dir):
    out = tmp_path / "out"
    _fails(capsys, ["--source", str(tmp_path / "nope"), "--out", str(out)], "nope: no such file or folder")
    (tmp_path / "empty.txt").write_bytes(b"")
    _fails(capsys, ["--source", str(tmp_path / "empty.txt"), "--out", str(out)], "empty.txt: empty file")
    (tmp_path / "nosep.txt").write_text("Once upon a time.\n\nThe end.\n")
    _fails(capsys, ["--source", str(tmp_path / "nosep.txt"), "--out", str(out)], "nosep.txt: no <|endoftext|>")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "x", "body": "y"}\n')
    _fails(capsys, ["--source", str(tmp_path / "bad.jsonl"), "--out", str(out)],
           "bad.jsonl: line 2 has no 'text' or 'story'", "title, body")
    (tmp_path / "bad.json").write_text('[{"prompt": "x"}]')
    _fails(capsys, ["--source", str(tmp_path / "bad.json"), "--out", str(out)], "bad.json: record 0 has no")
    good = b"A story.\n<|endoftext|>\n"
    (tmp_path / "latin1.txt").write_bytes(good * 3 + "Caf\xe9.\n<|endoftext|>\n".encode("latin-1"))
    _fails(capsys, ["--source", str(tmp_path / "latin1.txt"), "--out", str(out)],
           f"latin1.txt: invalid UTF-8 at byte {len(good) * 3 + 3}")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "Caf\xe9"}\n')
    # 15 bytes of line 1, then '{"text": "Caf' (13)
    _fails(capsys, ["--source", str(tmp_path / "latin1.jsonl"), "--out", str(out)], "invalid UTF-8 at byte 28")
    (small_dir / "TinyStories-valid.txt").unlink()
    _fails(capsys, ["--source", str(small_dir), "--out", str(out)],
           "has TinyStories-train.txt but no TinyStories-valid.txt; refusing", "to split that file")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["A story."]}), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    _fails(capsys, ["--source", str(tmp_path / "hub"), "--out", str(out)],
           "hub: has a train split but no validation split; refusing")
    assert not out.exists()
    (tmp_path / "afile").write_text("x")
    _fails(capsys, ["--source", str(small_dir / "TinyStories-train.txt"), "--out", str(tmp_path / "afile")],
           "afile: output path is a file")
    _fails(capsys, ["--max-stories", "0"], "max_stories must be >= 1")


def test_long_file_without_separator_fails_early(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_STORY_BYTES", 1000)
    monkeypatch.setattr(sources, "READ_BYTES", 100)
    monkeypatch.setattr(sources, "BATCH_BYTES", 100)
    (tmp_path / "big.txt").write_text("word " * 10_000)
    with pytest.raises(UserError, match=r"big.txt: no <\|endoftext\|> separator within 1,000 bytes from byte 0"):
        prepare(PrepareConfig(source=str(tmp_path / "big.txt"), out=str(tmp_path / "o"), workers=1))


def test_other_tokenizer_data_is_refused_without_force(small_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\0" * 8)
    (out / "meta.json").write_text(json.dumps({"tokenizer": "llama", "bpe_sha256": "ab" * 32, "vocab_size": 32000}))
    _fails(capsys, ["--source", str(small_dir), "--out", str(out)], "meta.json: data made with tokenizer 'llama'",
           "--force")
    assert (out / "train.bin").read_bytes() == b"\0" * 8
    assert main(["prepare", "--source", str(small_dir), "--out", str(out), "--force", "--workers", "1"]) == 0
    assert TokenDataset(out, "train").meta["command"] == (
        f"tinygemma prepare --source {small_dir} --out {out} --workers 1 --force")


def test_disk_full_keeps_the_old_data(small_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    prepare(PrepareConfig(source=str(small_dir), out=str(out), workers=1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class FillingFile:  # a file on a disk that fills up after the first write
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda path, mode="r", **kw: (FillingFile if str(path).endswith(".bin.tmp")
                                                                    else lambda f: f)(open(path, mode, **kw)),
                        raising=False)
    monkeypatch.setattr(sources, "BATCH_BYTES", 2000)
    _fails(capsys, ["--source", str(small_dir), "--out", str(out), "--force", "--workers", "1"],
           "train.bin.tmp: write failed (No space left on device); the existing data was left as it was")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["prepare", "--verify", str(out)]) == 0


def test_cli_flags_come_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--source", "--out", "--max-stories", "--workers", "--fix-text, --no-fix-text", "--force",
                 "--v2", "--val-fraction", "--seed", "--verify DIR"):
        assert flag in text, flag
