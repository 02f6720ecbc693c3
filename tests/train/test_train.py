"""Training on the real TinyStories sample with the tiny preset: learning, exact resume, accumulation,
DDP, checkpoints that transformers loads, non-finite handling and bad input."""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.train.config import TrainConfig, load_recipe, parse_sets, resolve_config
from tinygemma.train.optim import lr_at
from tinygemma.train.sampler import Sampler

# small and fast: 4 x 32 tokens per micro-batch, accumulation 2; all-AdamW unless a test asks for Muon
BASE = ["--recipe", "adamw", "--model", "tiny", "--block-size", "32", "--micro-batch", "4", "--grad-accum", "2",
        "--lr", "3e-3", "--eval-batches", "2", "--log-interval", "1", "--no-progress"]


def run_cli(*args: str) -> int:
    return main(["train", *args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[tuple]:
    keys = ("step", "tokens", "train_loss", "grad_norm", "lr", "val_loss", "eval_train_loss")
    return [tuple(r.get(k) for k in keys) for r in metrics(out)]


def subprocess_env() -> dict:
    # same thread count as this process, so that CPU reductions run in the same order
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


# -- configuration ---------------------------------------------------------------------------------------
def test_recipe_files_match_dataclass_defaults():
    from dataclasses import asdict

    assert resolve_config(load_recipe("adamw"), {}) == TrainConfig()
    assert resolve_config(load_recipe("default"), {}) == resolve_config(load_recipe("muon"), {})
    assert set(load_recipe("tutorial")) <= set(asdict(TrainConfig()))


def test_tutorial_recipe_reproduces_its_budget_with_a_fixed_schedule():
    cfg = resolve_config(load_recipe("tutorial"), {})
    tokens_per_step = cfg.block_size * cfg.micro_batch * cfg.grad_accum
    assert tokens_per_step == 131_072 and cfg.max_tokens == 150_000 * 32 * 128
    total = math.ceil(cfg.max_tokens / tokens_per_step)
    assert total == 4688
    assert lr_at(cfg, 30, total) == pytest.approx(1e-4)  # warmup: 1,000 micro-steps = 31 optimizer steps
    assert lr_at(cfg, total, total) == pytest.approx(1e-5)  # decays to lr/10, never above lr
    assert all(lr_at(cfg, s, total) <= 1e-4 + 1e-15 for s in range(0, total, 50))
    raw = resolve_config(load_recipe("tutorial"), parse_sets(["min_lr=5e-4"]))
    assert lr_at(raw, total, total) == pytest.approx(5e-4)  # the tutorial's bug, still expressible
    # a command-line budget replaces the recipe's
    assert resolve_config(load_recipe("tutorial"), {"max_steps": 10}).max_tokens is None


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100, max_tokens=None, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(cfg, s, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[100] == pytest.approx(0.1)


@pytest.mark.parametrize("override, message", [
    ({"lrr": 1.0}, "did you mean 'lr'"), ({"lr": -1.0}, "lr must be positive"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"), ({"nonfinite": "ignore"}, "nonfinite must be"),
    ({"block_size": "big"}, "expected int"), ({"precision": "fp8"}, "precision must be auto, bf16, fp16 or fp32"),
    ({"optimizer": "sgd"}, "optimizer must be adamw or muon"),
    ({"optimizer": "adamw"}, "muon_weight_decay, muon_momentum set, but optimizer is 'adamw'"),
    ({"optimizer": "muon", "muon_lr": -1e-2}, "muon_lr must be positive"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, "muon_momentum must lie in"),
])
def test_bad_config_values(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config(load_recipe("default"), override)


# -- data sampler ----------------------------------------------------------------------------------------
def test_sampler_windows_are_deterministic_and_shared_by_layouts():
    tokens = np.arange(10_000, dtype=np.uint16)
    one = Sampler(tokens, 16, 8, 1, 0, 1, seed=3).step_batches(5)
    again = Sampler(tokens, 16, 8, 1, 0, 1, seed=3).step_batches(5)
    assert torch.equal(one[0], again[0])
    first = one[0][:, 0]
    assert torch.equal(one[0], first[:, None] + torch.arange(17))  # contiguous windows of block + 1
    accum = torch.cat(Sampler(tokens, 16, 2, 4, 0, 1, seed=3).step_batches(5))
    ranks = torch.cat([Sampler(tokens, 16, 4, 1, r, 2, seed=3).step_batches(5)[0] for r in range(2)])
    assert torch.equal(accum, one[0]) and torch.equal(ranks, one[0])
    assert not torch.equal(Sampler(tokens, 16, 8, 1, 0, 1, seed=3).step_batches(6)[0], one[0])


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.slow  # the CLI-trained run: `tinygemma train --samples`, 20 steps of the default recipe
def test_loss_falls_and_metrics_plots_checkpoints_appear(short_run):
    rows = metrics(short_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[0]["train_loss"] > 10.0  # ~ln(50257) at initialisation
    assert np.mean([r["train_loss"] for r in rows[-5:]]) < rows[0]["train_loss"] - 3.0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[-1]["val_loss"] < rows[0]["train_loss"] - 3.0
    for key in ("tokens", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 20 * 8 * 32
    for name in ("loss.png", "lr.png", "grad_norm.png"):
        assert (short_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in short_run.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    state = json.loads((short_run / "best" / "trainer_state.json").read_text())
    best = min(evals, key=lambda r: r["val_loss"])
    assert state["best_step"] == best["step"] and state["best_val_loss"] == best["val_loss"]
    ckpt = short_run / "checkpoint-20"
    saved = json.loads((ckpt / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == 20 and saved["model"]["hidden_size"] == 64
    assert not any("_orig_mod" in k for k in load_file(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)  # the default recipe: Muon + AdamW
    assert set(optim) == {"muon", "adamw"}
    assert sum(len(o["state"]) for o in optim.values()) == sum(1 for _ in _tiny_params())
    assert not list(short_run.glob(".tmp-*"))


def _tiny_params():
    from tinygemma.model import Gemma3, load_model_config

    return Gemma3(load_model_config("tiny")).parameters()


def test_checkpoint_loads_in_transformers_with_matching_logits(tiny_run):
    transformers = pytest.importorskip("transformers")
    from tinygemma.model import Gemma3

    ours = Gemma3.from_pretrained(tiny_run / "best").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_run / "best", dtype=torch.float32).eval()
    ids = torch.randint(0, 50257, (2, 40))  # longer than the tiny preset's 16-token window
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def _start(data_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinygemma", "train", "--data", str(data_dir), "--out", str(out),
                             *BASE, *extra], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


RESUME_RUN = ("--max-steps", "16", "--eval-interval", "6", "--save-interval", "4", "--micro-batch", "2")


RECIPE_ARGS = {"adamw": (), "muon": ("--recipe", "muon", "--lr", "3e-3", "--muon-lr", "1e-2"),
               "fp16": ("--precision", "fp16")}


@pytest.fixture(scope="session")
def reference_run(data_dir, tmp_path_factory):
    """recipe -> the uninterrupted run folder (made on first use)."""
    runs = {}

    def get(recipe: str) -> Path:
        if recipe not in runs:
            out = tmp_path_factory.mktemp(f"reference-{recipe}")
            proc = _start(data_dir, out, *RESUME_RUN, *RECIPE_ARGS[recipe])
            assert proc.wait(300) == 0, proc.communicate()[1][-2000:]
            runs[recipe] = out
        return runs[recipe]
    return get


def _assert_same_run(out: Path, reference: Path) -> None:
    assert curve(out) == curve(reference)  # every logged loss, grad norm, LR, bit for bit
    ours, ref = load_file(out / "checkpoint-16" / "model.safetensors"), load_file(reference / "checkpoint-16" /
                                                                                  "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    states = [json.loads((run / "checkpoint-16" / "trainer_state.json").read_text()) for run in (out, reference)]
    assert states[0]["scaler"] == states[1]["scaler"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["adamw", "muon"])
def test_sigterm_then_resume_is_bit_exact(data_dir, tmp_path, reference_run, recipe):
    proc = _start(data_dir, tmp_path, *RESUME_RUN, *RECIPE_ARGS[recipe])
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stopped = [int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*")]
    assert 4 <= max(stopped) < 16, "the run was not interrupted"
    assert run_cli("--data", str(data_dir), "--out", str(tmp_path), "--resume", "auto", "--no-progress") == 0
    _assert_same_run(tmp_path, reference_run(recipe))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["adamw", "muon", "fp16"])
def test_sigkill_after_checkpoint_then_resume_is_bit_exact(data_dir, tmp_path, reference_run, recipe):
    proc = _start(data_dir, tmp_path, *RESUME_RUN, *RECIPE_ARGS[recipe])
    _wait_for(lambda: (tmp_path / "checkpoint-8").is_dir(), proc)
    proc.kill()
    proc.wait(30)
    assert not (tmp_path / "checkpoint-16").exists(), "the run was not interrupted"
    assert run_cli("--data", str(data_dir), "--out", str(tmp_path), "--resume", "auto", "--no-progress") == 0
    _assert_same_run(tmp_path, reference_run(recipe))


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(data_dir, tmp_path):
    # eps 1e-3 keeps Adam's update a smooth function of the gradient, so float noise stays float noise
    common = ["--data", str(data_dir), *BASE, "--max-steps", "3", "--eval-interval", "3", "--eps", "1e-3"]
    assert run_cli(*common, "--out", str(tmp_path / "a"), "--micro-batch", "2", "--grad-accum", "4") == 0
    assert run_cli(*common, "--out", str(tmp_path / "b"), "--micro-batch", "8", "--grad-accum", "1") == 0
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa, wb = (load_file(tmp_path / x / "checkpoint-3" / "model.safetensors") for x in "ab")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    steps = ["--max-steps", "6", "--eval-interval", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--module", "tinygemma", "train", "--data", str(data_dir),
           "--out", str(tmp_path / "ddp"), *BASE, *steps]  # 2 ranks x micro 4 x accum 2
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli("--data", str(data_dir), "--out", str(tmp_path / "one"), *BASE, *steps,
                   "--micro-batch", "8") == 0  # 1 rank x micro 8 x accum 2: the same global batch
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in one]
    for rd, ro in zip(ddp, one, strict=True):
        for key in ("train_loss", "val_loss", "eval_train_loss"):
            assert (rd.get(key) is None) == (ro.get(key) is None)
            if ro.get(key) is not None:
                assert abs(rd[key] - ro[key]) < 1e-5, (key, rd, ro)
    assert json.loads((tmp_path / "ddp" / "run_config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_time_budget_fits_the_schedule_and_stops(data_dir, tmp_path):
    assert run_cli("--data", str(data_dir), "--out", str(tmp_path), *BASE, "--time-budget", "0.1",
                   "--warmup-steps", "1", "--eval-interval", "1000") == 0
    state = json.loads(next(tmp_path.glob("checkpoint-*/trainer_state.json")).read_text())
    rows = metrics(tmp_path)
    assert state["step"] == state["total_steps"] == rows[-1]["step"] >= 2  # the estimate closed on the budget
    slowest_step = max(256 / r["tokens_per_s"] for r in rows)
    assert state["train_time_s"] <= 0.1 * 60 + slowest_step
    assert rows[-2]["elapsed_s"] <= 0.1 * 60  # the last step started within the budget
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


# -- non-finite values -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_values_stop_and_keep_last_checkpoint(data_dir, tmp_path, capsys):
    # LR 1e30 blows the weights up in the first step; the second step's gradients are NaN
    args = ["--data", str(data_dir), "--out", str(tmp_path), *BASE, "--max-steps", "4", "--save-interval", "1",
            "--lr", "1e30"]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"step 2: non-finite .* grad norm nan.*checkpoint-1\b", err)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    skip = tmp_path / "skip"
    assert run_cli(*args[:3], str(skip), *args[4:], "--nonfinite", "skip") == 0
    state = json.loads((skip / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 3 and state["step"] == 4
    assert [r["train_loss"] is None for r in metrics(skip)] == [False, True, True, True]


# -- fp16 with loss scaling, out of memory ----------------------------------------------------------------
@pytest.mark.slow  # trains through the CLI twice (8 fp16 steps, emulated on CPU, then a resume to 10)
def test_fp16_overflow_is_skipped_lowers_the_scale_and_resumes_with_it(data_dir, tmp_path, monkeypatch, capsys):
    from tinygemma.train import trainer as train_module  # the module that calls forward_backward

    real = train_module.forward_backward
    calls = []

    def overflow_at_step_16(step_model, batches, precision):
        loss = real(step_model, batches, precision)
        calls.append(1)
        if len(calls) == 16:  # as a too-large loss scale would: inf in one (scaled) gradient
            next(step_model.parameters()).grad[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(train_module, "forward_backward", overflow_at_step_16)
    args = ["--data", str(data_dir), "--out", str(tmp_path), *BASE, "--precision", "fp16", "--eval-interval", "20"]
    assert run_cli(*args, "--max-steps", "20") == 0
    # the scaler starts at 2^16 and halves at each overflow: the first steps overflow by themselves (the fp16
    # guard's scaled-down activations get 2^8 larger gradients, model.py), then the injected one at step 16
    said = re.findall(r"step (\d+): fp16 gradient overflow; step skipped, loss scale now (\d+)",
                      capsys.readouterr().err)
    steps, scales = [int(s) for s, _ in said], [float(x) for _, x in said]
    assert steps[-1] == 16 and 15 not in steps and scales == [2.0**15 / 2**i for i in range(len(steps))]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if r["grad_norm"] is None] == steps  # skipped steps log no norm...
    assert all(r["train_loss"] is not None for r in rows)  # ...but their loss
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5  # fp16 learns
    state = json.loads((tmp_path / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["overflow_steps"] == len(steps) and state["skipped_steps"] == 0
    assert state["scaler"]["scale"] == scales[-1]
    optim = torch.load(tmp_path / "checkpoint-20" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["state"].values()} == {20.0 - len(steps)}  # overflow steps skipped
    # the resumed run starts from the lowered scale (a fresh scaler would start at 2^16)
    assert run_cli("--out", str(tmp_path), "--resume", "auto", "--max-steps", "22", "--no-progress") == 0
    state = json.loads((tmp_path / "checkpoint-22" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == scales[-1] and state["scaler"]["_growth_tracker"] == 6 and len(calls) == 22


def test_cuda_out_of_memory_is_one_line_naming_the_fix(data_dir, tmp_path, monkeypatch, capsys):
    from tinygemma.train import trainer as train_module  # the module that calls forward_backward

    real, calls = train_module.forward_backward, []

    def oom_at_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(train_module, "forward_backward", oom_at_third_step)
    err = _cli_error(capsys, "--data", str(data_dir), "--out", str(tmp_path), *BASE, "--max-steps", "4",
                     "--save-interval", "2")
    assert re.search(r"out of memory .*micro-batch 4, block size 32: resume with a lower --micro-batch and a higher "
                     r"--grad-accum whose product stays 8 \(e\.g\. --micro-batch 2 --grad-accum 4\).*last good "
                     r"checkpoint: .*checkpoint-2$", err), err
    # the advice is one a resume takes: the same tokens per step, re-split
    monkeypatch.setattr(train_module, "forward_backward", real)
    assert run_cli("--out", str(tmp_path), "--resume", "auto", "--micro-batch", "2", "--grad-accum", "4",
                   "--no-progress") == 0
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["tokens"] == 4 * 8 * 32


# -- bad input: one line, exit 2, nothing lost -----------------------------------------------------------
def _cli_error(capsys, *args: str) -> str:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(data_dir, tiny_run, tmp_path, capsys):
    short_run = tiny_run  # any run folder with checkpoint-20 (the in-process one: no CLI training here)
    common = ["--data", str(data_dir), *BASE, "--max-steps", "2"]
    out = ["--out", str(tmp_path / "new")]
    assert "CUDA is not available" in _cli_error(capsys, *common, *out, "--device", "cuda")
    assert "exceeds the model's context length 512" in _cli_error(capsys, *common, *out, "--block-size", "513")
    assert "did you mean 'lr'" in _cli_error(capsys, *common, *out, "--set", "lrr=1")
    assert "lr must be positive" in _cli_error(capsys, *common, *out, "--lr", "-1")
    assert "precision must be auto, bf16, fp16 or fp32, got 'fp8'" in _cli_error(capsys, *common, *out,
                                                                                "--precision", "fp8")
    assert "muon_lr must be positive" in _cli_error(capsys, *common, *out, "--recipe", "muon", "--muon-lr", "-1")
    assert "muon_lr set, but optimizer is 'adamw'" in _cli_error(capsys, *common, *out, "--recipe", "adamw",
                                                                 "--muon-lr", "1e-2")
    assert "grad_accum must be >= 1" in _cli_error(capsys, *common, *out, "--grad-accum", "0")
    assert "unknown recipe" in _cli_error(capsys, *common, *out, "--recipe", "nanogpt")
    # data made with another vocabulary than the model's
    other = tmp_path / "vocab.json"
    from dataclasses import asdict

    from tinygemma.model import load_model_config
    other.write_text(json.dumps({**asdict(load_model_config("tiny")), "vocab_size": 32000, "eot_token_id": 0}))
    assert "vocab size 50257 does not match the model's 32000" in _cli_error(
        capsys, *common, *out, "--model", str(other))
    # data made with another tokenizer
    foreign = tmp_path / "foreign"
    shutil.copytree(data_dir, foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "tokenizer": "llama", "bpe_sha256": "0" * 64}))
    assert "not GPT-2's" in _cli_error(capsys, "--data", str(foreign), *BASE, "--max-steps", "2", *out)
    # block size above the data length
    short = tmp_path / "short"
    shutil.copytree(data_dir, short)
    np.arange(20, dtype=np.uint16).tofile(short / "val.bin")
    meta["splits"]["val"]["tokens"] = 20
    (short / "meta.json").write_text(json.dumps(meta))
    assert "needs more than 20 tokens" in _cli_error(capsys, "--data", str(short), *BASE, "--max-steps", "2", *out)
    assert not (tmp_path / "new" / "checkpoint-2").exists()

    # an output folder that holds another run (or this run) without --resume/--force
    before = sorted(p.name for p in short_run.iterdir())
    snapshot = (short_run / "checkpoint-20" / "model.safetensors").read_bytes()
    assert "holds another run" in _cli_error(capsys, *common, "--out", str(short_run))
    # missing and corrupt checkpoints on --resume
    assert "no such checkpoint" in _cli_error(capsys, *common, "--out", str(tmp_path / "r"), "--resume",
                                              str(tmp_path / "nope"))
    bad = tmp_path / "bad-ckpt"
    shutil.copytree(short_run / "checkpoint-20", bad)
    (bad / "model.safetensors").write_bytes(snapshot[: len(snapshot) // 2])
    assert "corrupt" in _cli_error(capsys, "--out", str(tmp_path / "r"), "--resume", str(bad), "--no-progress")
    shutil.copy(short_run / "checkpoint-20" / "model.safetensors", bad / "model.safetensors")
    (bad / "optimizer.pt").write_bytes(b"not a zip")
    assert "optimizer.pt: unreadable or corrupt" in _cli_error(capsys, "--out", str(tmp_path / "r"), "--resume",
                                                               str(bad), "--no-progress")
    (bad / "trainer_state.json").unlink()
    assert "incomplete checkpoint" in _cli_error(capsys, "--out", str(tmp_path / "r"), "--resume", str(bad))
    assert "cannot change lr" in _cli_error(capsys, "--out", str(short_run), "--resume", "auto", "--lr", "5e-2")
    assert sorted(p.name for p in short_run.iterdir()) == before
    assert (short_run / "checkpoint-20" / "model.safetensors").read_bytes() == snapshot


def _vote(rank: int, port: int, clocks: list[float], out: str) -> None:
    import torch.distributed as dist

    from tinygemma.train.state import agreed_max

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(clocks))
    try:
        Path(out, f"rank{rank}").write_text(str(agreed_max([clocks[rank]], len(clocks), torch.device("cpu"))[0]))
    finally:
        dist.destroy_process_group()


def test_time_budget_stop_is_one_decision_for_all_ranks(tmp_path):
    # two gloo ranks whose clocks disagree (one 30 s ahead, as after a long evaluation) read the same time, so
    # a time budget stops both at the same step instead of one rank waiting alone in the next all-reduce
    import torch.multiprocessing as tmp_mp

    clocks = [100.0, 130.0]
    tmp_mp.start_processes(_vote, args=(_free_port(), clocks, str(tmp_path)), nprocs=2, start_method="spawn")
    assert [float((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [130.0, 130.0]
