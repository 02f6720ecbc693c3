"""The hardware a training run uses: device choice, peak FLOPs for MFU, the memory estimate and the micro-batch
it picks on a GPU, the attention kernels, and the start line of a CUDA run."""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from tinygemma.config import UserError
from tinygemma.device import parse_device
from tinygemma.fused import CHUNK_ROWS
from tinygemma.log import warn
from tinygemma.model import FULL, SLIDING, Gemma3, ModelConfig, sdpa_kv, window_mask
from tinygemma.train.config import TrainConfig
from tinygemma.train.optim import Precision, split_params

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


# -- memory -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training process: what stays (fp32 weights, gradients, optimizer state), what the
    forward saves for backward, and what the loss holds for a moment (one chunk of logits)."""

    states: int
    saved: int
    transient: int

    @property
    def total(self) -> int:
        return self.states + self.saved + self.transient


def state_bytes(mc: ModelConfig, optimizer: str) -> int:
    """fp32 weights and gradients, AdamW's two moments, and Muon's one momentum buffer for the matrices it
    takes (the split of :func:`split_params`, on a model built on the meta device: no memory)."""
    with torch.device("meta"):
        roles = {role: sum(p.numel() for p in params) for role, params in split_params(Gemma3(mc)).items()}
    total = sum(roles.values())
    muon = roles["matrices"] if optimizer == "muon" else 0
    return 8 * total + 8 * (total - muon) + 4 * muon


def dtype_bytes(dtype: torch.dtype | None) -> int:
    """Bytes per element of an autocast dtype (None: no autocast, float32)."""
    return 4 if dtype is None else torch.finfo(dtype).bits // 8


def saved_bytes(mc: ModelConfig, micro_batch: int, block_size: int, dtype: torch.dtype | None,
                expand_kv: bool = False) -> int:
    """Bytes the forward keeps for backward, parameters aside, as this model saves them under autocast ``dtype``
    (None: fp32) with a fused SDPA kernel (q, k, v, output, log-sum-exp; torch.compile keeps less); ``expand_kv``
    as :func:`tinygemma.model.attend` (CUDA). Within 20% of the saved_tensors_hooks count on CPU
    (tests/train/test_memory.py)."""
    a, h, inter = dtype_bytes(dtype), mc.hidden_size, mc.intermediate_size
    amp = a < 4
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    # per token outside the blocks: ids, the final norm's input and 1/rms, the loss's gradient for x
    per_token = 8 + 4 * h + 4 + a * h
    # the loss's gradient for the head; cos/sin of each RoPE kind
    fixed = 4 * mc.vocab_size * h + len(set(mc.layer_types)) * 2 * block_size * mc.head_dim * 4
    if amp:  # autocast's low-precision copies of the blocks' weights, which each Linear keeps
        fixed += a * mc.num_layers * (2 * h * q + 2 * h * kv + 3 * h * inter)
    for kind in mc.layer_types:
        masked = kind == SLIDING and block_size > mc.sliding_window
        flash = not masked and dtype in (torch.float16, torch.bfloat16)  # (an sm80+ GPU assumed)
        kv_sdpa = q if expand_kv and not flash else kv  # K and V as SDPA sees them (model.sdpa_kv)
        per_token += (8 * h  # the fp32 residual stream before each half of the block
                      + a * h * (5 if amp else 2)  # normed inputs of q/k/v and gate/up: autocast casts per Linear
                      + a * (q + kv)  # q and k projections (their RMSNorms keep them)
                      + a * (2 * q + 2 * kv_sdpa)  # SDPA's q, k, v and output
                      + a * 2 * h  # o_proj and down_proj outputs (the post-norms keep them)
                      + a * 4 * inter  # gate, gelu(gate), up and their product
                      + 4 * (4 + 2 * mc.num_heads + mc.num_kv_heads))  # norms' 1/rms, SDPA's log-sum-exp
        if dtype == torch.float16:  # the overflow guard: fp32 post-norm inputs, scaled attention out, clamped MLP
            per_token += 8 * h + a * (q + inter)
        if masked:
            fixed += a * block_size ** 2  # SDPA's own float copy of the window mask, one per layer
    return micro_batch * block_size * per_token + fixed


def loss_bytes(mc: ModelConfig, tokens: int, dtype: torch.dtype | None) -> int:
    """What the fused loss holds while it runs: one chunk of float32 logits (and its low-precision twin under
    autocast), and under autocast the head's low-precision copy and one low-precision gradient of it."""
    a = dtype_bytes(dtype)
    low = a if a < 4 else 0
    return min(tokens, CHUNK_ROWS) * mc.vocab_size * (4 + low) + 2 * low * mc.vocab_size * mc.hidden_size


def memory_estimate(mc: ModelConfig, cfg: TrainConfig, micro_batch: int, dtype: torch.dtype | None,
                    expand_kv: bool) -> MemoryEstimate:
    return MemoryEstimate(state_bytes(mc, cfg.optimizer),
                          saved_bytes(mc, micro_batch, cfg.block_size, dtype, expand_kv),
                          loss_bytes(mc, micro_batch * cfg.block_size, dtype))


def training_bytes(mc: ModelConfig, cfg: TrainConfig, device: torch.device) -> int:
    """The estimated peak memory of one training process at ``cfg``'s micro-batch on ``device``."""
    dtype = Precision(cfg.precision, device).dtype
    return memory_estimate(mc, cfg, cfg.micro_batch, dtype, expand_kv=device.type == "cuda").total


# -- micro-batch per GPU ----------------------------------------------------------------------------------
FREE_FRACTION = 0.85  # of free memory the estimate may fill: room for the allocator's fragmentation


def pick_micro_batch(mc: ModelConfig, cfg: TrainConfig, free_bytes: int, dtype: torch.dtype | None,
                     expand_kv: bool = True) -> tuple[int, int]:
    """(micro-batch, grad-accum) for a GPU with ``free_bytes`` free: the largest power-of-two micro-batch that
    divides ``cfg``'s micro-batch x grad-accum and whose estimate fits in FREE_FRACTION of it, the product (the
    tokens per step) unchanged. 1 when nothing fits (the memory check then says so)."""
    product, best, micro = cfg.micro_batch * cfg.grad_accum, 1, 2
    while micro <= product and product % micro == 0:
        if memory_estimate(mc, cfg, micro, dtype, expand_kv).total > FREE_FRACTION * free_bytes:
            break
        best, micro = micro, micro * 2
    return best, product // best


def fit_micro_batch(mc: ModelConfig, cfg: TrainConfig, device: torch.device, world: int, say: bool) -> TrainConfig:
    """``cfg`` with the micro-batch :func:`pick_micro_batch` finds for this CUDA GPU (every rank the same: from
    the least free memory among them), said in one line when ``say``."""
    free = torch.tensor(torch.cuda.mem_get_info(device)[0], device=device)
    if world > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    micro, accum = pick_micro_batch(mc, cfg, int(free), Precision(cfg.precision, device).dtype)
    if say:
        print(f"micro-batch {micro} x grad-accum {accum} (the largest that fits {FREE_FRACTION:.0%} of "
              f"{int(free) / 2**30:.1f} GiB free; --micro-batch/--grad-accum set it)", flush=True)
    return replace(cfg, micro_batch=micro, grad_accum=accum)


# -- attention kernels and the start line ----------------------------------------------------------------
def sdpa_backends(mc: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """The SDPA kernel each attention kind of ``mc`` runs in training at ``block_size`` (e.g. ``{"sliding":
    "flash_attention", "full": "efficient_attention"}``): torch's own choice for tensors of the model's shapes,
    dtype and mask (the window's where the block exceeds it), K/V as :func:`tinygemma.model.attend` passes them."""
    out = {}
    for kind in dict.fromkeys(mc.layer_types):
        mask = (window_mask(block_size, block_size, mc.sliding_window, device)
                if kind == SLIDING and block_size > mc.sliding_window else None)
        q, k, v = (torch.zeros(1, heads, block_size, mc.head_dim, dtype=dtype, device=device, requires_grad=True)
                   for heads in (mc.num_heads, mc.num_kv_heads, mc.num_kv_heads))
        k, v, gqa = sdpa_kv(q, k, v, mask, expand_kv=device.type == "cuda")
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, mask is None, scale=mc.query_pre_attn_scalar ** -0.5,
                                         enable_gqa=gqa)
        out[{SLIDING: "sliding", FULL: "full"}[kind]] = SDPBackend(choice).name.lower()
    return out


def describe_cuda(device: torch.device, precision: str, backends: dict[str, str], compiled: bool, need: int,
                  free: int) -> str:
    """The start line of a CUDA run: GPU, versions, precision, attention kernels, compile, memory."""
    major, minor = torch.cuda.get_device_capability(device)
    kernels = ", ".join(f"{kind} {name}" for kind, name in backends.items())
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}); torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {precision}; attention: {kernels}; "
            f"compile {'on' if compiled else 'off'}; memory ~{need / 2**30:.1f} GiB estimated, "
            f"{free / 2**30:.1f} GiB free")


def cuda_start_line(mc: ModelConfig, cfg: TrainConfig, device: torch.device, precision: Precision,
                    compiled: bool) -> str:
    dtype = precision.dtype
    backends = sdpa_backends(mc, cfg.block_size, dtype or torch.float32, device)
    need = memory_estimate(mc, cfg, cfg.micro_batch, dtype, expand_kv=True).total
    return describe_cuda(device, precision.name, backends, compiled, need, torch.cuda.mem_get_info(device)[0])
