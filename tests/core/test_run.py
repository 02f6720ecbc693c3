"""The run folder (tinygemma.run): resolving and resuming checkpoints, atomic deletion and crash recovery,
one trainer per folder, metrics that survive a kill mid-append, reports that never leave the folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import one_line_error, tree_hash
from tinygemma import rundir
from tinygemma.cli import main
from tinygemma.config import UserError

TRAIN = ["--model", "tiny", "--block-size", "32", "--micro-batch", "4", "--grad-accum", "1", "--lr", "3e-3",
         "--eval-batches", "1", "--log-interval", "1", "--no-progress"]


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the in-process 20-step run (tests may damage it)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.fixture
def cli_run_copy(short_run, tmp_path) -> Path:
    """A copy of the CLI-trained 20-step run, for the end-to-end resume tests."""
    copy = tmp_path / "run"
    shutil.copytree(short_run, copy)
    return copy


def test_names_listing_and_resolution(run_copy):
    assert [s for s, _ in rundir.checkpoints(run_copy)] == [15, 20]
    assert rundir.resolve_checkpoint(run_copy) == run_copy / "best"
    assert rundir.latest_checkpoint(run_copy) == run_copy / "checkpoint-20"
    assert rundir.display_name(run_copy / "checkpoint-20") == f"{run_copy.name}/checkpoint-20"
    assert rundir.display_name(run_copy) == run_copy.name
    assert rundir.run_of(run_copy / "best") == run_copy.resolve() and rundir.run_of(run_copy) is None
    (run_copy / "checkpoint-20" / "optimizer.pt").unlink()  # incomplete: not resumable, still a model
    assert rundir.latest_checkpoint(run_copy) == run_copy / "checkpoint-15"
    assert rundir.read_run_config(run_copy)["train"]["max_steps"] == 20


def test_prune_deletes_atomically_and_recover_tidies(run_copy):
    # a kill during a deletion leaves the renamed .del- folder, never a half checkpoint-N
    (run_copy / ".del-checkpoint-5").mkdir()
    (run_copy / ".tmp-checkpoint-25").mkdir()
    shutil.copytree(run_copy / "checkpoint-15", run_copy / ".old-checkpoint-10")  # caught mid-swap
    rundir.recover(run_copy)
    names = sorted(p.name for p in run_copy.iterdir() if p.is_dir())
    assert names == ["best", "checkpoint-10", "checkpoint-15", "checkpoint-20"]
    rundir.prune(run_copy, keep_last=1)
    assert sorted(p.name for p in run_copy.glob("*checkpoint-*")) == ["checkpoint-20"]


@pytest.mark.slow
def test_kill_while_pruning_leaves_only_complete_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tinygemma", "train", "--data", str(data_dir), "--out", str(out), *TRAIN,
            "--max-steps", "3", "--eval-interval", "10", "--save-interval", "1", "--keep-last", "1"]
    proc = subprocess.run(args, env={**os.environ, "TINYGEMMA_FAULT": "remove_dir"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".del-checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--resume", "auto", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "checkpoint-3"]


@pytest.mark.slow
def test_resume_auto_from_best_alone(cli_run_copy, data_dir):
    run_copy = cli_run_copy
    for _, path in rundir.checkpoints(run_copy):
        shutil.rmtree(path)
    assert main(["train", "--data", str(data_dir), "--out", str(run_copy), "--resume", "auto", "--no-progress",
                 "--max-steps", "22"]) == 0
    assert [r["step"] for r in rundir.Metrics(run_copy).read()] == list(range(1, 23))
    assert json.loads((run_copy / "checkpoint-22" / rundir.TRAINER_STATE).read_text())["step"] == 22


def test_resume_auto_without_any_complete_checkpoint_refuses(run_copy, data_dir, capsys):
    for _, path in rundir.checkpoints(run_copy):
        shutil.rmtree(path)
    (run_copy / "best" / "optimizer.pt").unlink()
    before = tree_hash(run_copy)
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(run_copy), "--resume", "auto",
                         "--no-progress", "--lr", "1e-3")
    assert "holds a run but no complete checkpoint" in err
    assert tree_hash(run_copy) == before


def test_second_trainer_on_a_run_folder_is_refused(run_copy, data_dir, capsys):
    with rundir.lock(run_copy):
        before = tree_hash(run_copy)
        err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(run_copy), "--resume", "auto",
                             "--no-progress", "--max-steps", "30")
        assert f"in use by another trainer (PID {os.getpid()}" in err
        assert tree_hash(run_copy) == before
    with rundir.lock(run_copy):  # released on exit, and again on error
        pass


def test_lock_of_a_killed_trainer_is_not_stale(tmp_path):
    code = ("import sys, time; from tinygemma import rundir\n"
            "with rundir.lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"PID {proc.pid}"):
        with rundir.lock(tmp_path):
            pass
    proc.kill()
    proc.wait()
    with rundir.lock(tmp_path):  # the OS released the dead owner's lock
        pass


@pytest.mark.slow
def test_half_written_metrics_line_is_dropped_on_resume(cli_run_copy, data_dir, capsys):
    run_copy = cli_run_copy
    with open(run_copy / rundir.METRICS, "a") as f:
        f.write('{"step": 21, "train_lo')
    assert main(["train", "--data", str(data_dir), "--out", str(run_copy), "--resume", "auto", "--no-progress",
                 "--max-steps", "21"]) == 0
    assert "dropped a half-written last line" in capsys.readouterr().err
    assert [r["step"] for r in rundir.Metrics(run_copy).read()] == list(range(1, 22))


def test_latest_report_stays_inside_the_run(tmp_path):
    (tmp_path / "samples.md").write_text("ours")
    time.sleep(0.01)
    (tmp_path / "leak.md").symlink_to("/etc/passwd")
    (tmp_path / "sub").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.html"
    outside.write_text("secret")
    (tmp_path / "sub" / "x.html").symlink_to(outside)
    assert rundir.latest_report(tmp_path) == tmp_path / "samples.md"
