"""Optimizer recipes (AdamW, Muon + AdamW), the LR multiplier, precision resolution and the scaler's state."""

import warnings

import pytest
import torch

from tinygemma.model import Gemma3, load_model_config
from tinygemma.train.config import TrainConfig, load_recipe, resolve_config
from tinygemma.train.optim import Precision, build_optimizer, lr_at, lr_factor, set_lr, split_params

CPU = torch.device("cpu")
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model() -> Gemma3:
    return Gemma3(load_model_config("tiny"))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(max_steps=100, max_tokens=None, **kw)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_groups_cover_every_parameter_exactly_once(model, optimizer):
    extra = {"muon_lr": 2e-2} if optimizer == "muon" else {}
    opt = build_optimizer(model, _cfg(optimizer=optimizer, lr=1e-3, **extra), CPU)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {id(p) for n, p in model.named_parameters() if n.split(".")[-2] in MATRICES}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == matrices  # embedding/head and norm gains never decay
    if optimizer == "muon":
        muon = opt.optimizers["muon"].param_groups
        assert {id(p) for g in muon for p in g["params"]} == matrices
        assert [g["peak_lr"] for g in muon] == [2e-2] and muon[0]["adjust_lr_fn"] == "match_rms_adamw"
        adamw = {names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
        assert "model.embed_tokens.weight" in adamw and all(n.endswith("norm.weight") for n in adamw - {
            "model.embed_tokens.weight"})
    else:  # today's layout (decayed matrices, then the rest), so older checkpoints load
        assert list(opt.optimizers) == ["adamw"] and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert set(opt.state_dict()) == {"state", "param_groups"}
    assert sum(len(v) for v in split_params(model).values()) == len(list(model.parameters()))


def test_every_group_follows_the_same_schedule_shape(model):
    cfg = _cfg(optimizer="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10)
    opt = build_optimizer(model, cfg, CPU)
    for step in (0, 5, 9, 50, 99, 100):
        factor = lr_factor(cfg, step, 100)
        set_lr(opt, factor)
        assert [g["lr"] for g in opt.param_groups] == [2e-2 * factor, 1e-3 * factor]
        assert lr_at(cfg, step, 100) == 1e-3 * factor
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)


def test_optimizer_state_round_trips_per_inner_optimizer(model):
    cfg = _cfg(optimizer="muon", lr=1e-3, muon_lr=2e-2)
    opt = build_optimizer(model, cfg, CPU)
    model(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"] and state["adamw"]["state"]
    fresh = build_optimizer(model, cfg, CPU)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"],
                       state["muon"]["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="optimizer state holds"):
        fresh.load_state_dict({"adamw": state["adamw"]})


def test_recipes_differ_only_in_the_optimizer():
    adamw, muon = (resolve_config(load_recipe(r), {}) for r in ("adamw", "muon"))
    assert adamw.optimizer == "adamw" and muon.optimizer == "muon" and muon.matrix_lr == muon.lr
    same = {k: v for k, v in vars(adamw).items() if k != "optimizer" and not k.startswith("muon_")}
    assert same == {k: v for k, v in vars(muon).items() if k in same}


@pytest.mark.parametrize("choice, device, bf16, expected", [
    ("auto", "cpu", False, "fp32"), ("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"),
    ("fp16", "cpu", False, "fp16"), ("bf16", "cpu", False, "bf16"), ("fp32", "cuda", True, "fp32"),
])
def test_precision_resolution(monkeypatch, choice, device, bf16, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler("cuda") without CUDA warns and disables itself
        p = Precision(choice, torch.device(device))
    assert p.name == expected and (p.scaler is not None) == (expected == "fp16")
    assert asked in ([], [False])  # emulated bf16 does not count


def test_fp16_scaler_state_round_trips_and_a_skipped_step_lowers_the_scale(model):
    p = Precision("fp16", CPU)
    opt = build_optimizer(model, _cfg(lr=1e-3), CPU)
    before = [t.clone() for t in model.parameters()]
    with p.autocast():
        loss = model(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))[1]
    p.backward(loss)
    model.model.embed_tokens.weight.grad[0, 0] = float("inf")
    norm, bad = p.clip_and_step(opt, model.parameters(), 1.0)
    assert bad and not torch.isfinite(norm) and p.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    other = Precision("fp16", CPU)
    other.load_state_dict(p.state_dict())
    assert other.state_dict() == p.state_dict() and Precision("fp32", CPU).state_dict() == {}


def test_compile_only_where_triton_runs(monkeypatch, caplog):
    # torch.compile's GPU backend (Triton) needs compute capability >= 7.0: a P100 trains eagerly, said once
    from tinygemma.config import UserError
    from tinygemma.train.hardware import use_compile

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert use_compile(None, cuda) is False
    assert "compute capability 6.0; Triton needs 7.0" in caplog.text  # tinygemma.log's warning
    assert use_compile(False, cuda) is False
    with pytest.raises(UserError, match="compile=true: Tesla P100"):
        use_compile(True, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert use_compile(None, cuda) is True and use_compile(False, cuda) is False
    cpu = torch.device("cpu")
    assert use_compile(None, cpu) is False and use_compile(True, cpu) is True


def test_rng_state_is_the_device_in_use_and_resumes_with_fewer_gpus(monkeypatch):
    # a checkpoint keeps the RNG of the GPU it trained on only; one that kept every visible GPU's (older
    # checkpoints) resumes on a machine with fewer GPUs from the state of the device in use (was IndexError)
    from tinygemma.train.checkpoint import rng_states, set_rng_states

    states = rng_states(torch.device("cpu"))
    assert states["cuda"] is None
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, device.index]))
    one_gpu = torch.device("cuda", 0)
    set_rng_states(rng_states(one_gpu), one_gpu)
    assert restored[-1][0].tolist() == [7, 0] and restored[-1][1] == one_gpu
    four = [torch.tensor([i]) for i in range(4)]  # saved on a 4-GPU machine
    set_rng_states({**states, "cuda": four}, one_gpu)
    assert restored[-1][0].tolist() == [0]
    set_rng_states({**states, "cuda": four[:1]}, torch.device("cuda", 2))  # index past what was saved: skipped
    set_rng_states({**states, "cuda": four}, torch.device("cpu"))
    assert len(restored) == 2
    a = torch.rand(3)
    set_rng_states(states, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)  # the CPU generator is restored to where rng_states() read it
