"""Optimizers, numeric precision and out-of-memory reporting for ``tinygemma train``.

Two recipes build the optimizer: ``adamw`` (AdamW on everything) and ``muon`` (``torch.optim.Muon`` on the
blocks' 2-D weight matrices, AdamW on the tied embedding/head and the RMSNorm gains). Either way the trainer
sees one object whose param groups each carry their own ``peak_lr``; the LR schedule is a multiplier of it.

Precision: bf16 autocast where the hardware has it, fp16 autocast with loss scaling (``GradScaler``) where it
does not (T4, V100, RTX 20xx), fp32 otherwise; the scaler's state travels with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from tinygemma.config import UserError
from tinygemma.model import Gemma3
from tinygemma.train.config import PRECISIONS, TrainConfig
from tinygemma.train.muon import BatchedMuon


# -- schedule -------------------------------------------------------------------------------------------
def lr_factor(cfg: Any, step: int, total_steps: int | None) -> float:
    """The schedule as a multiplier of each group's peak LR: linear warmup to 1, then cosine decay to
    ``cfg.final_lr / cfg.lr`` at ``total_steps`` (step counts from 0).

    ``total_steps`` is None only for the first step of a time-budget run, before any step was timed.
    """
    if total_steps is None:
        warmup = cfg.warmup_steps
        if not warmup:
            return 0.0  # calibration step: the warmup length is not known yet
    else:
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if total_steps is None or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.final_lr / cfg.lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def set_lr(optimizer: Optimizers, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


# -- optimizers -----------------------------------------------------------------------------------------
class Optimizers:
    """Several torch optimizers stepped as one (the trainer, GradScaler and checkpoints see one object).

    With a single optimizer the state dict is that optimizer's own, so checkpoints of all-AdamW runs keep
    the format they always had; with several it is ``{name: state_dict}``.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if len(self.optimizers) == 1:
            return next(iter(self.optimizers.values())).state_dict()
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(self.optimizers) == 1:
            next(iter(self.optimizers.values())).load_state_dict(state)
            return
        if set(state) != set(self.optimizers):
            raise UserError(f"optimizer state holds {sorted(state)}, this recipe has {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def split_params(model: Gemma3) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters by role: ``matrices`` (the blocks' 2-D weights: attention q/k/v/o and the MLP),
    ``embedding`` (the tied embedding/head) and ``gains`` (RMSNorm weights). Each parameter in exactly one."""
    embed = model.model.embed_tokens.weight
    roles: dict[str, list[torch.nn.Parameter]] = {"matrices": [], "embedding": [], "gains": []}
    for p in model.parameters():  # parameters() yields a tied weight once
        role = "embedding" if p is embed else "matrices" if p.dim() == 2 else "gains"
        roles[role].append(p)
    return roles


def build_optimizer(model: Gemma3, cfg: Any, device: torch.device) -> Optimizers:
    """The recipe's optimizer(s); every param group carries ``peak_lr`` (see :func:`set_lr`).

    Weight decay falls only on the blocks' matrices: the norm gains are zero-centred (decay would pull them
    to gain 1, not a prior we want) and the tied embedding/head is left undecayed as in GPT-2/nanoGPT.
    """
    roles = split_params(model)
    adamw_groups = [{"params": roles["embedding"] + roles["gains"], "weight_decay": 0.0, "peak_lr": cfg.lr}]
    if cfg.optimizer == "adamw":
        # decayed group first: the order the checkpoints of earlier versions hold
        adamw_groups.insert(0, {"params": roles["matrices"], "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr})
    # the fused kernel (CPU and CUDA) updates all tensors in one pass: ~6x faster than foreach on CPU
    optimizers = {"adamw": torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                             fused=device.type in ("cuda", "cpu"))}
    if cfg.optimizer == "muon":
        # match_rms_adamw scales each matrix's orthogonalised update to AdamW's typical RMS (Moonlight),
        # so muon_lr lives on AdamW's scale and transfers across widths; BatchedMuon is torch.optim.Muon's math
        # and state with the Newton-Schulz iteration batched by shape (train/muon.py)
        muon = BatchedMuon([{"params": roles["matrices"], "peak_lr": cfg.matrix_lr}], lr=cfg.matrix_lr,
                           weight_decay=cfg.matrix_weight_decay, momentum=cfg.matrix_momentum,
                           adjust_lr_fn="match_rms_adamw")
        optimizers = {"muon": muon, **optimizers}
    return Optimizers(optimizers)


# -- precision ------------------------------------------------------------------------------------------
class Precision:
    """Autocast dtype and loss scaling for one run.

    ``auto``: bf16 autocast on CUDA GPUs with native bf16 (Ampere and later), fp16 autocast with a
    ``GradScaler`` on older ones, fp32 on CPU. Weights and optimizer states stay fp32 in every mode.
    """

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

    def __init__(self, choice: str, device: torch.device):
        if choice not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
        if choice == "auto":
            if device.type != "cuda":
                choice = "fp32"
            else:  # emulated bf16 (pre-Ampere) is slower than fp16 with a scaler
                choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        self.name, self.device = choice, device
        self.dtype = self.DTYPES[choice]
        self.scaler = torch.amp.GradScaler(device.type) if choice == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_step(self, optimizer: Optimizers, params: Iterable[torch.Tensor], grad_clip: float,
                      guard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the (unscaled) gradient to ``grad_clip`` (0: off) and step, skipping the update on the device when
        the gradient norm is not finite: no host sync. Under fp16 the scaler then lowers its scale (an overflow);
        ``guard=False`` lets an optimizer that cannot skip in its kernel step anyway (the run stops at the next
        host read). Returns (grad norm before clipping, whether it was not finite), both on the device."""
        if self.scaler:
            self.scaler.unscale_(optimizer)  # records the scaler's own inf check for update(); no sync
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        bad = ~torch.isfinite(norm)
        step_unless(optimizer, bad, guard or self.scaler is not None)
        if self.scaler:
            self.scaler.update()  # halves the scale after an overflow, grows it after enough good steps
        return norm, bad

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (plain numbers, so it fits trainer_state.json); empty without a scaler."""
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


@torch.no_grad()
def step_unless(optimizer: Optimizers, bad: torch.Tensor, guard: bool) -> None:
    """Step every optimizer unless ``bad`` (a 0-d bool on the device), decided on the device. An optimizer that
    takes GradScaler's ``found_inf`` (fused AdamW) skips in its kernel; another steps, and with ``guard`` its
    parameters and state are put back where ``bad`` (a copy of them per step: memory of one more such set)."""
    for opt in optimizer.optimizers.values():
        if getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = None, bad.float()
            opt.step()
            del opt.grad_scale, opt.found_inf
            continue
        if not guard:
            opt.step()
            continue
        before = [t for g in opt.param_groups for t in g["params"]]
        before += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        saved = [t.clone() for t in before]
        known = {id(t) for t in before}
        opt.step()
        for t, old in zip(before, saved, strict=True):
            torch.where(bad, old, t, out=t)
        for state in opt.state.values():  # state made by this step (the first): as if it never ran
            for t in state.values():
                if isinstance(t, torch.Tensor) and id(t) not in known:
                    t.masked_fill_(bad, 0)


# -- out of memory --------------------------------------------------------------------------------------
@contextmanager
def explain_oom(micro_batch: int, block_size: int, grad_accum: int, last_good: Callable[[], str]) -> Iterator[None]:
    """Turn CUDA out-of-memory inside a training step into one line that says what to change: a smaller
    micro-batch with the accumulation that keeps the tokens per step is a re-split a resume accepts."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        keep = (f" (e.g. --micro-batch {micro_batch // 2} --grad-accum {grad_accum * 2})"
                if micro_batch % 2 == 0 else "")
        raise UserError(f"CUDA out of memory in a training step at micro-batch {micro_batch}, block size "
                        f"{block_size}: resume with a lower --micro-batch and a higher --grad-accum whose product "
                        f"stays {micro_batch * grad_accum}{keep}, or start over with a lower --block-size; "
                        f"last good checkpoint: {last_good()}") from None


# -- schedule -------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int, total_steps: int | None) -> float:
    """The AdamW groups' LR at ``step``: ``lr`` times the schedule (:func:`tinygemma.optim.lr_factor`)."""
    return cfg.lr * lr_factor(cfg, step, total_steps)


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
