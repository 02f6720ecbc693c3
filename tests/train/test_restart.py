"""Restarts around the first checkpoint (issue 29): a run SIGKILLed before its first checkpoint starts over under
`--resume auto` (the restart loop of docs/reliability.md, run as written); `finetune` refuses an --out that
overlaps its source, starts a new run with its own recipe, and a refused run leaves nothing behind."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error, tree_hash
from tinygemma import rundir
from tinygemma.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINYGEMMA = Path(sys.executable).with_name("tinygemma")
STEPS = ["--block-size", "32", "--micro-batch", "2", "--grad-accum", "1", "--eval-batches", "1", "--log-interval", "1",
         "--max-steps", "6", "--eval-interval", "5", "--no-progress", "--lr", "1e-3", "--warmup-steps", "1"]


def _restart_script(tmp_path: Path) -> Path:
    """The restart loop exactly as docs/reliability.md shows it."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    block = re.search(r"<!-- restart-loop -->\n```bash\n(.*?)```\n<!-- /restart-loop -->", doc, re.S).group(1)
    script = tmp_path / "restart.sh"
    script.write_text(block)
    return script


def _killing_tinygemma(tmp_path: Path) -> Path:
    """A `tinygemma` first on PATH: its first three runs SIGKILL themselves before the first checkpoint (at
    startup, after step 2's metrics, after step 4's), the fourth runs as it is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "tinygemma"
    wrapper.write_text(f"""#!/usr/bin/env bash
n=$(( $(cat "{tmp_path}/attempts" 2>/dev/null || echo 0) + 1 )); echo $n > "{tmp_path}/attempts"
case $n in 1) export TINYGEMMA_FAULT=train_start;; 2) export TINYGEMMA_FAULT=step:2;;
  3) export TINYGEMMA_FAULT=step:4;; *) unset TINYGEMMA_FAULT;; esac
exec "{TINYGEMMA}" "$@"
""")
    wrapper.chmod(0o755)
    return bin_dir


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "finetune"])
def test_restart_loop_after_kills_before_the_first_checkpoint(command, data_dir, short_run, instruct_dir, tmp_path):
    out = tmp_path / "run"
    args = (["train", "--data", str(data_dir), "--model", "tiny"] if command == "train"
            else ["finetune", str(short_run), "--data", str(instruct_dir), "--block-size", "96"])
    env = {**os.environ, "PATH": f"{_killing_tinygemma(tmp_path)}:{os.environ['PATH']}", "RESTART_DELAY": "0"}
    loop = ["bash", str(_restart_script(tmp_path)), args[0], "--out", str(out), *STEPS, *args[1:]]
    done = subprocess.run(loop, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "attempts").read_text().strip() == "4"  # three kills, then the run that finished
    assert done.stderr.count("exited with 137") == 3
    assert done.stderr.count("starting over") == 3  # after each kill: no checkpoint, nothing to lose
    assert done.stderr.count("metrics moved to metrics.jsonl.1") == 2  # the kills after steps 2 and 4
    state = json.loads((out / "checkpoint-6" / rundir.TRAINER_STATE).read_text())
    assert state["step"] == 6 and [r["step"] for r in rundir.Metrics(out).read()] == list(range(1, 7))
    moved = [json.loads(line)["step"] for line in (out / "metrics.jsonl.1").read_text().splitlines()]
    assert moved == [1, 2, 3, 4]  # the third attempt's, moved aside by the fourth
    config = json.loads((out / rundir.RUN_CONFIG).read_text())
    if command == "finetune":  # a new run of finetune is finetune's recipe, even under --resume auto
        assert config["recipe"] == "finetune" and config["train"]["optimizer"] == "adamw"
        assert config["train"]["grad_accum"] == 1 and config["train"]["lr"] == 1e-3
    # once finished, the loop's next round resumes to "done" at once
    again = subprocess.run(loop, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout and "done: step 6" in again.stdout


def test_restart_state_keeps_refusing_when_metrics_pass_the_first_checkpoint(tmp_path):
    from tinygemma.train.checkpoint import restart_state

    previous = {"train": {"eval_interval": 5, "save_interval": None, "max_steps": 100}}
    assert restart_state(tmp_path, previous) == "empty"
    metrics = rundir.Metrics(tmp_path)
    for step in (1, 2, 5):
        metrics.append({"step": step})
    assert restart_state(tmp_path, previous) == "early"
    metrics.append({"step": 6})  # a checkpoint was written at 5 and since deleted: a user would lose steps
    assert restart_state(tmp_path, previous) is None
    (tmp_path / rundir.METRICS).unlink()
    (tmp_path / "checkpoint-5").mkdir()  # an incomplete checkpoint is no "nothing to lose"
    assert restart_state(tmp_path, previous) is None


def test_resume_auto_with_metrics_past_the_first_checkpoint_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = {"train": {"block_size": 32, "eval_interval": 5, "save_interval": None, "max_steps": 6}, "model": {}}
    (out / rundir.RUN_CONFIG).write_text(json.dumps(config))
    for step in (1, 5, 6):
        rundir.Metrics(out).append({"step": step})
    before = tree_hash(out)
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(out), "--model", "tiny",
                         "--resume", "auto", *STEPS)
    assert "no complete checkpoint to resume" in err and tree_hash(out) == before


@pytest.mark.slow
def test_finetune_into_its_own_run_is_refused_and_the_run_kept(short_run, instruct_dir, capsys):
    before = tree_hash(short_run)
    best = short_run / rundir.BEST
    for out, force in ((short_run, True), (short_run, False), (best, True), (best / "sub", True)):
        err = one_line_error(capsys, "finetune", str(short_run), "--data", str(instruct_dir), "--out", str(out),
                             *(["--force"] if force else []), *STEPS)
        assert "overlaps the checkpoint being fine-tuned" in err, err
    assert tree_hash(short_run) == before  # every file of the trained run, byte for byte
    assert not (best / "sub").exists()


@pytest.mark.slow
def test_a_refused_finetune_leaves_nothing_and_the_fix_runs(short_run, instruct_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", str(short_run), "--data", str(instruct_dir), "--out", str(out), *STEPS[2:]]
    err = one_line_error(capsys, "finetune", *args[1:], "--block-size", "4")
    assert "block_size 4 ends before the story" in err and "raise --block-size" in err
    assert not out.exists()  # no folder, no .lock, no run_config.json
    assert main([*args, "--block-size", "64", "--max-steps", "2"]) == 0  # the corrected command, same --out
