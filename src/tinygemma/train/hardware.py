"""The hardware a training run uses: device choice, peak FLOPs for MFU, and the memory estimate."""

from __future__ import annotations

import resource

import torch

from tinygemma.config import UserError
from tinygemma.device import parse_device
from tinygemma.log import warn
from tinygemma.model import ModelConfig
from tinygemma.train.config import TrainConfig

# Dense bf16 tensor-core peak per GPU in TFLOP/s (vendor datasheets, no sparsity); matched as a
# substring of torch.cuda.get_device_name(), first match wins. MFU = achieved FLOP/s / peak.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A6000", 155.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
               ("RTX 3090", 71.0))


# -- device, precision, optimizer -----------------------------------------------------------------------
def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    device = parse_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def use_compile(asked: bool | None, device: torch.device) -> bool:
    """``compile``: None means on for CUDA GPUs that Triton (torch.compile's GPU backend) supports, compute
    capability 7.0 or newer; below that it is off, said in one line, and an explicit ``compile=True`` is refused."""
    if device.type != "cuda":
        return bool(asked)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (7, 0):
        return asked is not False
    why = f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; Triton needs 7.0 or newer"
    if asked:
        raise UserError(f"compile=true: {why} (set compile=false)")
    if asked is None:
        warn(f"torch.compile off: {why}")
    return False


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None  # no honest single number for CPUs: set peak_tflops to get MFU there
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_bytes(mc: ModelConfig, cfg: TrainConfig) -> int:
    """A lower bound of one process's training memory: 16 bytes per parameter (fp32 weights, gradients and
    AdamW's two moments) plus, per token of a micro-batch, the float32 activations backward keeps in every
    layer (at least the block's input, attention output, and the MLP's gate and up projections)."""
    per_token = mc.num_layers * (2 * mc.hidden_size + 2 * mc.intermediate_size) * 4
    return 16 * mc.param_breakdown()["total"] + cfg.micro_batch * cfg.block_size * per_token
