"""What a training run is made of: its config and recipes, batches, schedule, optimizer, step and checkpoint files.

:class:`tinygemma.trainer.Trainer` runs these pieces (``tinygemma train``): random windows from a memmap, AdamW
(or Muon for the blocks' matrices, see optim.py) with warmup + cosine decay fitted to the budget, gradient
accumulation, fp32 master weights with bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing),
optional torch.compile, DDP under torchrun, and checkpoints that resume bit for bit.

Determinism: the batches of optimizer step ``s`` are a pure function of (seed, s), and rank r takes
its slice of them, so a resumed run, a run with more accumulation or a run on more ranks sees exactly
the same global batch. Nothing else in the loop draws random numbers.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygemma import run
from tinygemma.config import UserError, from_dict, load_json, parse_override
from tinygemma.evaluate import write_samples_report
from tinygemma.export import write_hf_files
from tinygemma.generate import SamplingConfig, default_device, parse_device
from tinygemma.model import Gemma3, ModelConfig
from tinygemma.optim import OPTIMIZERS, PRECISIONS, Optimizers, Precision, lr_factor
from tinygemma.tokenizer import Tokenizer

RECIPES_DIR = Path(__file__).with_name("recipes")
BUDGET_KEYS = ("max_steps", "max_tokens", "time_budget")
MUON_KEYS = ("muon_lr", "muon_weight_decay", "muon_momentum")
# Keys that may change when resuming (budget, bookkeeping); anything else would silently change the run.
RESUMABLE_KEYS = {*BUDGET_KEYS, "data", "out", "eval_interval", "save_interval", "log_interval", "keep_last",
                  "compile", "progress", "wandb", "wandb_project", "nonfinite", "peak_tflops", "device"}
# Dense bf16 tensor-core peak per GPU in TFLOP/s (vendor datasheets, no sparsity); matched as a
# substring of torch.cuda.get_device_name(), first match wins. MFU = achieved FLOP/s / peak.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A6000", 155.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
               ("RTX 3090", 71.0))


@dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the ``adamw`` recipe for gemma3-270m (so configs saved
    before the optimizer fields existed resume as what they were); the ``default`` recipe is ``muon``."""

    data: str = field(default="data/tinystories", metadata={"help": "prepared data folder"})
    out: str = field(default="runs/gemma3-270m", metadata={"help": "run folder (checkpoints, metrics, plots)"})
    model: str = field(default="gemma3-270m", metadata={"help": "preset (gemma3-270m|small|tiny) or config JSON"})
    finetune_from: str | None = field(default=None, metadata={"help": "start from this checkpoint's weights and "
                                                                       "train on instruct records (finetune)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="auto", metadata={"help": "auto|bf16|fp16|fp32 (auto: bf16 autocast on CUDA "
                                                               "with bf16, fp16 + loss scaling on older CUDA "
                                                               "GPUs, fp32 on CPU)"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile (default: on for CUDA)"})
    # batch: tokens per optimizer step = block_size x micro_batch x grad_accum x ranks
    block_size: int = 512
    micro_batch: int = 32
    grad_accum: int = 4
    # budget: exactly one of these (a command-line budget replaces the recipe's)
    max_steps: int | None = None
    max_tokens: int | None = 614_400_000
    time_budget: float | None = field(default=None, metadata={"help": "minutes of training (wall clock, "
                                                                      "evaluations included)"})
    # optimizer and schedule
    optimizer: str = field(default="adamw", metadata={"help": "adamw (AdamW on all weights)|muon (Muon on the "
                                                               "blocks' matrices, AdamW on the rest)"})
    lr: float = field(default=6e-4, metadata={"help": "peak LR (AdamW groups)"})
    muon_lr: float | None = field(default=None, metadata={"help": "Muon's peak LR, on AdamW's scale "
                                                                   "(match_rms_adamw; default: lr)"})
    muon_weight_decay: float | None = field(default=None, metadata={"help": "Muon's weight decay "
                                                                             "(default: weight_decay)"})
    muon_momentum: float | None = field(default=None, metadata={"help": "Muon's momentum (default: 0.95)"})
    min_lr: float | None = field(default=None, metadata={"help": "final LR (default: lr x min_lr_ratio)"})
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = field(default=None, metadata={"help": "warmup steps (default: warmup_frac)"})
    warmup_frac: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    nonfinite: str = field(default="stop", metadata={"help": "on a NaN/inf loss or grad norm: stop|skip"})
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: int | None = field(default=None, metadata={"help": "checkpoint every N steps "
                                                                      "(default: eval_interval)"})
    keep_last: int = 3
    peak_tflops: float | None = field(default=None, metadata={"help": "device peak for MFU (default: table)"})
    samples: bool = field(default=False, metadata={"help": "write a samples report (samples.md + .html) "
                                                            "at each evaluation"})
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "tinygemma"

    def __post_init__(self):
        checks = [
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.precision in PRECISIONS, f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be adamw or muon, got {self.optimizer!r}"),
            (self.optimizer == "muon" or all(getattr(self, k) is None for k in MUON_KEYS),
             f"{', '.join(k for k in MUON_KEYS if getattr(self, k) is not None)} set, but optimizer is "
             f"{self.optimizer!r} (they need optimizer=muon; for all-AdamW use --recipe adamw)"),
            (self.muon_lr is None or self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}"),
            (self.muon_weight_decay is None or self.muon_weight_decay >= 0,
             f"muon_weight_decay must be >= 0, got {self.muon_weight_decay}"),
            (self.muon_momentum is None or 0 <= self.muon_momentum < 1,
             f"muon_momentum must lie in [0, 1), got {self.muon_momentum}"),
            (self.nonfinite in ("stop", "skip"), f"nonfinite must be stop or skip, got {self.nonfinite!r}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.min_lr is None or self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps is None or self.warmup_steps >= 0,
             f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.warmup_frac < 1, f"warmup_frac must lie in [0, 1), got {self.warmup_frac}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.eps > 0, f"eps must be positive, got {self.eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be positive, got {self.peak_tflops}"),
        ]
        for name in ("block_size", "micro_batch", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                     "keep_last", "max_steps", "max_tokens", "save_interval"):
            value = getattr(self, name)
            checks.append((value is None or value >= 1, f"{name} must be >= 1, got {value}"))
        checks.append((self.time_budget is None or self.time_budget > 0,
                       f"time_budget must be positive, got {self.time_budget}"))
        budgets = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        checks.append((len(budgets) == 1, f"give exactly one of max_steps, max_tokens, time_budget (got "
                                          f"{', '.join(budgets) or 'none'})"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio

    @property
    def matrix_lr(self) -> float:
        return self.muon_lr if self.muon_lr is not None else self.lr

    @property
    def matrix_weight_decay(self) -> float:
        return self.muon_weight_decay if self.muon_weight_decay is not None else self.weight_decay

    @property
    def matrix_momentum(self) -> float:
        return self.muon_momentum if self.muon_momentum is not None else 0.95


# -- configuration: recipe file + flags + --set ----------------------------------------------------------
def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe is a JSON object of TrainConfig fields; ``description`` is free text and ignored."""
    path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
            raise UserError(f"unknown recipe {name_or_path!r}: not one of {known} nor a JSON file")
    data = load_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    data = {k: v for k, v in data.items() if k != "description"}
    from_dict(TrainConfig, data, f"recipe {path.name}")  # reject unknown keys early, naming the file
    return data


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        keys, value = parse_override(item)
        if keys[0] == "train" and len(keys) > 1:  # accept --set train.lr=... too
            keys = keys[1:]
        if len(keys) != 1:
            raise UserError(f"--set {item!r}: training keys are flat (e.g. lr=3e-4)")
        out[keys[0]] = value
    return out


def resolve_config(base: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """``base`` (recipe or checkpoint config) updated by ``overrides``; a budget override replaces the others."""
    merged = dict(base)
    if any(k in overrides for k in BUDGET_KEYS):
        for k in BUDGET_KEYS:
            merged[k] = None
    merged.update(overrides)
    return from_dict(TrainConfig, merged, "config")


# -- data -----------------------------------------------------------------------------------------------
class Sampler:
    """Random windows of block_size + 1 tokens; the global batch of a step depends only on (seed, step)."""

    kind = "random_windows"

    def __init__(self, tokens: np.ndarray, block_size: int, micro_batch: int, grad_accum: int,
                 rank: int, world: int, seed: int):
        self.tokens, self.block, self.micro, self.accum = tokens, block_size, micro_batch, grad_accum
        self.rank, self.world, self.seed = rank, world, seed

    def _choices(self) -> int:
        return len(self.tokens) - self.block  # window starts

    def _batch(self, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.tokens[i: i + self.block + 1] for i in starts]).astype(np.int64))

    def _draw(self, rng: np.random.Generator, count: int) -> list:
        """``count`` global batches from ``rng``; this rank's slice of each."""
        picks = rng.integers(0, self._choices(), size=(count, self.world, self.micro))
        return [self._batch(picks[i, self.rank]) for i in range(count)]

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches for optimizer step ``step``: grad_accum tensors of (micro, block+1)."""
        return self._draw(np.random.default_rng([self.seed, 0, step]), self.accum)

    def fixed_batches(self, purpose: int, count: int) -> list:
        """``count`` global batches that are the same at every evaluation."""
        return self._draw(np.random.default_rng([self.seed, purpose]), count)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "world": self.world, "micro_batch": self.micro,
                "grad_accum": self.accum, "block_size": self.block}


class RecordSampler(Sampler):
    """Fine-tuning: whole instruct records, one per row from its start (padded, never packed, so no row
    attends across records); batches are (x, y) with y = -100 where the loss does not train."""

    kind = "random_records"

    def _choices(self) -> int:
        return len(self.tokens)  # records of an InstructDataset

    def _batch(self, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.batch(records, self.block)


# -- schedule -------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int, total_steps: int | None) -> float:
    """The AdamW groups' LR at ``step``: ``lr`` times the schedule (:func:`tinygemma.optim.lr_factor`)."""
    return cfg.lr * lr_factor(cfg, step, total_steps)


# -- device, precision, optimizer -----------------------------------------------------------------------
def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    device = parse_device(default_device() if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def training_bytes(mc: ModelConfig, cfg: TrainConfig) -> int:
    """A lower bound of one process's training memory: 16 bytes per parameter (fp32 weights, gradients and
    AdamW's two moments) plus, per token of a micro-batch, the float32 activations backward keeps in every
    layer (at least the block's input, attention output, and the MLP's gate and up projections)."""
    per_token = mc.num_layers * (2 * mc.hidden_size + 2 * mc.intermediate_size) * 4
    return 16 * mc.param_breakdown()["total"] + cfg.micro_batch * cfg.block_size * per_token


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


def forward_backward(step_model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     precision: Precision) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step over ``batches`` (x, y).

    ``step_model`` is what runs the batches (plain, compiled and/or DDP-wrapped).
    Each micro-loss is divided by the number of micro-batches, so the gradient is that of one big batch;
    under DDP, gradients are all-reduced only on the last micro-batch. Returns the mean loss, still on the
    device (no host sync here).
    """
    ddp = isinstance(step_model, torch.nn.parallel.DistributedDataParallel)
    loss_sum = None
    for i, (x, y) in enumerate(batches):
        with nullcontext() if (not ddp or i == len(batches) - 1) else step_model.no_sync():
            with precision.autocast():
                _, loss = step_model(x, y, return_logits=False)
            precision.backward(loss / len(batches))
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    return loss_sum / len(batches)


# -- checkpoints ----------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def write_samples(model: Gemma3, out: Path, step: int, seed: int) -> list[str]:
    """The samples report of the tutorial's prompts (``OUT/samples.md`` + ``.html``); returns the stories."""
    report = write_samples_report(model, Tokenizer(), out / "samples.md", cfg=SamplingConfig(max_new_tokens=150,
                                  seed=seed), title=f"{out.name}: samples at step {step}")
    return [f"{r['prompt']}{r['text']}" for r in report["samples"]]


def write_checkpoint(folder: Path, model: Gemma3, optimizer: Optimizers, state: dict[str, Any],
                     run_config: dict[str, Any], card: dict[str, Any] | None = None) -> Path:
    """Write one complete checkpoint folder atomically: everything goes to ``.tmp-NAME`` and is then renamed.

    Contents: a complete Hugging Face model (config.json, model.safetensors, tokenizer files,
    generation_config.json, README.md model card from ``card``) plus optimizer.pt, rng_state.pt,
    trainer_state.json and run_config.json. ``model`` is the plain module (never compiled/DDP-wrapped).
    """
    tmp = run.temp_dir(folder)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng_state.pt")
    (tmp / run.TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (tmp / run.RUN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")
    write_hf_files(tmp, card)
    run.replace_dir(tmp, folder)
    return folder


def load_torch(path: Path, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: unreadable or corrupt ({type(e).__name__})") from None


class Stop:
    """SIGINT/SIGTERM: the first asks for a checkpoint and a clean exit; a second one exits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: writing a checkpoint, then exiting (again to exit now)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
