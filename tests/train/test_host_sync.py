"""No host sync in a training step except where its results are read (log, evaluation and checkpoint steps, the
last one): a sync makes the host wait for the GPU before it can queue the next kernels. Counted on CPU, where
the same calls are made: every op that hands a tensor's value to Python (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``bool(t)``; ``nonzero``, ``equal``, ``masked_select``, whose output size depends on values) seen by a
TorchDispatchMode, plus ``.tolist()``, ``.numpy()``, ``.cpu()`` and ``torch.cuda.synchronize``, which read
without dispatching such an op. One read is left out: the model's check of token ids, which runs on CPU only
(model.py: free there; skipped on accelerators, where it would be a sync). Without a read, a step with a
non-finite gradient is skipped on the device and reported at the next read step."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinygemma import rundir

aten = torch.ops.aten
VALUE_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
             aten.masked_select.default}
READS = ("tolist", "numpy", "cpu")
CPU_ONLY = "if lo < 0 or hi >= cfg.vocab_size:"  # the model's id check (CPU only)


def _where() -> str:
    """The innermost frame of tinygemma's code: file, function and line."""
    for frame in reversed(traceback.extract_stack()):
        if "/tinygemma/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.name}: {frame.line}"
    return "?"


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def note(self, what: str) -> None:
        where = _where()
        if not where.endswith(CPU_ONLY):
            self.seen.append(f"{what} in {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in VALUE_OPS:
            self.note(str(func))
        return func(*args, **(kwargs or {}))


def install_counter(monkeypatch) -> SyncCounter:
    """A SyncCounter that also counts the reads that dispatch no value op (they stay patched with ``monkeypatch``)."""
    count = SyncCounter()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            count.note(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: count.note("cuda.synchronize"))
    return count


@pytest.fixture()
def counter(monkeypatch) -> SyncCounter:
    return install_counter(monkeypatch)


# step 4 and 8 read (log_interval 4; eval and checkpoint at 8); the others must not
CONFIG = {"model": "tiny", "block_size": 32, "micro_batch": 2, "grad_accum": 2, "lr": 3e-3, "eval_batches": 1,
          "log_interval": 4, "eval_interval": 8, "max_steps": 8, "max_tokens": None, "progress": False}
CASES = {"muon": ("default", {}), "adamw": ("adamw", {}), "muon-skip": ("default", {"nonfinite": "skip"}),
         "fp16-adamw": ("adamw", {"precision": "fp16"}), "fp16-muon": ("default", {"precision": "fp16"})}


def syncs_per_step(data_dir, out, recipe: str, extra: dict, counter: SyncCounter) -> list[list[str]]:
    """What each of the 8 steps of a run read to the host."""
    from tinygemma.train.trainer import Trainer

    trainer = Trainer({"data": str(data_dir), "out": str(out), **CONFIG, **extra}, recipe=recipe)
    seen = []
    try:
        for _ in range(8):
            counter.seen.clear()
            with counter:
                trainer.train_step()
            seen.append(list(counter.seen))
    finally:
        trainer.close()
    return seen


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c.startswith("fp16") else [])
                                  for c in CASES])  # fp16 autocast is emulated on CPU: slow
def test_no_host_sync_between_read_steps(data_dir, tmp_path, counter, case):
    recipe, extra = CASES[case]
    seen = syncs_per_step(data_dir, tmp_path, recipe, extra, counter)
    between = {step: s for step, s in enumerate(seen, 1) if step not in (4, 8)}
    assert between == {step: [] for step in between}, between
    assert seen[3] and seen[7]  # the counter sees the read steps' one copy (and fp16's loss-scale read)


# -- non-finite steps without a host read: skipped on the device, reported at the next read step -----------
def _nan_at_second_step(monkeypatch):
    from tinygemma.train import trainer as train_module  # the module that calls forward_backward

    real, calls = train_module.forward_backward, []

    def poisoned(step_model, batches, precision):
        loss = real(step_model, batches, precision)
        calls.append(1)
        if len(calls) == 2:  # as a blown-up activation would: NaN in one gradient
            next(step_model.parameters()).grad[0, 0] = float("nan")
        return loss
    monkeypatch.setattr(train_module, "forward_backward", poisoned)


@pytest.mark.parametrize("recipe", ["adamw", "default"])  # fused AdamW's found_inf; Muon's put-back copy
def test_a_skipped_step_is_undone_on_the_device_and_reported_at_the_next_read(data_dir, tmp_path, monkeypatch,
                                                                               caplog, recipe):
    from safetensors.torch import load_file

    from tinygemma.train.optim import Precision
    from tinygemma.train.trainer import train

    run = {"data": str(data_dir), **CONFIG, "nonfinite": "skip"}
    real = Precision.clip_and_step
    calls = []

    def no_step_at_second(self, optimizer, params, grad_clip, guard=True):  # the reference: step 2 does nothing
        calls.append(1)
        if len(calls) == 2:
            return torch.zeros(()), torch.zeros((), dtype=torch.bool)
        return real(self, optimizer, params, grad_clip, guard)
    with monkeypatch.context() as m:
        m.setattr(Precision, "clip_and_step", no_step_at_second)
        train({**run, "out": str(tmp_path / "ref")}, recipe=recipe)
    _nan_at_second_step(monkeypatch)
    state = train({**run, "out": str(tmp_path / "skip")}, recipe=recipe)
    assert state.skipped_steps == 1
    assert "step 2: non-finite loss" in caplog.text  # said at step 4, the first read
    ref, skip = (load_file(tmp_path / r / "checkpoint-8" / "model.safetensors") for r in ("ref", "skip"))
    assert all(torch.equal(ref[k], skip[k]) for k in ref)  # the NaN step left no trace, bit for bit


def test_nonfinite_stop_names_the_step_at_the_next_read(data_dir, tmp_path, monkeypatch):
    from tinygemma.config import UserError
    from tinygemma.train.trainer import train

    _nan_at_second_step(monkeypatch)
    with pytest.raises(UserError, match=r"^step 2: non-finite gradient norm \(loss .*, grad norm nan\); stopped "
                                        r"\(last good checkpoint: none;") as e:
        train({"data": str(data_dir), "out": str(tmp_path), **CONFIG}, recipe="default")
    assert len(str(e.value).splitlines()) == 1
    assert rundir.Metrics(tmp_path).read() == []  # stopped at step 4, before its line
