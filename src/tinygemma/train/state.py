"""What a run carries from step to step (TrainState, saved in every checkpoint), this process's clock, one step's
result, and the signal handler that asks the loop to stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinygemma import rundir
from tinygemma.config import UserError, from_dict


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


@dataclass
class TrainState:
    """What the loop carries from step to step; ``trainer_state.json`` of every checkpoint."""

    step: int = 0  # optimizer steps done (the schedule's and the sampler's position)
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    skipped_steps: int = 0  # non-finite loss or gradient, skipped by nonfinite=skip
    overflow_steps: int = 0  # fp16 gradient overflows: the loss scaler skipped the step and lowered the scale
    elapsed_s: float = 0.0  # wall time of the run, evaluations and checkpoints included
    train_time_s: float = 0.0  # time in training steps only
    total_steps: int | None = None  # the schedule's length (a time budget re-estimates it as it goes)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], where: str) -> TrainState:
        return from_dict(cls, {f.name: saved[f.name] for f in fields(cls) if f.name in saved}, where)


@dataclass
class Clock:
    """This process's timings: the run's wall clock, the throughput window and the time-budget estimate."""

    start: float = 0.0  # perf_counter() at which the run's elapsed time was 0
    steps_here: int = 0  # steps run by this process (a resumed run starts at 0)
    first_end: float = 0.0  # when its first step ended (that step compiles, so the budget leaves it out)
    window_tokens: int = 0
    window_s: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def per_step(self, last_step_s: float) -> tuple[float, float]:
        """(elapsed, wall time per step) for a time budget: evaluations and checkpoints included, the first step
        (which compiles) left out."""
        now = self.elapsed()
        if self.steps_here == 1:
            self.first_end = now
            return now, last_step_s
        return now, (now - self.first_end) / (self.steps_here - 1)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float  # the AdamW groups' (Muon's follows the same schedule from its own peak)
    seconds: float
    loss_ok: bool  # the loss is finite (an fp16 overflow step keeps its loss)
    finite: bool  # loss and gradient norm are finite
    stop: bool  # a rank was asked to stop (SIGINT/SIGTERM)
    tokens: int  # positions run, all ranks (fine-tuning rows are cut to the batch's longest record)


@dataclass
class RunLog:
    """Rank 0's record of a run: ``metrics.jsonl``, its lines in memory (for the plots) and W&B."""

    metrics: rundir.Metrics
    records: list[dict] = field(default_factory=list)
    wandb_run: Any = None

    @classmethod
    def open(cls, out: Path, keep_until: int | None, cfg: Any, run_config: dict, exit_stack: ExitStack) -> RunLog:
        """``keep_until``: the resumed step (earlier lines stay); None for a new run (the file starts empty)."""
        log = cls(rundir.Metrics(out))
        if keep_until is not None:
            log.records = log.metrics.keep_until(keep_until)
        else:
            log.metrics.clear()
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package (pip install 'tinygemma[wandb]')") from None
            log.wandb_run = wandb.init(project=cfg.wandb_project, config=run_config, name=out.name, resume="allow")
            exit_stack.callback(log.wandb_run.finish)
        return log

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.metrics.append(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])


def agreed_elapsed(elapsed: float, world: int, device: torch.device) -> float:
    """The slowest rank's clock, on every rank: a time budget's stop is one decision for all (a rank stopping
    on its own clock would leave the others in the next all-reduce until NCCL's watchdog kills the job)."""
    if world == 1:
        return elapsed
    t = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
