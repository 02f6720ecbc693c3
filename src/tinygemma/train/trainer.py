"""``tinygemma train``: the :class:`Trainer`, whose phases run the pieces of :mod:`tinygemma.train`.

    trainer = Trainer({"data": "data/tinystories", "out": "runs/x", "model": "small"}, resume="auto")
    state = trainer.fit()

``fit`` is the loop; each phase is a method: setup (claim the run folder, resolve the config, data, model,
optimizer, logging), resume, ``train_step``, ``update_budget``, ``evaluate``, ``log``, ``checkpoint``, close.
Everything the loop carries from step to step is in :class:`~tinygemma.train.state.TrainState` (saved in every
checkpoint) and :class:`~tinygemma.train.state.Clock` (this process's timings); the run-folder checks and
checkpoint files are in :mod:`tinygemma.train.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinygemma import rundir
from tinygemma.config import UserError, to_dict
from tinygemma.data.dataset import TokenDataset, data_format
from tinygemma.device import check_memory
from tinygemma.log import progress, warn
from tinygemma.model import Gemma3, load_model_config
from tinygemma.plots import write_plots
from tinygemma.train.checkpoint import (
    batch_change,
    check_apart,
    check_new_run,
    check_out_folder,
    finetune_start,
    load_optimizer_state,
    load_torch,
    model_card_facts,
    resumed_config,
    set_rng_states,
    undo_claim,
    write_checkpoint,
)
from tinygemma.train.config import TrainConfig, load_recipe, resolve_config
from tinygemma.train.hardware import (
    cuda_start_line,
    fit_micro_batch,
    peak_flops,
    peak_memory_mb,
    pick_device,
    training_bytes,
    use_compile,
)
from tinygemma.train.optim import Precision, build_optimizer, explain_oom, forward_backward, lr_at, lr_factor, set_lr
from tinygemma.train.sampler import InstructDataset, RecordSampler, Sampler
from tinygemma.train.state import (
    Clock,
    RunLog,
    StepResult,
    Stop,
    Tally,
    TrainState,
    agreed_max,
    deterministic_mode,
    join_ranks,
    on_every_rank,
    rank0_value,
    report_bad_steps,
)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# (model, run folder, step, seed) -> the stories of the samples report it wrote
SamplesWriter = Callable[[Gemma3, Path, int, int], list[str]]


class Trainer:
    """Train one run. ``overrides`` are TrainConfig fields on top of ``recipe`` (a new run) or of the resumed
    checkpoint's config; ``resume`` is ``"auto"`` (the newest checkpoint in ``out``) or a checkpoint folder."""

    def __init__(self, overrides: dict[str, Any], *, recipe: str | None = None, resume: str | None = None,
                 force: bool = False, write_samples: SamplesWriter | None = None, default_recipe: str = "default"):
        if resume and force:
            raise UserError("--resume and --force contradict each other")
        self.default_recipe = default_recipe  # a new run's recipe when none is given
        # the samples report is evaluation's: it comes in as a callback, so training imports no decoding
        self.write_samples = write_samples
        self.rank, self.world, self.local_rank = _dist_env()
        self.master = self.rank == 0
        self.given = set(overrides)  # the flags set (a GPU picks the micro-batch the user left out)
        self._exit = ExitStack()  # the run folder's lock, W&B
        self._locked = False
        self.out = Path(overrides.get("out", TrainConfig.out))
        check_apart(self.out, overrides.get("finetune_from"))
        self._created = [p for p in (self.out / rundir.LOCK, self.out) if not p.exists()]  # undone if refused
        try:
            join_ranks(self.world)  # first: the ranks agree on the checkpoint before anything else
            self.saved_state: dict[str, Any] = {}  # the resumed checkpoint's trainer state (sampler, scaler)
            self.batch_note: tuple[str, bool] | None = None  # a resume's re-split or new world size
            self.ckpt = rank0_value(lambda: self._find_checkpoint(resume), self.world)
            # each rank reads rank 0's checkpoint; a rank that cannot, or reads another step, stops them all
            self.cfg, self.recipe, self.state = on_every_rank(lambda: self._resolve(overrides, recipe), lambda r: (
                str(self.ckpt), r[2].step), self.world, "checkpoint (path, step)")
            if self.cfg.samples and write_samples is None:
                raise ValueError("samples=True needs write_samples (e.g. tinygemma.eval.samples.write_samples)")
            self.setup(resume, force)
            if self.ckpt is not None:
                self.resume()
            if self.master:  # only now: a refused resume leaves the run folder as it was
                rundir.write_run_config(self.out, self.run_config)
                print("resolved config:\n" + json.dumps(self.run_config, indent=2), flush=True)
                if self.ckpt is not None:
                    print(f"resumed from {self.ckpt} (step {self.state.step})", flush=True)
                if self.batch_note is not None:
                    (warn if self.batch_note[1] else lambda m: print(m, file=sys.stderr))(self.batch_note[0])
        except BaseException:
            self.close()
            if self.master:
                undo_claim(self._created)
            raise

    # -- setup ------------------------------------------------------------------------------------------
    def _find_checkpoint(self, resume: str | None) -> Path | None:
        """Rank 0's choice (under the run folder's lock, after tidying what a crash left), for every rank."""
        if resume != "auto":
            return Path(resume) if resume else None
        if not self.out.is_dir():
            return None
        self._lock()
        return rundir.latest_checkpoint(self.out)

    def _lock(self) -> None:
        """One trainer per run folder; then tidy what a crash left (under the lock: another trainer's temp
        folders are not ours to tidy)."""
        self._exit.enter_context(rundir.lock(self.out))
        self._locked = True
        rundir.recover(self.out)

    def _resolve(self, overrides: dict[str, Any], recipe: str | None) -> tuple[TrainConfig, str, TrainState]:
        """The config (recipe or checkpoint, then overrides), the recipe's name and the starting state."""
        if self.ckpt is None:
            recipe = recipe or self.default_recipe
            return resolve_config(load_recipe(recipe), overrides), recipe, TrainState()
        cfg, recipe, self.saved_state = resumed_config(self.ckpt, overrides, recipe)
        self.batch_note = batch_change(self.ckpt, cfg, self.world)
        return cfg, recipe, TrainState.from_checkpoint(self.saved_state, str(self.ckpt / rundir.TRAINER_STATE))

    def setup(self, resume: str | None, force: bool) -> None:
        cfg = self.cfg
        self._exit.enter_context(deterministic_mode(cfg.deterministic))  # before CUDA starts (cuBLAS workspace)
        self.device = pick_device(cfg, self.local_rank)
        self.model_cfg = load_model_config(cfg.model)
        if cfg.block_size > self.model_cfg.context_length:
            raise UserError(f"block_size {cfg.block_size} exceeds the model's context length "
                            f"{self.model_cfg.context_length}")
        if self.device.type == "cuda" and self.ckpt is None and not {"micro_batch", "grad_accum"} & self.given:
            self.cfg = cfg = fit_micro_batch(self.model_cfg, cfg, self.device, self.world, self.master)
        check_memory(training_bytes(self.model_cfg, cfg, self.device), self.device, f"training {cfg.model}",
                     "--micro-batch (raise --grad-accum to keep the batch) or --block-size")
        self._setup_data()
        self._setup_model()
        if self.master and self.device.type == "cuda":
            print(cuda_start_line(self.model_cfg, cfg, self.device, self.precision, self.eval_model is not self.model),
                  flush=True)
        if self.master:  # every check passed: only now is the run folder touched
            self._warn_new_data()
            self._claim_out(resume, force)
        self._setup_logging()

    def _setup_data(self) -> None:
        cfg, vocab = self.cfg, self.model_cfg.vocab_size
        # instruct records, one per row with the masked loss (finetune, the instruct recipe, or train on an
        # instruct folder); else a stream of tokens. InstructDataset refuses plain data to the first two in one line
        self.records = records = (cfg.finetune_from is not None or self.recipe == "instruct"
                                  or data_format(cfg.data) == InstructDataset.format)
        dataset, sampler = (InstructDataset, RecordSampler) if records else (TokenDataset, Sampler)
        train_data, val_data = (dataset(cfg.data, split, vocab_size=vocab) for split in ("train", "val"))
        if records:
            val_data.check_block_size(cfg.block_size)
        else:
            for ds in (train_data, val_data):
                if len(ds) <= cfg.block_size:
                    raise UserError(f"block_size {cfg.block_size} needs more than {len(ds)} tokens ({ds.path})")
        self.run_config = {"train": to_dict(cfg), "model": to_dict(self.model_cfg), "recipe": self.recipe,
                           "world_size": self.world,
                           "data_meta": {s: train_data.meta["splits"][s]["sha256"] for s in train_data.meta["splits"]}}
        train_source, val_source = (train_data, val_data) if records else (train_data.tokens, val_data.tokens)
        self.sampler = sampler(train_source, cfg.block_size, cfg.micro_batch, cfg.grad_accum, self.rank, self.world,
                               cfg.seed)
        # the evaluation batches never change (a re-split keeps their rows): move them to the device once
        saved = self.saved_state.get("sampler", {})
        self.eval_rows = saved.get("eval_rows") or cfg.eval_batches * saved.get("micro_batch", cfg.micro_batch) \
            * saved.get("world", self.world)
        val_sampler = sampler(val_source, cfg.block_size, cfg.micro_batch, 1, self.rank, self.world, cfg.seed)
        self.val_batches = [self.to_device(b) for b in val_sampler.fixed_batches(1, self.eval_rows)]
        self.train_eval_batches = [self.to_device(b) for b in self.sampler.fixed_batches(2, self.eval_rows)]

    def _warn_new_data(self) -> None:
        """Resuming on other training tokens is allowed (e.g. more data) but never silent."""
        saved = (rundir.read_run_config(self.ckpt) or {}).get("data_meta") if self.ckpt is not None else None
        now = self.run_config["data_meta"].get("train")
        if isinstance(saved, dict) and saved.get("train") not in (None, now):
            warn(f"--data {self.cfg.data}: its train split (sha256 {now[:12]}) differs from the one "
                 f"{self.ckpt} was trained on ({str(saved['train'])[:12]}); continuing on the new tokens")

    def _claim_out(self, resume: str | None, force: bool) -> None:
        """Refuse to mix two runs in one folder (or, with --force, clear the old one); lock it."""
        check_out_folder(self.out)
        if not self._locked:  # (--resume auto took it already)
            self._lock()
        if self.ckpt is None:
            check_new_run(self.out, self.cfg, resume, force)

    def _setup_model(self) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        start = self.ckpt if self.ckpt is not None else cfg.finetune_from
        if start is not None:
            self.model = Gemma3.from_pretrained(start)
            if self.model.config != self.model_cfg:
                raise UserError(f"{start}: the checkpoint's model differs from --model {cfg.model}")
        else:
            self.model = Gemma3(self.model_cfg)
        self.model.to(device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.precision = Precision(cfg.precision, device)
        self.tally = Tally(device, fp16=self.precision.scaler is not None)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.eval_model = torch.compile(self.model) if use_compile(cfg.compile, device) else self.model
        self.step_model = self.eval_model
        if self.world > 1:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.eval_model, device_ids=[self.local_rank] if device.type == "cuda" else None)
        # max_tokens counts full blocks; fine-tuning runs fewer positions (rows cut to the longest record)
        self.tokens_per_step = cfg.block_size * cfg.micro_batch * cfg.grad_accum * self.world
        self.flops_per_token = self.model_cfg.flops_per_token(cfg.block_size)
        peak = peak_flops(cfg, device)
        self.peak_total = peak * self.world if peak else None
        self.hardware = (f"{self.world} x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                         else f"{self.world} x CPU ({os.cpu_count()} cores)")

    def _setup_logging(self) -> None:
        self.last_eval: dict[str, Any] = {"val_loss": None, "samples": []}
        # a resumed run keeps what its checkpoint had logged; later lines belong to the lost future
        self.runlog = RunLog.open(self.out, self.state.step if self.ckpt is not None else None,
                                  self.cfg, self.run_config, self._exit) if self.master else None

    def resume(self) -> None:
        """Continue exactly where the checkpoint stopped: optimizer moments and every RNG."""
        load_optimizer_state(self.optimizer, self.ckpt / "optimizer.pt", self.device)
        self.precision.load_state_dict(self.saved_state.get("scaler"))
        set_rng_states(load_torch(self.ckpt / "rng_state.pt", torch.device("cpu")), self.device)

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train until the budget is spent or a signal asks to stop; returns the final state."""
        self.bar = progress(self.total_steps(), initial=self.state.step, desc="train", unit="step",
                            disable=not (self.master and self.cfg.progress))
        self.clock = Clock(start=time.perf_counter() - self.state.elapsed_s, agreed_s=self.state.elapsed_s)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with Stop() as stop:
                rundir.fault_point("train_start")  # the tests' SIGKILL before the first step
                while not self.finished():
                    result = self.train_step(stop.requested)
                    self.update_budget(result)
                    evaluating = self.is_eval_step()
                    record = self.record(result, evaluating)
                    if evaluating:
                        record.update(self.evaluate())
                    self.state.elapsed_s = self.clock.elapsed()
                    self.log(result, record)
                    rundir.fault_point(f"step:{self.state.step}")  # logged, not yet saved
                    self.checkpoint(evaluating, stopping=result.stop)
                    if result.stop:
                        break
            self._say_done(stop.requested)
        finally:
            self.close()
        return self.state

    def total_steps(self) -> int | None:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.max_tokens is not None:
            return math.ceil(cfg.max_tokens / self.tokens_per_step)
        return self.state.total_steps  # time budget: re-estimated from measured step times

    def finished(self) -> bool:
        """The budget is spent: the step count, or a time budget on the slowest rank's clock (read at read steps)."""
        total = self.total_steps()
        if total is not None and self.state.step >= total:
            return True
        return self.cfg.time_budget is not None and self.clock.agreed_s >= self.cfg.time_budget * 60

    def is_eval_step(self) -> bool:
        return self.state.step % self.cfg.eval_interval == 0 or self.state.step >= self.total_steps()

    def reads(self, stop_requested: bool = False) -> bool:
        """Whether the coming step reads its results to the host (the only steps that wait for the GPU): log,
        evaluation and checkpoint steps, the last, one without a schedule length yet (a time budget's first), and
        a signalled step of a single process (ranks vote on stopping at read steps)."""
        cfg, end, total = self.cfg, self.state.step + 1, self.total_steps()
        every = (cfg.log_interval, cfg.eval_interval, cfg.save_interval or cfg.eval_interval)
        return any(end % n == 0 for n in every) or total is None or end >= total or (stop_requested and
                                                                                      self.world == 1)

    def to_device(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) on the device, from a window of block + 1 tokens or an (x, y) pair of records."""
        x, y = batch if isinstance(batch, tuple) else (batch[:, :-1], batch[:, 1:])
        if self.device.type == "cuda":
            x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        return x, y

    def train_step(self, stop_requested: bool = False) -> StepResult:
        """One optimizer step: batches of this step, forward/backward, the update (skipped on the device when the
        gradient is not finite). Only a read step (:meth:`reads`) waits for the device, to read its results."""
        cfg, step = self.cfg, self.state.step
        read, t0 = self.reads(stop_requested), time.perf_counter()
        set_lr(self.optimizer, lr_factor(cfg, step, self.total_steps()))
        batches = [self.to_device(b) for b in self.sampler.step_batches(step)]
        with explain_oom(cfg.micro_batch, cfg.block_size, cfg.grad_accum, self.last_good):
            mean_loss = forward_backward(self.step_model, batches, self.precision)
            norm, bad = self.precision.clip_and_step(self.optimizer, self.model.parameters(), cfg.grad_clip,
                                                     guard=cfg.nonfinite == "skip")
        self.tally.add(step + 1, mean_loss, norm, bad)
        self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(lr_at(cfg, step, self.total_steps()), 0.0, sum(x.numel() for x, _ in batches) * self.world)
        if read:
            seen = self.tally.read(result, mean_loss, norm, stop_requested, self.world)
            report_bad_steps(seen, self.state, cfg.nonfinite == "stop", lambda: self.precision.scaler.get_scale(),
                             self.last_good, self.master)
        result.seconds = time.perf_counter() - t0
        self.state.step += 1
        self.state.tokens += result.tokens
        self.state.train_time_s += result.seconds
        return result

    def last_good(self) -> str:
        found = rundir.checkpoints(self.out)
        return str(found[-1][1]) if found else "none"

    def update_budget(self, result: StepResult) -> None:
        """Count the step's time; under a time budget, at read steps, agree on the slowest rank's clock and
        re-fit the schedule's length to the time left."""
        clock = self.clock
        clock.window_tokens += result.tokens
        clock.window_s += result.seconds
        clock.mark()
        if self.cfg.time_budget is None or not result.read:
            return
        clock.agreed_s, per_step = agreed_max(clock.per_step(result.seconds), self.world, self.device)
        self.state.total_steps = self.state.step + int(max(0.0, self.cfg.time_budget * 60 - clock.agreed_s)
                                                       / per_step)
        self.bar.total = self.state.total_steps

    def record(self, result: StepResult, evaluating: bool) -> dict[str, Any] | None:
        """The metrics line of this step (None between logging intervals, which an evaluation step never is);
        opens a new throughput window."""
        step, clock = self.state.step, self.clock
        if step % self.cfg.log_interval != 0 and not evaluating:
            return None
        tps = clock.window_tokens / clock.window_s
        clock.window_tokens, clock.window_s = 0, 0.0
        return {"step": step, "tokens": self.state.tokens, "train_loss": result.loss if result.loss_ok else None,
                "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tps,
                "mfu": tps * self.flops_per_token / self.peak_total if self.peak_total else None,
                "peak_mem_mb": peak_memory_mb(self.device)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the fixed validation and training batches (all ranks), the samples report (rank 0)."""
        out = {"val_loss": self._mean_loss(self.val_batches),
               "eval_train_loss": self._mean_loss(self.train_eval_batches)}
        self.last_eval["val_loss"] = out["val_loss"]
        if self.cfg.samples and self.master:
            self.last_eval["samples"] = self.write_samples(self.model, self.out, self.state.step, self.cfg.seed)
        return out

    def _mean_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in batches:
            with self.precision.autocast():
                _, loss = self.eval_model(x, y, return_logits=False)
            total += torch.stack([loss.double(), torch.ones((), device=self.device, dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def log(self, result: StepResult, record: dict[str, Any] | None) -> None:
        """metrics.jsonl (+ W&B) and the progress bar, on rank 0."""
        if record is not None:
            record["elapsed_s"] = self.state.elapsed_s
        if not self.master:
            return
        self.bar.update(1)
        if record is None:
            return
        self.runlog.append(record)
        if record.get("val_loss") is not None and self.cfg.progress:
            self.bar.write(f"step {record['step']}: val loss {record['val_loss']:.4f}, train loss "
                           f"{record['eval_train_loss']:.4f}")
        tps, mfu = record["tokens_per_s"], record["mfu"]
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{tps:,.0f}",
                             mfu=f"{mfu:.1%}" if mfu is not None else "-")

    def checkpoint(self, is_eval: bool, stopping: bool = False) -> None:
        """After a step: ``best/`` on a new best validation loss, ``checkpoint-STEP`` every save interval, at
        the end and when stopping; plots after evaluations. Other ranks wait until rank 0 is done."""
        state, cfg = self.state, self.cfg
        val = self.last_eval["val_loss"] if is_eval else None
        best = is_eval and (state.best_val_loss is None or val < state.best_val_loss)
        if best:
            state.best_val_loss, state.best_step = val, state.step
        save = (state.step % (cfg.save_interval or cfg.eval_interval) == 0 or state.step >= self.total_steps()
                or stopping)
        if self.master:
            if best:
                self.save(rundir.BEST)
            if save:
                self.save(rundir.checkpoint_dir(self.out, state.step).name)
                rundir.prune(self.out, cfg.keep_last)
            if is_eval:
                write_plots(self.runlog.records, self.out)
        if self.world > 1 and (is_eval or save):
            dist.barrier()  # nobody reads a checkpoint before rank 0 finished it

    def save(self, name: str) -> Path:
        state, cfg = self.state, self.cfg
        val_loss = state.best_val_loss if name == rundir.BEST else self.last_eval["val_loss"]
        card = model_card_facts(self.out.name, state.step, state.tokens, state.train_time_s, cfg, self.recipe,
                                self.hardware, val_loss, self.eval_rows, self.last_eval["samples"],
                                self.records)
        trainer_state = {**asdict(state),
                         "schedule": {"lr": lr_at(cfg, state.step, self.total_steps()),
                                      "total_steps": self.total_steps(), "tokens_per_step": self.tokens_per_step},
                         "sampler": {**self.sampler.state(), "next_step": state.step, "eval_rows": self.eval_rows},
                         "scaler": self.precision.state_dict()}
        return write_checkpoint(self.out / name, self.model, self.optimizer, trainer_state, self.run_config, card)

    def _say_done(self, signalled: bool) -> None:
        if not self.master:
            return
        s = self.state
        best = f", best val loss {s.best_val_loss:.4f} at step {s.best_step}" if s.best_val_loss is not None else ""
        print(f"{'stopped by signal' if signalled else 'done'}: step {s.step}, {s.tokens:,} tokens{best}; "
              f"checkpoints in {self.out}")

    def close(self) -> None:
        """Release the run folder and W&B; leave the process group (idempotent)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        self._exit.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig | dict[str, Any], resume: str | None = None, force: bool = False,
          recipe: str | None = None, write_samples: SamplesWriter | None = None) -> TrainState:
    """Run training with a complete config, or with config fields over ``recipe``; returns the final state.
    Works alone or under torchrun (DDP). ``write_samples`` (e.g. :func:`tinygemma.eval.samples.write_samples`)
    writes the samples report at each evaluation when the config asks for one."""
    overrides = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return Trainer(overrides, recipe=recipe, resume=resume, force=force, write_samples=write_samples).fit()


def finetune(checkpoint: str | Path, overrides: dict[str, Any], *, recipe: str | None = None,
             resume: str | None = None, force: bool = False, write_samples: SamplesWriter | None = None) -> TrainState:
    """Fine-tune ``checkpoint`` on the instruct records of ``overrides["data"]``; the model is the checkpoint's."""
    overrides = {**overrides, **finetune_start(checkpoint)}
    # a resumed run keeps its own recipe; a new one (--resume auto in an empty folder too) is finetune's
    return Trainer(overrides, recipe=recipe, resume=resume, force=force, write_samples=write_samples,
                   default_recipe="finetune").fit()
