"""tinygemma finetune: the Trainer on instruct records (masked loss), exact resume, and what it refuses."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygemma import rundir
from tinygemma.cli import main

pytestmark = pytest.mark.slow  # each test trains

STEPS = ["--block-size", "96", "--micro-batch", "4", "--eval-batches", "1", "--log-interval", "1", "--no-progress",
         "--lr", "1e-3", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def finetuned(short_run, instruct_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetuned")
    assert main(["finetune", str(short_run), "--data", str(instruct_dir), "--out", str(out), *STEPS,
                 "--max-steps", "6", "--eval-interval", "3", "--save-interval", "2", "--keep-last", "3"]) == 0
    return out


def curve(out: Path) -> list[tuple]:
    keys = ("step", "tokens", "train_loss", "grad_norm", "lr", "val_loss")
    return [tuple(r.get(k) for k in keys) for r in rundir.Metrics(out).read()]


def test_finetune_starts_from_the_checkpoint_and_learns(finetuned, short_run):
    saved = rundir.read_run_config(finetuned)
    assert saved["recipe"] == "finetune" and saved["train"]["finetune_from"] == str((short_run / "best").resolve())
    rows = rundir.Metrics(finetuned).read()
    assert [r["step"] for r in rows] == list(range(1, 7))
    # starts near the pre-trained model's loss on story tokens (not ln(50257) ~ 10.8 of a fresh model)
    assert rows[0]["train_loss"] < 9.0 and rows[-1]["val_loss"] < rows[0]["train_loss"]
    state = json.loads((finetuned / "checkpoint-6" / rundir.TRAINER_STATE).read_text())
    assert state["sampler"]["kind"] == "random_records"


def test_finetune_resumes_bit_exactly(finetuned, instruct_dir, short_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finetuned, copy)
    for name in ("checkpoint-4", "checkpoint-6", "best"):
        shutil.rmtree(copy / name)
    assert main(["finetune", str(short_run), "--data", str(instruct_dir), "--out", str(copy), "--resume",
                 "auto", "--no-progress"]) == 0
    assert curve(copy) == curve(finetuned)
    a, b = (load_file(p / "checkpoint-6" / "model.safetensors") for p in (copy, finetuned))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs(short_run, instruct_dir, data_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "new"), *STEPS, "--max-steps", "1"]
    err = one_line_error(capsys, "finetune", str(short_run), "--data", str(data_dir), *out)
    assert "plain token data, not instruct records" in err
    err = one_line_error(capsys, "train", "--data", str(instruct_dir), "--model", "tiny", *out)
    assert "instruct" in err and "finetune" in err
    other = tmp_path / "other"
    shutil.copytree(short_run / "best", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 32000, "eos_token_id": 2}))
    assert "not a GPT-2-tokenizer model" in one_line_error(capsys, "finetune", str(other), "--data",
                                                           str(instruct_dir), *out)
    assert not (tmp_path / "new").exists()
