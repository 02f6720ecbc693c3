"""What a run carries from step to step (TrainState, saved in every checkpoint), this process's clock, one step's
result, what the steps between two host reads leave on the device (Tally), the signal handler that asks the loop
to stop, deterministic mode, and what the ranks agree on (process group, checkpoint, clock)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinygemma import rundir
from tinygemma.config import UserError, from_dict
from tinygemma.log import warn


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
    agreed_s: float = 0.0  # the slowest rank's elapsed time at the last read step (what a time budget stops on)
    steps_here: int = 0  # steps run by this process (a resumed run starts at 0)
    first_end: float = 0.0  # when its first step ended (that step compiles, so the budget leaves it out)
    window_tokens: int = 0
    window_s: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def mark(self) -> None:
        """A step ended."""
        self.steps_here += 1
        if self.steps_here == 1:
            self.first_end = self.elapsed()

    def per_step(self, last_step_s: float) -> list[float]:
        """[elapsed, wall time per step] for a time budget: evaluations and checkpoints included, the first step
        (which compiles) left out."""
        now = self.elapsed()
        if self.steps_here == 1:
            return [now, last_step_s]
        return [now, (now - self.first_end) / (self.steps_here - 1)]


@dataclass
class StepResult:
    """One step as the host sees it. Only a step that reads its results (``read``: log, evaluation and checkpoint
    steps, the last one) has a loss and gradient norm; the others leave them on the device."""

    lr: float  # the AdamW groups' (Muon's follows the same schedule from its own peak)
    seconds: float  # host time of the step (on CUDA the GPU catches up at the next read step: a window sums right)
    tokens: int  # positions run, all ranks (fine-tuning rows are cut to the batch's longest record)
    read: bool = False
    loss: float | None = None  # mean over ranks
    loss_ok: bool = False  # the loss is finite and so is the gradient norm (an fp16 overflow step keeps its loss)
    grad_norm: float | None = None  # None when it or the loss is not finite
    stop: bool = False  # a rank was asked to stop (SIGINT/SIGTERM): voted at read steps


class Tally:
    """What the steps since the last host read left on the device, so that no step waits for the GPU: how many
    had a non-finite gradient (skipped there) and how many of those were fp16 overflows (finite loss), the first
    such step, its loss and gradient norm. :meth:`read` copies it to the host at a read step and starts over."""

    def __init__(self, device: torch.device, fp16: bool):
        self.t = torch.zeros(5, dtype=torch.float64, device=device)  # bad, overflows, first step, its loss, norm
        self.fp16 = fp16  # loss scaling: a non-finite gradient with a finite loss is an overflow

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor, bad: torch.Tensor) -> None:
        """Count step ``step`` (1-based): ``bad`` says its gradient norm was not finite."""
        first = bad & (self.t[0] == 0)
        overflow = bad & torch.isfinite(loss) if self.fp16 else torch.zeros_like(bad)
        self.t[:2] += torch.stack([bad, overflow]).double()
        this = torch.stack([torch.full_like(self.t[2], step), loss.double(), norm.double()])
        self.t[2:] = torch.where(first, this, self.t[2:])

    def read(self, result: StepResult, loss: torch.Tensor, norm: torch.Tensor, stop_requested: bool,
             world: int) -> dict[str, Any]:
        """At a read step, in one copy to the host: ``result``'s loss (averaged over ranks), gradient norm and
        stop (whether any rank was asked to), and, returned, this tally (the most any rank saw), which starts
        over."""
        mean = loss.detach().double().reshape(1)
        maxed = torch.cat([torch.full((1,), float(stop_requested), dtype=torch.float64, device=self.t.device), self.t])
        if world > 1:
            dist.all_reduce(mean)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        values = torch.cat([mean / world, norm.detach().double().reshape(1), maxed]).tolist()  # waits for the GPU
        loss_v, norm_v, stop, bad, overflows, first, first_loss, first_norm = values
        self.t.zero_()
        finite = math.isfinite(loss_v) and math.isfinite(norm_v)
        result.read, result.loss, result.stop, result.grad_norm = True, loss_v, stop > 0, norm_v if finite else None
        result.loss_ok = math.isfinite(loss_v) and (finite or self.fp16)
        return {"bad": int(bad), "overflows": int(overflows), "first": int(first), "loss": first_loss,
                "norm": first_norm}


def report_bad_steps(seen: dict[str, Any], state: TrainState, stop: bool, scale: Callable[[], float],
                     last_good: Callable[[], str], master: bool) -> None:
    """The non-finite steps a :meth:`Tally.read` saw: fp16 overflows (the loss scaler's business: skipped, scale
    lowered) are counted; the others stop the run (``stop``, nonfinite=stop) or are counted as skipped."""
    overflows, nonfinite, at = seen["overflows"], seen["bad"] - seen["overflows"], f"step {seen['first']}"
    more = {n: "" if n == 1 else f" (and {n - 1} more by step {state.step + 1})" for n in (overflows, nonfinite)}
    state.overflow_steps += overflows
    if overflows and master:
        warn(f"{at}: fp16 gradient overflow{more[overflows]}; step skipped, loss scale now {scale():g}")
    if not nonfinite:
        return
    if stop:
        what = "gradient norm" if math.isfinite(seen["loss"]) else "loss"
        raise UserError(f"{at}: non-finite {what} (loss {seen['loss']}, grad norm {seen['norm']}); stopped "
                        f"(last good checkpoint: {last_good()}; lower lr or set nonfinite=skip)")
    state.skipped_steps += nonfinite
    if master:
        warn(f"{at}: non-finite loss ({seen['loss']}) or grad norm ({seen['norm']}){more[nonfinite]}; step skipped")


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


@contextmanager
def deterministic_mode(on: bool) -> Iterator[None]:
    """``deterministic``: torch's deterministic algorithms for the run, the previous settings restored after.
    On CUDA that is a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: set before
    the first matmul and left in the environment, it changes nothing once cuBLAS runs), flash and
    memory-efficient attention's deterministic backward (cuDNN attention is not picked), cuDNN without
    benchmarking, and Inductor without the autotuning that changes numerics. On CPU the kernels already are."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch._inductor.config as inductor  # only here: a deterministic run may compile

    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark, inductor.deterministic)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark, inductor.deterministic = True, False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark, inductor.deterministic = before[2:]


# -- what the ranks agree on --------------------------------------------------------------------------------
def join_ranks(world: int) -> None:
    """Join the process group before anything the ranks must agree on: gloo for CPU tensors (the agreements
    below, barriers) and, where CUDA is, NCCL for CUDA ones (DDP), so it needs no device yet. (Named: with no
    backend torch 2.13 starts only the accelerator's.)"""
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def rank0_value(compute: Callable[[], Any], world: int) -> Any:
    """``compute()`` run on rank 0 only: its value, or its one-line refusal, on every rank."""
    if world == 1:
        return compute()
    out = None
    if dist.get_rank() == 0:
        try:
            out = (compute(), None)
        except UserError as e:
            out = (None, str(e))
    box = [out]
    dist.broadcast_object_list(box, src=0)
    out = box[0]
    if out[1] is not None:
        raise UserError(out[1])
    return out[0]


def on_every_rank(compute: Callable[[], Any], view: Callable[[Any], Any], world: int, what: str) -> Any:
    """``compute()`` on every rank, checked: when a rank refuses (a one-line UserError) or its ``view`` of the
    result (``what``) differs from rank 0's, every rank raises one line (a rank stopping alone would leave the
    others waiting in the next collective)."""
    if world == 1:
        return compute()
    value, problem = None, None
    try:
        value = compute()
    except UserError as e:
        problem = str(e)
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (None if problem is not None else view(value), problem))
    for rank, (v, p) in enumerate(views):
        if p is not None:
            raise UserError(f"rank {rank}: {p}")
        if v != views[0][0]:
            raise UserError(f"rank {rank} sees {what} {v}, rank 0 {views[0][0]}; the ranks would train from "
                            "different states")
    return value


def agreed_max(values: list[float], world: int, device: torch.device) -> list[float]:
    """The largest of each value over the ranks, on every rank: e.g. the slowest rank's clock, so that a time
    budget's stop is one decision for all (a rank stopping on its own clock would leave the others in the next
    all-reduce until NCCL's watchdog kills the job)."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()

