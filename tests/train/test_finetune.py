"""tinygemma finetune, and train on instruct records: the Trainer on records (masked loss), exact resume, and what
they refuse."""

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinygemma import rundir
from tinygemma.cli import main
from tinygemma.model import Gemma3, load_model_config

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


def direct_masked_loss(model: torch.nn.Module, data: Path, records: np.ndarray, block: int) -> tuple[float, float]:
    """Mean loss over the story tokens (mask 1) of the given records, each run alone, straight from the files;
    and, to show the mask matters, the mean over every token."""
    starts = np.load(data / "train.idx.npy")
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(data / "train.mask.bin", dtype=np.uint8).astype(bool)
    story, every = [], []
    with torch.no_grad():
        for r in records:
            s, e = starts[r], min(starts[r + 1], starts[r] + block + 1)
            ids = torch.from_numpy(tokens[s:e])
            losses = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
            story.append(losses[torch.from_numpy(mask[s + 1:e])])
            every.append(losses)
    return torch.cat(story).mean().item(), torch.cat(every).mean().item()


def test_train_from_scratch_on_instruct_records(instruct_dir, tmp_path):
    """`train` on an instruct folder (no checkpoint) trains one record per row with the loss on the stories
    only: its first step's loss is the masked loss of the seeded fresh model on that step's records. The model
    is the tiny preset with a large init (token losses far apart, so the prompts' tokens would show)."""
    model_cfg = replace(load_model_config("tiny"), init_std=0.5)
    (tmp_path / "model.json").write_text(json.dumps(asdict(model_cfg)))
    out = tmp_path / "scratch"
    assert main(["train", "--data", str(instruct_dir), "--model", str(tmp_path / "model.json"), "--out", str(out),
                 *STEPS, "--grad-accum", "1", "--max-steps", "3", "--eval-interval", "3"]) == 0
    saved = rundir.read_run_config(out)
    assert saved["recipe"] == "default" and saved["train"]["finetune_from"] is None
    state = json.loads((out / "checkpoint-3" / rundir.TRAINER_STATE).read_text())
    assert state["sampler"]["kind"] == "random_records"
    assert "trained on TinyStories-Instruct records" in (out / "checkpoint-3" / "README.md").read_text()
    cfg = saved["train"]
    torch.manual_seed(cfg["seed"])
    model = Gemma3(model_cfg)
    n_records = len(np.load(instruct_dir / "train.idx.npy")) - 1
    # step 0's records: the sampler's documented draw from a generator seeded with (seed, 0, step)
    picks = np.random.default_rng([cfg["seed"], 0, 0]).integers(0, n_records, size=(1, 1, cfg["micro_batch"]))
    story, every = direct_masked_loss(model, instruct_dir, picks[0, 0], cfg["block_size"])
    first = rundir.Metrics(out).read()[0]
    assert first["step"] == 1 and first["train_loss"] == pytest.approx(story, rel=1e-5)
    assert first["train_loss"] != pytest.approx(every, rel=1e-4)  # the prompts' tokens would show, 10x looser


def test_bad_inputs(short_run, instruct_dir, data_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "new"), *STEPS, "--max-steps", "1"]
    err = one_line_error(capsys, "finetune", str(short_run), "--data", str(data_dir), *out)
    assert "plain token data, not instruct records" in err
    err = one_line_error(capsys, "train", "--recipe", "instruct", "--data", str(data_dir), "--model", "tiny", *out)
    assert "plain token data, not instruct records" in err
    other = tmp_path / "other"
    shutil.copytree(short_run / "best", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 32000, "eos_token_id": 2}))
    assert "not a GPT-2-tokenizer model" in one_line_error(capsys, "finetune", str(other), "--data",
                                                           str(instruct_dir), *out)
    assert not (tmp_path / "new").exists()
