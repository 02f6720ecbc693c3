"""Writing and reading training checkpoints: weights, optimizer, RNG states, trainer state."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygemma import rundir
from tinygemma.config import UserError, to_dict
from tinygemma.hf_folder import write_hf_files
from tinygemma.model import Gemma3, ModelConfig
from tinygemma.tokenizer import EOT_ID, VOCAB_SIZE
from tinygemma.train.config import RESUMABLE_KEYS, TrainConfig, resolve_config
from tinygemma.train.optim import Optimizers


# -- checkpoints ----------------------------------------------------------------------------------------
def rng_states(device: torch.device) -> dict[str, Any]:
    """Every RNG a resume must restore: torch's CPU one, the GPU in use (only that one: a resume may see fewer or
    other GPUs), numpy's and Python's."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if isinstance(cuda, list):  # older checkpoints kept every visible GPU's state: take this device's
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(folder: Path, model: Gemma3, optimizer: Optimizers, state: dict[str, Any],
                     run_config: dict[str, Any], card: dict[str, Any] | None = None) -> Path:
    """Write one complete checkpoint folder atomically: everything goes to ``.tmp-NAME`` and is then renamed.

    Contents: a complete Hugging Face model (config.json, model.safetensors, tokenizer files,
    generation_config.json, README.md model card from ``card``) plus optimizer.pt, rng_state.pt,
    trainer_state.json and run_config.json. ``model`` is the plain module (never compiled/DDP-wrapped).
    """
    tmp = rundir.temp_dir(folder)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states(model.lm_head.weight.device), tmp / "rng_state.pt")
    (tmp / rundir.TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (tmp / rundir.RUN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")
    write_hf_files(tmp, card)
    rundir.replace_dir(tmp, folder)
    return folder


def load_torch(path: Path, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: unreadable or corrupt ({type(e).__name__})") from None


def resumed_config(ckpt: Path, overrides: dict[str, Any],
                   recipe: str | None) -> tuple[TrainConfig, str | None, dict[str, Any]]:
    """A resumed run's config (the checkpoint's, then the overrides a resume may change), its recipe and the
    saved trainer state; a changed recipe or any other changed field is refused."""
    saved_state, saved = rundir.read_checkpoint_meta(ckpt)
    if recipe is not None and recipe != saved.get("recipe"):
        raise UserError(f"--recipe {recipe} differs from the checkpoint's ({saved.get('recipe')})")
    base = {**saved["train"], "allow_new_world_size": False}  # a permission for one resume, never inherited
    changed = sorted(k for k in overrides if k not in RESUMABLE_KEYS and overrides[k] != base.get(k))
    if changed:
        raise UserError(f"cannot change {', '.join(changed)} when resuming {ckpt}")
    return resolve_config(base, overrides), saved.get("recipe"), saved_state


def batch_change(ckpt: Path, cfg: TrainConfig, world: int) -> tuple[str, bool] | None:
    """What a resume on ``world`` ranks with ``cfg``'s micro-batch and accumulation does to the batch of the run
    in ``ckpt``: None (nothing), a note (a re-split: micro-batch x grad-accum x ranks keeps its product, so every
    step trains on the same sequences), or a warning (``allow_new_world_size``: another number of ranks changes
    the tokens per step). Another product is refused in one line. Returns (line, is_warning)."""
    saved = rundir.read_run_config(ckpt) or {}
    train, old_world = saved.get("train", {}), saved.get("world_size", 1)
    old = (train.get("micro_batch", cfg.micro_batch), train.get("grad_accum", cfg.grad_accum), old_world)
    new = (cfg.micro_batch, cfg.grad_accum, world)
    if old == new:
        return None
    (m0, a0, w0), (m1, a1, w1) = old, new
    was, now = f"{m0} x {a0} x {w0} = {m0 * a0 * w0}", f"{m1} x {a1} x {w1} = {m1 * a1 * w1}"
    if m0 * a0 * w0 == m1 * a1 * w1:
        return f"resuming {ckpt} with micro-batch x grad-accum x ranks {now} (was {was}): the same sequences " \
               "per step", False
    if w0 != w1 and cfg.allow_new_world_size:
        return (f"--allow-new-world-size: {w0} -> {w1} ranks change the sequences per step from {was} to {now}: "
                "other batches from here on, and a max-tokens budget becomes another number of steps"), True
    accum = m0 * a0 * w0 / (m1 * w1)
    fix = f" (e.g. --grad-accum {int(accum)})" if accum == int(accum) and accum >= 1 else ""
    flag = " or pass --allow-new-world-size" if w0 != w1 else ""
    raise UserError(f"resuming {ckpt}: micro-batch x grad-accum x ranks would be {now}, was {was}; keep the "
                    f"product{fix} so every step trains on the same sequences{flag}")


def finetune_start(checkpoint: str | Path) -> dict[str, str]:
    """The config fields of a fine-tuning run from ``checkpoint`` (a GPT-2-tokenizer model: instruct data is
    GPT-2 tokens)."""
    start = rundir.resolve_checkpoint(checkpoint).resolve()
    mc = ModelConfig.from_folder(start)
    if mc.vocab_size != VOCAB_SIZE or mc.eot_token_id != EOT_ID:
        raise UserError(f"{start}: not a GPT-2-tokenizer model (vocab {mc.vocab_size}, end-of-text id "
                        f"{mc.eot_token_id}); tinygemma's instruct data is GPT-2 tokens")
    return {"finetune_from": str(start), "model": str(start)}


def model_card_facts(name: str, step: int, tokens: int, train_time_s: float, cfg: TrainConfig, recipe: str | None,
                     hardware: str, val_loss: float | None, eval_rows: int, samples: list[str],
                     instruct: bool = False) -> dict[str, Any]:
    """What a checkpoint's model card says about its training (:class:`tinygemma.hf_folder.CardInfo`'s fields);
    ``instruct``: trained on instruct records."""
    return {"name": name, "step": step, "tokens_seen": tokens, "recipe": recipe, "hardware": hardware,
            "training_time_s": train_time_s, "train_config": to_dict(cfg), "val_loss": val_loss,
            "val_tokens": eval_rows * cfg.block_size, "samples": samples, "instruct": instruct}


# -- the run folder of a new run ----------------------------------------------------------------------------
def check_out_folder(out: Path) -> None:
    """``--out`` is (or can be made) a writable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the run folder is not writable")


def check_apart(out: Path, source: str | Path | None) -> None:
    """``--out`` is neither the source checkpoint nor a folder that contains it or lies inside it (``--force``
    or a new run there would delete the model being fine-tuned)."""
    if source is None:
        return
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or o in s.parents or s in o.parents:
        raise UserError(f"--out {out}: overlaps the checkpoint being fine-tuned ({source}); choose another --out")


def _first_checkpoint_step(train: dict[str, Any]) -> int | None:
    """The step of a run's first checkpoint (its first evaluation or save interval, or its last step)."""
    steps = [train.get(k) for k in ("eval_interval", "save_interval", "max_steps")]
    steps = [s for s in steps if isinstance(s, int) and not isinstance(s, bool)]
    return min(steps) if steps else None


def restart_state(out: Path, previous: dict[str, Any]) -> str | None:
    """What a run folder without a resumable checkpoint holds: "empty" (no checkpoint folder, no metrics: a run
    killed before it logged), "early" (metrics only of steps up to its first checkpoint: killed before that was
    written), or None (checkpoint folders or later metrics: something a new start would lose)."""
    if rundir.checkpoints(out) or (out / rundir.BEST).exists():
        return None
    steps = [r.get("step") for r in rundir.Metrics(out).read()]
    if not steps:
        return "empty"
    first = _first_checkpoint_step(previous.get("train", {}))
    ok = first is not None and all(isinstance(s, int) and s <= first for s in steps)
    return "early" if ok else None


def undo_claim(created: list[Path]) -> None:
    """A refused run leaves nothing: the lock file and the run folder it created go again (a folder something
    else wrote into stays)."""
    for path in created:
        try:
            path.rmdir() if path.is_dir() else path.unlink()
        except OSError:  # not empty, or already gone
            pass


def check_new_run(out: Path, cfg: TrainConfig, resume: str | None, force: bool) -> None:
    """A new run may start in ``out`` (locked by the caller): it is empty, or ``force`` clears it, or it holds
    only what a run killed before its first checkpoint left (``--resume auto`` starts over; its metrics are
    moved aside to ``metrics.jsonl.1``); another run there, or the same run not resumed, is refused."""
    if force:
        rundir.clear(out)
        return
    previous = rundir.read_run_config(out)
    state = restart_state(out, previous) if previous is not None else "empty"
    if previous is None or (state == "empty" and resume is None):
        if resume == "auto":
            print(f"--resume auto: no checkpoint in {out}, starting a new run", file=sys.stderr)
        return
    if resume == "auto" and state is not None:
        if state == "early":
            os.replace(out / rundir.METRICS, out / f"{rundir.METRICS}.1")
        print(f"--resume auto: {out} holds no checkpoint (the run stopped before its first one)"
              + ("; its metrics moved to metrics.jsonl.1" if state == "early" else "") + "; starting over",
              file=sys.stderr)
        return
    if resume == "auto":
        raise UserError(f"--resume auto: {out} holds a run but no complete checkpoint to resume; "
                        "use --force to start over or another --out")
    now, before = to_dict(cfg), previous["train"]
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise UserError(f"{out} holds another run (its config differs in {', '.join(changed[:4])}); "
                        f"use --resume auto, --force or another --out")
    raise UserError(f"{out} already holds this run; use --resume auto to continue or --force to start over")


def load_optimizer_state(optimizer: Optimizers, path: Path, device: torch.device) -> None:
    """A checkpoint's optimizer state into ``optimizer``, refused in one line when it is corrupt or does not fit."""
    saved = load_torch(path, device)  # an unreadable file: a one-line "unreadable or corrupt"
    # one torch optimizer's state, or {name: state} of several (Muon + AdamW)
    multi = isinstance(saved, dict) and "state" not in saved and len(optimizer.optimizers) > 1
    parts = list(saved.values()) if multi else [saved]
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("state"), dict) \
                or not isinstance(part.get("param_groups"), list):
            raise UserError(f"{path}: corrupt (loads, but is not an optimizer state)")
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
               for moments in part["state"].values() if isinstance(moments, dict) for t in moments.values()):
            raise UserError(f"{path}: corrupt (non-finite optimizer moments)")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: a valid optimizer state that does not fit this model ({e})") from None
