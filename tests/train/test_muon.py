"""BatchedMuon: torch.optim.Muon's steps with the Newton-Schulz iteration batched by shape, in far fewer ops."""

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinygemma.model import Gemma3, load_model_config
from tinygemma.train.config import TrainConfig
from tinygemma.train.muon import BatchedMuon
from tinygemma.train.optim import build_optimizer, split_params

# wide, tall and square matrices, several of a shape (as a transformer's blocks have them)
SHAPES = [(48, 32), (48, 32), (16, 32), (32, 48), (32, 48), (32, 32), (16, 32), (48, 32)]
KWARGS = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")


class OpCount(TorchDispatchMode):
    """ATen ops dispatched, and how many of them are views (no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in SHAPES]


def run(optimizer_cls, ps, steps: int, start: int = 0, state=None, **kwargs):
    opt = optimizer_cls(ps, **{**KWARGS, **kwargs})
    if state is not None:
        opt.load_state_dict(state)
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)  # the same gradients for both optimizers
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False}, {"adjust_lr_fn": "original"}])
def test_batched_steps_equal_torch_muon(kwargs):
    ours, theirs = params(), params()
    run(BatchedMuon, ours, 6, **kwargs)
    run(torch.optim.Muon, theirs, 6, **kwargs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6, (a - b).abs().max()


def test_state_loads_across_both_ways():
    # a checkpoint written by torch.optim.Muon (every earlier run) resumes in BatchedMuon, and back
    ref = params()
    run(torch.optim.Muon, ref, 6)
    ours, theirs = params(), params()
    first = run(torch.optim.Muon, ours, 3).state_dict()
    run(BatchedMuon, ours, 3, start=3, state=first)
    second = run(BatchedMuon, theirs, 3).state_dict()
    run(torch.optim.Muon, theirs, 3, start=3, state=second)
    assert set(first["state"][0]) == set(second["state"][0]) == {"momentum_buffer"}
    assert first["param_groups"][0].keys() == second["param_groups"][0].keys()
    for a, b, c in zip(ours, theirs, ref, strict=True):
        assert (a - c).abs().max() <= 1e-6 and (b - c).abs().max() <= 1e-6


def test_build_optimizer_resumes_a_torch_muon_checkpoint():
    model = Gemma3(load_model_config("tiny"))
    cfg = TrainConfig(optimizer="muon", max_steps=10, max_tokens=None)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt.optimizers["muon"], BatchedMuon)
    old = torch.optim.Muon(split_params(model)["matrices"], **KWARGS)
    for p in split_params(model)["matrices"]:
        p.grad = torch.randn_like(p)
    old.step()
    state = opt.state_dict()
    state["muon"] = old.state_dict()
    state["muon"]["param_groups"][0]["peak_lr"] = cfg.matrix_lr
    opt.load_state_dict(state)
    buffers = [s["momentum_buffer"] for s in opt.optimizers["muon"].state_dict()["state"].values()]
    assert len(buffers) == len(split_params(model)["matrices"]) and all(b.abs().sum() > 0 for b in buffers)


def ops_per_step(cls, matrices: list[torch.nn.Parameter]) -> OpCount:
    opt = cls(matrices, **KWARGS)
    for p in matrices:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the momentum buffers
    with OpCount() as count:
        opt.step()
    return count


def test_one_step_issues_fewer_ops_than_matrices():
    # gemma3-270m's 18 layers (126 matrices) at the small preset's widths: torch's Muon issues ~29 ATen ops per
    # matrix (3,602 here), the batched one a few dozen per shape, whatever the depth, fewer kernels than matrices
    counts = {}
    for layers in (6, 18):
        mc = replace(load_model_config("small"), num_layers=layers, layer_types=[])
        matrices = split_params(Gemma3(mc))["matrices"]
        counts[layers] = (len(matrices), ops_per_step(torch.optim.Muon, matrices), ops_per_step(BatchedMuon, matrices))
    (_, _, ours6), (matrices, theirs, ours) = counts[6], counts[18]
    assert ours.ops == ours6.ops and ours.ops - ours.views < matrices and theirs.ops > 25 * matrices, counts
