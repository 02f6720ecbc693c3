"""What a run carries from step to step (TrainState, saved in every checkpoint), this process's clock, one step's
result, and the signal handler that asks the loop to stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

from tinygemma.config import from_dict


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
