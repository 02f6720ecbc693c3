"""What a training run is made of: its config and recipes, batches, schedule, optimizer, step and checkpoint files.

:class:`tinygemma.trainer.Trainer` runs these pieces (``tinygemma train``): random windows from a memmap, AdamW
(or Muon for the blocks' matrices, see optim.py) with warmup + cosine decay fitted to the budget, gradient
accumulation, fp32 master weights with bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing),
optional torch.compile, DDP under torchrun, and checkpoints that resume exactly (bit for bit on CPU and with
``deterministic`` on CUDA; see docs/training.md).

Determinism: the batches of optimizer step ``s`` are a pure function of (seed, s), and rank r takes
its slice of them, so a resumed run, a run with more accumulation or a run on more ranks sees exactly
the same global batch (which is why a resume may re-split micro_batch x grad_accum x ranks when the
product stays). Nothing else in the loop draws random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygemma.config import UserError, check_seed, from_dict, load_json, parse_override

OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RECIPES_DIR = Path(__file__).with_name("recipes")
BUDGET_KEYS = ("max_steps", "max_tokens", "time_budget")
MUON_KEYS = ("muon_lr", "muon_weight_decay", "muon_momentum")


# Keys that may change when resuming (budget, bookkeeping); anything else would silently change the run.
# micro_batch and grad_accum only as a re-split: their product with the ranks is checked on resume
# (checkpoint.batch_change).
RESUMABLE_KEYS = {*BUDGET_KEYS, "data", "out", "eval_interval", "save_interval", "log_interval", "keep_last",
                  "compile", "progress", "wandb", "wandb_project", "nonfinite", "peak_tflops", "device",
                  "micro_batch", "grad_accum", "deterministic", "allow_new_world_size"}


@dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the ``adamw`` recipe for gemma3-270m (so configs saved
    before the optimizer fields existed resume as what they were); the ``default`` recipe is ``muon``."""

    data: str = field(default="data/tinystories", metadata={"help": "prepared data folder"})
    out: str = field(default="runs/gemma3-270m", metadata={"help": "run folder (checkpoints, metrics, plots)"})
    model: str = field(default="gemma3-270m", metadata={"help": "preset (gemma3-270m|small|mini|tiny) or config JSON"})
    finetune_from: str | None = field(default=None, metadata={"help": "start from this checkpoint's weights and "
                                                                       "train on instruct records (finetune)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="auto", metadata={"help": "auto|bf16|fp16|fp32 (auto: bf16 autocast on CUDA "
                                                               "with bf16, fp16 + loss scaling on older CUDA "
                                                               "GPUs, fp32 on CPU)"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile (default: on for CUDA)"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic kernels (torch."
                                                                  "use_deterministic_algorithms): bitwise resumes "
                                                                  "on CUDA, at some speed"})
    # batch: tokens per optimizer step = block_size x micro_batch x grad_accum x ranks
    block_size: int = 512
    micro_batch: int = 32
    grad_accum: int = 4
    allow_new_world_size: bool = field(default=False, metadata={"help": "resume on another number of ranks "
                                                                         "even though the tokens per step change"})
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
        check_seed(self.seed)
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
                raise UserError(message)

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
