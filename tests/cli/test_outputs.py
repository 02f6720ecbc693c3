"""One rule for outputs: an existing output file is refused unless --force, an unwritable one before any work,
each in one line; and the small refusals of issue 29 (0d-0f, 3)."""

import json
import sys
import time

import pytest
import torch

from tests.helpers import one_line_error, tree_hash
from tinygemma.cli import main
from tinygemma.model import Gemma3, load_model_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as other commands see it: best/ holds a tiny model."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    Gemma3(load_model_config("tiny")).save_pretrained(folder / "best")
    return folder


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "existing.md").write_text("my notes")
    (tmp_path / "existing.html").write_text("my page")
    return tmp_path


def test_samples_refuses_an_existing_report_unless_force(run, files, capsys):
    before = tree_hash(files)
    err = one_line_error(capsys, "samples", str(run), "--out", str(files / "existing.md"), "--max-new-tokens", "2")
    assert "exists (use --force" in err and tree_hash(files) == before
    assert main(["samples", str(run), "--out", str(files / "existing.md"), "--max-new-tokens", "2", "--force"]) == 0
    assert (files / "existing.md").read_text() != "my notes"


def test_eval_report_checked_before_the_work(run, files, capsys):
    before = tree_hash(files)
    for report in (files / "existing.md", files / "file" / "e.json"):
        err = one_line_error(capsys, "eval", str(run), "--instruct", str(files), "--report", str(report))
        assert err.startswith("tinygemma eval: error: --report") and ("exists" in err or "is a file" in err)
    assert tree_hash(files) == before


def test_export_gguf_under_a_file(run, files, capsys):
    err = one_line_error(capsys, "export", str(run), str(files / "file" / "x.gguf"), "--format", "gguf")
    assert "cannot write there" in err and (files / "file").read_text() == "mine"


def test_judge_out_is_a_file_or_holds_other_files(run, files, capsys):
    judge = ["--endpoint", "http://127.0.0.1:9/v1", "--judge-model", "x", "--max-new-tokens", "2"]
    err = one_line_error(capsys, "judge", str(run), "--out", str(files / "file"), *judge)
    assert "--out" in err and "not a folder" in err
    (files / "j").mkdir()
    (files / "j" / "grades.jsonl").write_text("mine\n")
    err = one_line_error(capsys, "judge", str(run), "--out", str(files / "j"), *judge)
    assert "grades.jsonl" in err and "--force" in err and (files / "j" / "grades.jsonl").read_text() == "mine\n"


def test_report_outputs_and_non_runs(run, files, capsys):
    err = one_line_error(capsys, "report", str(run), "--out", str(files / "file"), "--no-compute")
    assert "not a folder" in err
    err = one_line_error(capsys, "report", str(run), "--out", str(files / "file" / "r"), "--no-compute")
    assert "is a file" in err
    (files / "r").mkdir()
    (files / "r" / "report.md").write_text("my report\n")
    err = one_line_error(capsys, "report", str(run), "--out", str(files / "r"), "--no-compute")
    assert "report.md" in err and "--force" in err and (files / "r" / "report.md").read_text() == "my report\n"
    (files / "empty").mkdir()
    for runs in ([str(files / "nonexistent")], [str(files / "empty")]):
        err = one_line_error(capsys, "report", *runs, "--out", str(files / "new"))
        assert "no run folder" in err
    assert not (files / "new").exists()


@pytest.mark.parametrize("flags", [["--temperature", "inf"], ["--seed", str(2**80)], ["--seed", "-1"]])
def test_generate_refuses_bad_sampling(run, capsys, flags):
    err = one_line_error(capsys, "generate", str(run), *flags, "--max-new-tokens", "2")
    assert ("temperature" in err or "seed" in err) and "Overflow" not in err


def test_train_refuses_a_huge_seed(tmp_path, capsys):
    err = one_line_error(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "tiny",
                         "--seed", str(2**80))
    assert "seed" in err and not (tmp_path / "o").exists()


def test_generate_refuses_a_huge_sample_count_at_once(run, capsys):
    t0 = time.perf_counter()
    err = one_line_error(capsys, "generate", str(run), "--num-samples", "100000000", "--max-new-tokens", "2")
    assert "--num-samples" in err and time.perf_counter() - t0 < 15


def test_info_takes_a_run_folder(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == (main(["info", str(run / "best"), "--json"]), json.loads(capsys.readouterr().out))[1]


def test_finetune_help_shows_the_finetune_recipe(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tinygemma"])
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak LR (AdamW groups) (default: 0.0001)" in text and "(default: 1000)" in text
