"""``tinygemma train``: pre-train a Gemma 3 preset on prepared token data.

One readable loop in the spirit of nanoGPT: random windows from a memmap, AdamW (or Muon for the
blocks' matrices, see optim.py) with warmup + cosine decay fitted to the budget, gradient accumulation,
fp32 master weights with bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing), optional
torch.compile, DDP under torchrun, and checkpoints that resume bit for bit.

Determinism: the batches of optimizer step ``s`` are a pure function of (seed, s), and rank r takes
its slice of them, so a resumed run, a run with more accumulation or a run on more ranks sees exactly
the same global batch. Nothing else in the loop draws random numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tinygemma.config import (
    UserError,
    add_dataclass_args,
    atomic_write_text,
    dataclass_overrides,
    from_dict,
    load_json,
    parse_override,
    replace_dir,
    to_dict,
)
from tinygemma.data import TokenDataset
from tinygemma.evaluate import write_samples_report
from tinygemma.export import write_hf_files
from tinygemma.generate import SamplingConfig, checkpoints
from tinygemma.model import Gemma3, load_model_config
from tinygemma.optim import (
    OPTIMIZERS,
    PRECISIONS,
    Optimizers,
    Precision,
    build_optimizer,
    explain_oom,
    lr_factor,
    set_lr,
)
from tinygemma.plots import write_plots
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

    def __init__(self, tokens: np.ndarray, block_size: int, micro_batch: int, grad_accum: int,
                 rank: int, world: int, seed: int):
        self.tokens, self.block, self.micro, self.accum = tokens, block_size, micro_batch, grad_accum
        self.rank, self.world, self.seed = rank, world, seed

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.tokens[i: i + self.block + 1] for i in starts]).astype(np.int64))

    def _draw(self, rng: np.random.Generator, count: int) -> list[torch.Tensor]:
        """``count`` global batches from ``rng``; this rank's slice of each."""
        starts = rng.integers(0, len(self.tokens) - self.block, size=(count, self.world, self.micro))
        return [self._windows(starts[i, self.rank]) for i in range(count)]

    def step_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches for optimizer step ``step``: grad_accum tensors of (micro, block+1)."""
        return self._draw(np.random.default_rng([self.seed, 0, step]), self.accum)

    def fixed_batches(self, purpose: int, count: int) -> list[torch.Tensor]:
        """``count`` global batches that are the same at every evaluation."""
        return self._draw(np.random.default_rng([self.seed, purpose]), count)

    def state(self) -> dict[str, Any]:
        return {"kind": "random_windows", "seed": self.seed, "world": self.world, "micro_batch": self.micro,
                "grad_accum": self.accum, "block_size": self.block}


# -- schedule -------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int, total_steps: int | None) -> float:
    """The AdamW groups' LR at ``step``: ``lr`` times the schedule (:func:`tinygemma.optim.lr_factor`)."""
    return cfg.lr * lr_factor(cfg, step, total_steps)


# -- device, precision, optimizer -----------------------------------------------------------------------
def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but CUDA is not available")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    write_hf_files(tmp, card)
    replace_dir(tmp, folder)
    return folder


def recover_folders(out: Path) -> None:
    """Tidy after a crash: drop half-written temp folders; bring back a folder caught mid-swap."""
    for tmp in out.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.glob(".old-*"):
        final = old.with_name(old.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def latest_checkpoint(out: Path, tidy: bool) -> Path | None:
    """The newest complete checkpoint of run ``out`` (for --resume auto); ``tidy`` first finishes or
    discards folder swaps that a crash interrupted (rank 0 only)."""
    if not out.is_dir():
        return None
    if tidy:
        recover_folders(out)
    found = checkpoints(out)
    return found[-1][1] if found else None


def read_checkpoint_meta(ckpt: Path) -> tuple[dict, dict]:
    """(trainer_state, run_config) of a checkpoint folder, or a one-line UserError."""
    if not ckpt.is_dir():
        raise UserError(f"--resume {ckpt}: no such checkpoint folder")
    for name in ("config.json", "model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json",
                 "run_config.json"):
        if not (ckpt / name).is_file():
            raise UserError(f"{ckpt}: incomplete checkpoint (no {name})")
    state, run_config = load_json(ckpt / "trainer_state.json"), load_json(ckpt / "run_config.json")
    if not isinstance(state, dict) or "step" not in state or not isinstance(run_config, dict) \
            or "train" not in run_config:
        raise UserError(f"{ckpt}: trainer_state.json or run_config.json is not a tinygemma checkpoint's")
    return state, run_config


def load_torch(path: Path, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: unreadable or corrupt ({type(e).__name__})") from None


# -- the run --------------------------------------------------------------------------------------------
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


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _prepare_out(out: Path, cfg_dict: dict, resume: str | None, force: bool) -> None:
    """Refuse to mix two runs in one folder; with --force start over (old checkpoints are removed)."""
    existing = out / "run_config.json"
    if force:
        for _, p in checkpoints(out):
            shutil.rmtree(p)
        for name in ("best", "metrics.jsonl"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return
    if not existing.is_file() or resume:
        return
    previous = load_json(existing).get("train", {})
    changed = sorted(k for k in set(previous) | set(cfg_dict) if previous.get(k) != cfg_dict.get(k))
    if changed:
        raise UserError(f"{out} holds another run (its config differs in {', '.join(changed[:4])}); "
                        f"use --resume auto, --force or another --out")
    raise UserError(f"{out} already holds this run; use --resume auto to continue or --force to start over")


def train(cfg: TrainConfig, resume: str | None = None, force: bool = False, recipe: str | None = None) -> dict:
    """Run training; returns the final trainer state. Works alone or under torchrun (DDP)."""
    rank, world, local_rank = _dist_env()
    device = pick_device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    out = Path(cfg.out)

    # -- what to resume from
    ckpt = None
    if resume == "auto":
        ckpt = latest_checkpoint(out, tidy=master)
        if ckpt is None and master:
            print(f"--resume auto: no checkpoint in {out}, starting a new run", file=sys.stderr)
    elif resume:
        ckpt = Path(resume)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "best_val_loss": None, "best_step": None, "skipped_steps": 0,
                             "overflow_steps": 0,
                             "elapsed_s": 0.0, "train_time_s": 0.0, "total_steps": None}
    if ckpt is not None:
        saved_state, saved_config = read_checkpoint_meta(ckpt)
        if recipe is not None and recipe != saved_config.get("recipe"):
            raise UserError(f"--recipe {recipe} differs from the checkpoint's ({saved_config.get('recipe')})")
        state.update(saved_state)

    # -- model and data
    model_cfg = load_model_config(cfg.model)
    if cfg.block_size > model_cfg.context_length:
        raise UserError(f"block_size {cfg.block_size} exceeds the model's context length {model_cfg.context_length}")
    train_data = TokenDataset(cfg.data, "train", vocab_size=model_cfg.vocab_size)
    val_data = TokenDataset(cfg.data, "val", vocab_size=model_cfg.vocab_size)
    for ds in (train_data, val_data):
        if len(ds) <= cfg.block_size:
            raise UserError(f"block_size {cfg.block_size} needs more than {len(ds)} tokens ({ds.path})")
    run_config = {"train": to_dict(cfg), "model": to_dict(model_cfg), "recipe": recipe, "world_size": world,
                  "data_meta": {s: train_data.meta["splits"][s]["sha256"] for s in train_data.meta["splits"]}}
    if master:
        if ckpt is None:
            _prepare_out(out, to_dict(cfg), resume, force)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.json", json.dumps(run_config, indent=2) + "\n")
        print("resolved config:\n" + json.dumps(run_config, indent=2), flush=True)

    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model = Gemma3.from_pretrained(ckpt)
        if model.config != model_cfg:
            raise UserError(f"{ckpt}: the checkpoint's model differs from --model {cfg.model}")
    else:
        model = Gemma3(model_cfg)
    model.to(device)
    optimizer = build_optimizer(model, cfg, device)
    precision = Precision(cfg.precision, device)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(load_torch(ckpt / "optimizer.pt", device))
        except (ValueError, KeyError) as e:
            raise UserError(f"{ckpt / 'optimizer.pt'}: does not fit this model ({e})") from None
        precision.load_state_dict(state.pop("scaler", None))
        set_rng_states(load_torch(ckpt / "rng_state.pt", torch.device("cpu")))

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step_model = model
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile:
        step_model = torch.compile(model)
    eval_model = step_model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[local_rank] if device.type == "cuda" else None)

    sampler = Sampler(train_data.tokens, cfg.block_size, cfg.micro_batch, cfg.grad_accum, rank, world, cfg.seed)
    val_batches = Sampler(val_data.tokens, cfg.block_size, cfg.micro_batch, 1, rank, world,
                          cfg.seed).fixed_batches(1, cfg.eval_batches)
    train_eval_batches = sampler.fixed_batches(2, cfg.eval_batches)
    autocast = precision.autocast
    tokens_per_step = cfg.block_size * cfg.micro_batch * cfg.grad_accum * world
    flops_per_token = model_cfg.flops_per_token(cfg.block_size)
    peak = peak_flops(cfg, device)
    peak_total = peak * world if peak else None

    def total_steps() -> int | None:
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.max_tokens is not None:
            return math.ceil(cfg.max_tokens / tokens_per_step)
        return state["total_steps"]  # time budget: re-estimated from measured step times

    def to_device(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    # the evaluation batches never change: move them to the device once
    val_batches = [to_device(b) for b in val_batches]
    train_eval_batches = [to_device(b) for b in train_eval_batches]

    @torch.no_grad()
    def evaluate(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        model.eval()
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for x, y in batches:
            with autocast():
                _, loss = eval_model(x, y, return_logits=False)
            total += torch.stack([loss.double(), torch.ones((), device=device, dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    # -- metrics, plots, W&B (rank 0)
    metrics_path = out / "metrics.jsonl"
    records: list[dict] = []
    if master and metrics_path.exists():
        # keep what the resumed checkpoint had logged; later lines belong to the lost future
        lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        records = [r for r in lines if r["step"] <= state["step"]] if ckpt is not None else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    wandb_run = None
    if master and cfg.wandb:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package (pip install 'tinygemma[wandb]')") from None
        wandb_run = wandb.init(project=cfg.wandb_project, config=run_config, name=out.name, resume="allow")

    def log(record: dict) -> None:
        records.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    hardware = (f"{world} x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                else f"{world} x CPU ({os.cpu_count()} cores)")
    last_eval: dict[str, Any] = {"val_loss": None, "samples": []}

    def save(name: str) -> Path:
        card = {"name": out.name, "step": state["step"], "tokens_seen": state["tokens"], "recipe": recipe,
                "hardware": hardware, "training_time_s": state["train_time_s"], "train_config": to_dict(cfg),
                "val_loss": state["best_val_loss"] if name == "best" else last_eval["val_loss"],
                "val_tokens": cfg.eval_batches * cfg.micro_batch * cfg.block_size * world,
                "samples": last_eval["samples"]}
        trainer_state = {**state, "schedule": {"lr": lr_at(cfg, state["step"], total_steps()),
                                               "total_steps": total_steps(), "tokens_per_step": tokens_per_step},
                         "sampler": {**sampler.state(), "next_step": state["step"]}, "scaler": precision.state_dict()}
        path = write_checkpoint(out / name, model, optimizer, trainer_state, run_config, card)
        if name.startswith("checkpoint-"):
            for _, old in checkpoints(out)[:-cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def last_good() -> str:
        found = checkpoints(out)
        return str(found[-1][1]) if found else "none"

    # -- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps(), initial=state["step"], disable=not (master and cfg.progress),
               dynamic_ncols=True, unit="step")
    save_interval = cfg.save_interval or cfg.eval_interval
    start_wall = time.perf_counter() - state["elapsed_s"]
    steps_here, first_end = 0, 0.0  # steps run by this process; when its first step ended
    window_tokens, window_s = 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Stop() as stop:
        while True:
            total = total_steps()
            if total is not None and state["step"] >= total:
                break
            if cfg.time_budget is not None and time.perf_counter() - start_wall >= cfg.time_budget * 60:
                break
            step = state["step"]
            t0 = time.perf_counter()
            lr = lr_at(cfg, step, total)
            set_lr(optimizer, lr_factor(cfg, step, total))
            batches = [to_device(b) for b in sampler.step_batches(step)]
            with explain_oom(cfg.micro_batch, cfg.block_size, cfg.grad_accum, last_good):
                mean_loss = forward_backward(step_model, batches, precision)
                grad_norm, stepped = precision.clip_and_step(optimizer, model.parameters(), cfg.grad_clip)
            shared = torch.stack([mean_loss, torch.tensor(float(stop.requested), device=device)])
            if world > 1:
                dist.all_reduce(shared)
                shared[0] /= world
            (train_loss, stop_votes), norm = shared.tolist(), grad_norm.item()  # one host sync for both
            finite = math.isfinite(train_loss) and math.isfinite(norm)
            overflow = precision.scaler is not None and not stepped and math.isfinite(train_loss)
            if overflow:
                # fp16 gradient overflow, part of loss scaling: the scaler skipped the step and lowered the scale
                state["overflow_steps"] += 1
                if master:
                    print(f"step {step + 1}: fp16 gradient overflow; step skipped, loss scale now "
                          f"{precision.scaler.get_scale():g}", file=sys.stderr)
            elif not (stepped and finite) and cfg.nonfinite == "skip":
                state["skipped_steps"] += 1
                if master:
                    print(f"step {step + 1}: non-finite loss ({train_loss}) or grad norm ({norm}); step skipped",
                          file=sys.stderr)
            elif not (stepped and finite):
                what = "gradient norm" if math.isfinite(train_loss) else "loss"
                raise UserError(f"step {step + 1}: non-finite {what} (loss {train_loss}, grad norm {norm}); stopped "
                                f"(last good checkpoint: {last_good()}; lower lr or set nonfinite=skip)")
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            state["step"] = step = step + 1
            state["tokens"] += tokens_per_step
            state["train_time_s"] += dt
            window_tokens, window_s = window_tokens + tokens_per_step, window_s + dt
            steps_here += 1
            if cfg.time_budget is not None:
                # wall time per step, evaluations and checkpoints included; the first step (compilation) left out
                now = time.perf_counter() - start_wall
                first_end = now if steps_here == 1 else first_end
                timing = torch.tensor([now, (now - first_end) / (steps_here - 1) if steps_here > 1 else dt],
                                      dtype=torch.float64, device=device)
                if world > 1:  # ranks must agree on the estimated total
                    dist.all_reduce(timing, op=dist.ReduceOp.MAX)
                now, per_step = timing.tolist()
                state["total_steps"] = step + int(max(0.0, cfg.time_budget * 60 - now) / per_step)
                bar.total = state["total_steps"]

            total = total_steps()
            done = step >= total
            is_eval = step % cfg.eval_interval == 0 or done
            record = None
            if step % cfg.log_interval == 0 or is_eval:
                tps = window_tokens / window_s
                record = {"step": step, "tokens": state["tokens"],
                          "train_loss": train_loss if finite or overflow else None,
                          "lr": lr, "grad_norm": norm if finite else None, "tokens_per_s": tps,
                          "mfu": tps * flops_per_token / peak_total if peak_total else None,
                          "peak_mem_mb": peak_memory_mb(device)}
                window_tokens, window_s = 0, 0.0
            if is_eval:
                record["val_loss"] = last_eval["val_loss"] = evaluate(val_batches)
                record["eval_train_loss"] = evaluate(train_eval_batches)
                if cfg.samples and master:
                    last_eval["samples"] = write_samples(model, out, step, cfg.seed)
            state["elapsed_s"] = time.perf_counter() - start_wall
            if record is not None:
                record["elapsed_s"] = state["elapsed_s"]
            if master:
                if record is not None:
                    log(record)
                bar.update(1)
                tps = tokens_per_step / dt
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                mfu=f"{tps * flops_per_token / peak_total:.1%}" if peak_total else "-")
            best = is_eval and (state["best_val_loss"] is None or record["val_loss"] < state["best_val_loss"])
            if best:
                state["best_val_loss"], state["best_step"] = record["val_loss"], step
            stopping = stop_votes > 0
            if master:
                if best:
                    save("best")
                if step % save_interval == 0 or done or stopping:
                    save(f"checkpoint-{step}")
                if is_eval:
                    write_plots(records, out)
            if world > 1 and (is_eval or step % save_interval == 0 or done or stopping):
                dist.barrier()  # nobody reads a checkpoint before rank 0 finished it
            if stopping:
                break
    bar.close()
    if master:
        status = "stopped by signal" if stop.requested else "done"
        best_text = f", best val loss {state['best_val_loss']:.4f} at step {state['best_step']}" \
            if state["best_val_loss"] is not None else ""
        print(f"{status}: step {state['step']}, {state['tokens']:,} tokens{best_text}; checkpoints in {out}")
    if wandb_run is not None:
        wandb_run.finish()
    if world > 1:
        dist.destroy_process_group()
    return state


# -- command line ---------------------------------------------------------------------------------------
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pre-train a model on prepared data",
                              description="Pre-train a Gemma 3 preset; flags override the recipe, --set KEY=VALUE "
                                          "sets any TrainConfig field.")
    p.add_argument("--recipe", default=None, help="default (= muon) | muon | adamw | tutorial | a JSON file "
                                                  "(default: default)")
    p.add_argument("--resume", default=None, metavar="auto|CKPT", help="continue the latest checkpoint in --out "
                                                                        "(auto) or a given checkpoint folder")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable), e.g. --set lr=3e-4")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other")
    overrides = {**dataclass_overrides(args, TrainConfig), **parse_sets(args.sets)}
    recipe = args.recipe
    if args.resume:
        out = Path(overrides.get("out", TrainConfig.out))
        ckpt = None
        if args.resume == "auto":
            ckpt = latest_checkpoint(out, tidy=_dist_env()[0] == 0)
        else:
            ckpt = Path(args.resume)
        if ckpt is not None:
            _, saved = read_checkpoint_meta(ckpt)
            base = saved["train"]
            cfg = resolve_config(base, overrides)
            changed = sorted(k for k in overrides if k not in RESUMABLE_KEYS and overrides[k] != base.get(k))
            if changed:
                raise UserError(f"cannot change {', '.join(changed)} when resuming {ckpt}")
            train(cfg, resume=str(ckpt), recipe=recipe if recipe is not None else saved.get("recipe"))
            return 0
    recipe = recipe or "default"
    cfg = resolve_config(load_recipe(recipe), overrides)
    train(cfg, resume=args.resume, force=args.force, recipe=recipe)
    return 0
