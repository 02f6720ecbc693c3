"""No host sync in a training step except where its results are read (log, evaluation and checkpoint steps, the
last one): a sync makes the host wait for the GPU before it can queue the next kernels. Counted on CPU, where
the same calls are made: every op that hands a tensor's value to Python (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``bool(t)``; ``nonzero``, ``equal``, ``masked_select``, whose output size depends on values) seen by a
TorchDispatchMode, plus ``.tolist()``, ``.numpy()``, ``.cpu()`` and ``torch.cuda.synchronize``, which read
without dispatching such an op. One read is left out: the model's check of token ids, which runs on CPU only
(model.py: free there; skipped on accelerators, where it would be a sync)."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_between_read_steps(data_dir, tmp_path, counter, case):
    recipe, extra = CASES[case]
    seen = syncs_per_step(data_dir, tmp_path, recipe, extra, counter)
    between = {step: s for step, s in enumerate(seen, 1) if step not in (4, 8)}
    assert between == {step: [] for step in between}, between
    assert seen[3] and seen[7]  # the counter sees the read steps' one copy (and fp16's loss-scale read)
