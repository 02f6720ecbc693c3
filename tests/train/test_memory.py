"""The training memory estimate against what the forward really saves, the micro-batch it picks per GPU, the
attention-kernel probe, the start line of a CUDA run, and huge pages for large CPU buffers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import saved_bytes
from tinygemma import model as model_module
from tinygemma.model import Gemma3, load_model_config
from tinygemma.train import hardware
from tinygemma.train.config import TrainConfig, load_recipe, resolve_config
from tinygemma.train.hardware import (
    FREE_FRACTION,
    describe_cuda,
    fit_micro_batch,
    memory_estimate,
    pick_micro_batch,
    sdpa_backends,
    state_bytes,
)
from tinygemma.train.optim import split_params

CPU = torch.device("cpu")
GiB = 2**30
_models: dict[str, Gemma3] = {}


def built(preset: str) -> Gemma3:
    if preset not in _models:
        torch.manual_seed(0)
        _models[preset] = Gemma3(load_model_config(preset)).train()
    return _models[preset]


def measured(monkeypatch, preset: str, micro: int, block: int, dtype, expand_kv: bool) -> int:
    """Saved bytes of one training forward on CPU; ``expand_kv`` takes the CUDA path of attend()."""
    if expand_kv:  # as on an sm80+ GPU
        monkeypatch.setattr(model_module, "flash_capable", lambda index: True)
        attend = model_module.attend
        monkeypatch.setattr(model_module, "attend", lambda q, k, v, mask, scale, expand_kv=False:
                            attend(q, k, v, mask, scale, expand_kv=True))
    model = built(preset)
    ids, targets = (torch.randint(0, 50257, (micro, block)) for _ in range(2))

    def forward():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(ids, targets, return_logits=False)[1]

    return saved_bytes(forward, exclude=model.parameters())


# fp16 matmuls are slow on CPUs: fp16 only where it is quick in the fast tier
CASES = [(preset, block, dtype, expand) for preset in ("tiny", "small") for block in (128, 512)
         for dtype in (None, torch.bfloat16) for expand in (False, True)]
CASES += [("tiny", 128, torch.float16, False), ("tiny", 128, torch.float16, True),
          pytest.param("small", 512, torch.float16, True, marks=pytest.mark.slow)]


def dtype_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) or value is None else None


@pytest.mark.parametrize("preset, block, dtype, expand_kv", CASES, ids=dtype_id)
def test_saved_bytes_estimate_within_20_percent(monkeypatch, preset, block, dtype, expand_kv):
    estimate = hardware.saved_bytes(load_model_config(preset), 2, block, dtype, expand_kv)
    real = measured(monkeypatch, preset, 2, block, dtype, expand_kv)
    assert 0.8 <= estimate / real <= 1.2, (estimate, real)


@pytest.mark.slow  # builds gemma3-270m and runs 512-token forwards on the CPU (about a minute)
@pytest.mark.parametrize("block, dtype", [(128, None), (128, torch.bfloat16), (512, None), (512, torch.bfloat16)],
                         ids=dtype_id)
def test_saved_bytes_estimate_within_20_percent_gemma3_270m(monkeypatch, block, dtype):
    estimate = hardware.saved_bytes(load_model_config("gemma3-270m"), 1, block, dtype)
    real = measured(monkeypatch, "gemma3-270m", 1, block, dtype, False)
    assert 0.8 <= estimate / real <= 1.2, (estimate, real)


@pytest.mark.parametrize("tied", [True, False])
def test_state_bytes_follow_the_optimizer_split(tied):
    from dataclasses import replace
    mc = replace(load_model_config("tiny"), tie_embeddings=tied)
    roles = {k: sum(p.numel() for p in v) for k, v in split_params(Gemma3(mc)).items()}
    total = sum(roles.values())
    assert state_bytes(mc, "adamw") == 16 * total
    assert state_bytes(mc, "muon") == 16 * total - 4 * roles["matrices"]


# -- micro-batch per GPU ----------------------------------------------------------------------------------
def default_recipe() -> TrainConfig:
    return resolve_config(load_recipe("default"), {})


@pytest.mark.parametrize("free_gb, dtype", [(80, torch.bfloat16), (24, torch.bfloat16), (16, torch.float16),
                                            (8, torch.bfloat16)])
def test_pick_micro_batch_is_the_largest_that_fits(free_gb, dtype):
    mc, cfg = load_model_config("gemma3-270m"), default_recipe()
    free = free_gb * 10**9
    micro, accum = pick_micro_batch(mc, cfg, free, dtype)
    assert micro * accum == cfg.micro_batch * cfg.grad_accum  # tokens per step kept
    assert micro & (micro - 1) == 0
    fits = [m for m in (1, 2, 4, 8, 16, 32, 64, 128)
            if memory_estimate(mc, cfg, m, dtype, expand_kv=True).total <= FREE_FRACTION * free]
    assert micro == max(fits, default=1)


def test_pick_micro_batch_keeps_odd_products_and_falls_back_to_one():
    mc = load_model_config("small")
    cfg = TrainConfig(model="small", block_size=128, micro_batch=4, grad_accum=3, max_steps=1, max_tokens=None)
    assert pick_micro_batch(mc, cfg, 10**12, None) == (4, 3)  # 8 does not divide 12
    assert pick_micro_batch(mc, cfg, 10**6, None) == (1, 12)  # nothing fits: the smallest, the check refuses


def test_fit_micro_batch_says_what_it_picked(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * 10**9, 80 * 10**9))
    mc, cfg = load_model_config("gemma3-270m"), default_recipe()
    fitted = fit_micro_batch(mc, cfg, CPU, world=1, say=True)  # the CPU stands in for the GPU's tensors
    assert (fitted.micro_batch, fitted.grad_accum) == pick_micro_batch(mc, cfg, 24 * 10**9, None)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"micro-batch {fitted.micro_batch} x grad-accum {fitted.grad_accum}" in line


# -- attention kernels and the start line ----------------------------------------------------------------
@pytest.mark.parametrize("block", [8, 128])
def test_sdpa_probe_names_the_kernel_attention_runs(block):
    # the probe's answer for each kind is the kernel the model's own attention call goes through
    mc = load_model_config("tiny")
    probed = sdpa_backends(mc, block, torch.float32, CPU)
    assert set(probed) == {"sliding", "full"}
    q = torch.randn(1, mc.num_heads, block, mc.head_dim, requires_grad=True)
    k, v = (torch.randn(1, mc.num_kv_heads, block, mc.head_dim) for _ in range(2))
    mask = model_module.window_mask(block, block, mc.sliding_window, CPU) if block > mc.sliding_window else None
    for kind, m in (("sliding", mask), ("full", None)):
        name = model_module.attend(q, k, v, m, 0.25).grad_fn.name()
        assert ("Flash" in name) == (probed[kind] == "flash_attention"), (kind, name, probed)


def test_describe_cuda_is_one_line_with_every_fact(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    line = describe_cuda(torch.device("cuda", 0), "bf16", {"sliding": "flash_attention", "full": "cudnn_attention"},
                         True, 30 * GiB, 79 * GiB)
    assert "\n" not in line
    for fact in ("NVIDIA H100 80GB HBM3", "compute capability 9.0", f"torch {torch.__version__}", "CUDA 12.8",
                 "cuDNN 91002", "bf16", "sliding flash_attention", "full cudnn_attention", "compile on",
                 "~30.0 GiB estimated, 79.0 GiB free"):
        assert fact in line, fact


SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not SM80, reason="needs a CUDA GPU of compute capability 8.0 or newer")
@pytest.mark.parametrize("preset", ["tiny", "small", "gemma3-270m"])
def test_no_training_shape_falls_back_to_the_math_kernel_on_sm80(preset):
    # bf16 (auto's choice there) and fp16; fp32 without a mask keeps enable_gqa, which only math takes
    mc, cuda = load_model_config(preset), torch.device("cuda")
    for block in (128, 512, 1024):
        if block <= mc.context_length:
            for dtype in (torch.bfloat16, torch.float16):
                assert "math" not in sdpa_backends(mc, block, dtype, cuda).values(), (block, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_start_line_on_this_gpu():
    from tinygemma.train.hardware import cuda_start_line
    from tinygemma.train.optim import Precision

    cuda = torch.device("cuda")
    line = cuda_start_line(load_model_config("gemma3-270m"), default_recipe(), cuda, Precision("auto", cuda), True)
    assert "\n" not in line and torch.cuda.get_device_name(cuda) in line and "attention: sliding " in line


def test_import_tinygemma_backs_large_cpu_buffers_with_huge_pages():
    """`import tinygemma` sets THP_MEM_ALLOC_ENABLE=1 before torch allocates, unless the user set it: a 400 MB
    tensor (a training step's chunk of logits) then faults in as ~200 huge pages instead of ~100,000 4 KB ones."""
    code = ("import os, resource, tinygemma, torch; faults = lambda: resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_minflt; f = faults(); t = torch.ones(100_000_000); print(os.environ['THP_MEM_ALLOC_ENABLE'], "
            "faults() - f)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    on, off = (subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
               .stdout.split() for e in (env, {**env, "THP_MEM_ALLOC_ENABLE": "0"}))
    assert on[0] == "1" and off[0] == "0"  # set by default, a user's choice kept
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off in this kernel")
    assert int(on[1]) < 5_000
    if "[madvise]" in mode.read_text():  # with [always] the kernel uses huge pages for both
        assert int(off[1]) > 50_000

