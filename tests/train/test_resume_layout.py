"""Resuming on another batch layout or number of ranks, the checkpoint the ranks resume, and --deterministic:
a re-split (micro-batch x grad-accum x ranks keeping its product) resumes to the uninterrupted run; another
product, or another world size, is refused in one line unless --allow-new-world-size; rank 0 picks the
checkpoint and a rank that sees another one stops every rank; --deterministic holds only while training."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import one_line_error
from tinygemma import rundir
from tinygemma.cli import main

# all-AdamW with eps 1e-3: Adam's update stays a smooth function of the gradient, so the rounding of a
# re-split accumulation stays rounding (with eps 1e-8 a gradient element near 0 turns it into a +-lr step)
RUN = ["--recipe", "adamw", "--model", "tiny", "--block-size", "32", "--lr", "3e-3", "--eps", "1e-3",
       "--eval-batches", "2", "--log-interval", "1", "--no-progress", "--max-steps", "6", "--eval-interval", "3"]


def metrics(out: Path) -> list[dict]:
    return rundir.Metrics(out).read()


def curve(out: Path) -> list[tuple]:
    keys = ("step", "tokens", "train_loss", "grad_norm", "lr", "val_loss", "eval_train_loss")
    return [tuple(r.get(k) for k in keys) for r in metrics(out)]


def _interrupted_copy(run: Path, to: Path) -> Path:
    """``run`` as a run killed after its step-3 checkpoint would have left it (its checkpoint-6 gone)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoint-6")
    return to


@pytest.fixture(scope="module")
def micro8(data_dir, tmp_path_factory) -> Path:
    """6 uninterrupted steps of micro-batch 8 x accumulation 1, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("micro8")
    assert main(["train", "--data", str(data_dir), "--out", str(out), *RUN, "--micro-batch", "8",
                 "--grad-accum", "1"]) == 0
    return out


def test_resume_may_re_split_the_batch_when_the_product_stays(micro8, tmp_path, capsys):
    out = _interrupted_copy(micro8, tmp_path / "run")
    err = one_line_error(capsys, "train", "--out", str(out), "--resume", "auto", "--micro-batch", "4")
    assert "micro-batch x grad-accum x ranks would be 4 x 1 x 1 = 4, was 8 x 1 x 1 = 8; keep the product " \
           "(e.g. --grad-accum 2)" in err
    assert main(["train", "--out", str(out), "--resume", "auto", "--micro-batch", "4", "--grad-accum", "2"]) == 0
    assert "with micro-batch x grad-accum x ranks 4 x 2 x 1 = 8 (was 8 x 1 x 1 = 8)" in capsys.readouterr().err
    ours, ref = metrics(out), metrics(micro8)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, 7))
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]
    # accumulation sums the two micro-batches' gradients in another order than one batch's reduction: equal to
    # fp32 rounding (about 1e-7 relative per operation, grown over 3 steps), the tolerances of
    # test_grad_accumulation_matches_one_big_batch
    for a, b in zip(ours[3:], ref[3:], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert ours[5]["val_loss"] == pytest.approx(ref[5]["val_loss"], abs=1e-5)  # the same evaluation rows
    assert ours[:3] == ref[:3]  # the lines before the checkpoint are kept as they were
    wa, wb = (load_file(run / "checkpoint-6" / "model.safetensors") for run in (out, micro8))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    state = json.loads((out / "checkpoint-6" / rundir.TRAINER_STATE).read_text())
    assert state["sampler"]["micro_batch"] == 4 and state["sampler"]["eval_rows"] == 16


def _as_if_trained_on(ckpt: Path, world: int) -> None:
    """A checkpoint of a run on ``world`` ranks (simulated: what it records of the world size)."""
    saved = json.loads((ckpt / rundir.RUN_CONFIG).read_text())
    (ckpt / rundir.RUN_CONFIG).write_text(json.dumps({**saved, "world_size": world}))


def test_a_new_world_size_is_refused_unless_re_split_or_allowed(micro8, tmp_path, capsys):
    ckpt = tmp_path / "two-ranks"
    shutil.copytree(micro8 / "checkpoint-3", ckpt)
    _as_if_trained_on(ckpt, 2)  # 8 x 1 x 2 = 16 sequences per step, resumed on one rank
    resume = ["train", "--out", str(tmp_path / "one"), "--resume", str(ckpt), "--max-steps", "4"]
    err = one_line_error(capsys, *resume)
    assert "would be 8 x 1 x 1 = 8, was 8 x 1 x 2 = 16; keep the product (e.g. --grad-accum 2) so every step " \
           "trains on the same sequences or pass --allow-new-world-size" in err
    assert not (tmp_path / "one").exists()
    assert main([*resume, "--grad-accum", "2"]) == 0  # 8 x 2 x 1: the same 16 sequences per step
    assert "the same sequences per step" in capsys.readouterr().err
    assert main([*resume[:2], str(tmp_path / "allowed"), *resume[3:], "--allow-new-world-size"]) == 0
    err = capsys.readouterr().err
    assert "--allow-new-world-size: 2 -> 1 ranks change the sequences per step from 8 x 1 x 2 = 16 to " \
           "8 x 1 x 1 = 8" in err
    assert metrics(tmp_path / "allowed")[-1]["tokens"] == 4 * 8 * 32  # (the checkpoint's 3 steps ran 8 x 32)
    # the permission was for that resume only: the next one on another world size asks again
    _as_if_trained_on(tmp_path / "allowed" / "checkpoint-4", 2)
    assert "--allow-new-world-size" in one_line_error(capsys, "train", "--out", str(tmp_path / "allowed"),
                                                      "--resume", "auto", "--max-steps", "5")


# -- the ranks resume one checkpoint ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_on_rank(rank: int, port: int, out: str, data: str, fault: str, report: str) -> None:
    """One of two gloo ranks resuming ``out``; rank 1 sees the run folder otherwise (``fault``)."""
    from tinygemma.config import UserError
    from tinygemma.train.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank == 1 and fault == "older-latest":  # its listing lags: the newest checkpoint is step 2
        rundir.latest_checkpoint = lambda run: Path(run) / "checkpoint-2"
    if rank == 1 and fault == "stale-state":  # it reads another step in the checkpoint rank 0 chose
        real = rundir.read_checkpoint_meta
        rundir.read_checkpoint_meta = lambda ckpt: ({**real(ckpt)[0], "step": 2}, real(ckpt)[1])
    try:
        trainer = Trainer({"data": data, "out": out, "max_steps": 6}, resume="auto")
        trainer.close()
        result = {"ckpt": Path(trainer.ckpt).name, "step": trainer.state.step}
    except UserError as e:
        result = {"error": str(e)}
    Path(report, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory) -> Path:
    from tinygemma.train.trainer import train

    out = tmp_path_factory.mktemp("two-checkpoints")
    train({"data": str(data_dir), "out": str(out), "model": "tiny", "block_size": 32, "micro_batch": 1,
           "grad_accum": 1, "eval_batches": 1, "progress": False, "max_steps": 4, "eval_interval": 2}, recipe="adamw")
    for step in (2, 4):
        _as_if_trained_on(out / f"checkpoint-{step}", 2)  # a 2-rank run, which 2 ranks resume
    return out


@pytest.mark.slow  # two spawned ranks
@pytest.mark.parametrize("fault", ["older-latest", "stale-state"])
def test_ranks_resume_rank_0s_checkpoint_or_refuse_together(two_checkpoints, data_dir, tmp_path, fault):
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    mp.start_processes(_resume_on_rank, args=(_free_port(), str(out), str(data_dir), fault, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if fault == "older-latest":  # rank 1 follows rank 0's choice
        assert got == [{"ckpt": "checkpoint-4", "step": 4}] * 2
    else:  # every rank stops, saying why, in one line
        assert all("rank 1 sees checkpoint (path, step)" in g["error"] and ", 2)" in g["error"] for g in got), got
        assert all(len(g["error"].splitlines()) == 1 for g in got)


# -- --deterministic ----------------------------------------------------------------------------------------
def _settings() -> tuple:
    import torch._inductor.config as inductor

    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, inductor.deterministic)


def test_deterministic_holds_while_training_and_a_resume_stays_bit_exact(data_dir, tmp_path, monkeypatch):
    from tinygemma.train import trainer as train_module

    real, during = train_module.forward_backward, []

    def recording(*args):
        during.append(_settings())
        return real(*args)

    monkeypatch.setattr(train_module, "forward_backward", recording)
    before = _settings()
    assert before == (False, False, False, False)
    args = ["train", "--data", str(data_dir), *RUN, "--micro-batch", "4", "--grad-accum", "1", "--deterministic"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert set(during) == {(True, True, False, True)} and len(during) == 6
    assert _settings() == before  # restored: the flag is the run's, not the process's
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # read once by cuBLAS: left set (documented)
    out = _interrupted_copy(tmp_path / "ref", tmp_path / "resumed")
    assert main(["train", "--out", str(out), "--resume", "auto", "--no-progress"]) == 0
    assert curve(out) == curve(tmp_path / "ref")  # every logged loss, grad norm, LR, bit for bit
    wa, wb = (load_file(run / "checkpoint-6" / "model.safetensors") for run in (out, tmp_path / "ref"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
