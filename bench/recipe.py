"""Tokens to a given loss: the ``tutorial`` recipe vs tuned AdamW vs Muon, same model, data and tokens.

    python bench/recipe.py                                    # tiny preset, 98,304 tokens per run
    python bench/recipe.py --tokens 24576 --block-size 64 --evals 6 --eval-batches 2 --score best \
        --muon-lrs 3e-3 1e-2 3e-2 1e-1                        # the README's run (a busy 2-core CPU)
    python bench/recipe.py --model small --tokens 5000000 --micro-batch 32   # e.g. on a GPU

Every run shares the model, the data (the shared TinyStories sample), the token budget, the batch shape
(``--block-size`` x ``--micro-batch``, no accumulation) and the schedule shape (the ``adamw`` recipe's warmup
fraction, cosine to lr/10). The ``tutorial`` recipe keeps its own LR, eps and clipping. AdamW's peak LR is
swept first; Muon then trains the blocks' matrices with its LR swept (``--muon-lrs``), the embedding and
norm gains with AdamW at the tuned AdamW LR. The loss-vs-tokens curve is the in-run validation loss on fixed
windows (the same windows for every run); a sweep's best is the lowest final value of that curve; "tokens
to AdamW's loss" is where a run's curve first reaches tuned AdamW's final value (linear interpolation
between evaluations). Final models are scored like ``tinygemma eval`` on the whole validation split: every
run, or with ``--score best`` (slow CPUs) the tutorial and each sweep's best.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from tinygemma import rundir
from tinygemma.data.config import PrepareConfig
from tinygemma.data.dataset import TokenDataset
from tinygemma.data.prepare import prepare
from tinygemma.eval.loss import evaluate_tokens
from tinygemma.model import Gemma3
from tinygemma.train.config import load_recipe, resolve_config
from tinygemma.train.trainer import train


def run(name: str, recipe: str, extra: dict, args: argparse.Namespace) -> dict:
    """Train one configuration; returns a results row (kept in WORKDIR/NAME/result.json)."""
    out = Path(args.workdir) / name
    if (out / "result.json").is_file():  # finished earlier: a stopped sweep picks up where it was
        return json.loads((out / "result.json").read_text())
    steps = -(-args.tokens // (args.block_size * args.micro_batch))  # as the trainer counts: ceil
    shape = load_recipe("adamw")
    overrides = {"model": args.model, "data": str(Path(args.workdir) / "data"), "out": str(out), "device": args.device,
                 "block_size": args.block_size, "micro_batch": args.micro_batch, "grad_accum": 1,
                 "max_tokens": args.tokens, "warmup_frac": shape["warmup_frac"], "min_lr_ratio": shape["min_lr_ratio"],
                 "eval_interval": max(1, steps // args.evals), "eval_batches": args.eval_batches,
                 "save_interval": steps, "progress": False, "compile": False, **extra}
    cfg = resolve_config(load_recipe(recipe), overrides)
    final = rundir.checkpoint_dir(out, steps) / rundir.TRAINER_STATE
    if not final.is_file():  # else trained already, stopped before its row was written
        train(cfg, recipe=recipe, force=True)
    state = json.loads(final.read_text())
    curve = [(r["tokens"], r["val_loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    row = {"name": name, "recipe": recipe, "optimizer": cfg.optimizer, "lr": cfg.lr,
           "muon_lr": cfg.muon_lr, "tokens": state["tokens"], "steps": state["step"], "block_size": cfg.block_size,
           "checkpoint": str(final.parent), "curve": curve, "train_minutes": state["train_time_s"] / 60}
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"{name}: val loss {curve[-1][1]:.4f} (fixed windows) after {row['tokens']:,} tokens "
          f"({row['train_minutes']:.1f} min)", flush=True)
    return row


def score(row: dict, args: argparse.Namespace) -> None:
    """Add the whole validation split's loss to ``row``, as ``tinygemma eval CHECKPOINT`` computes it."""
    if "val_loss" not in row:
        model = Gemma3.from_pretrained(row["checkpoint"], device=args.device).eval()
        scored = evaluate_tokens(model, TokenDataset(Path(args.workdir) / "data", "val").tokens, row["block_size"],
                                 batch_size=16)
        row.update(val_loss=scored["loss"], val_tokens=scored["tokens"])
        (Path(args.workdir) / row["name"] / "result.json").write_text(json.dumps(row, indent=2) + "\n")


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the curve is at or below ``target`` (linear between points), else None."""
    prev = (0, float("inf"))
    for tokens, loss in curve:
        if loss <= target:
            if not np.isfinite(prev[1]):
                return float(tokens)
            return prev[0] + (tokens - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (tokens, loss)
    return None


def plot(rows: list[dict], best: dict[str, dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"tutorial": "tab:gray", "adamw": "tab:blue", "muon": "tab:red"}
    for r in rows:
        kind = "tutorial" if r["recipe"] == "tutorial" else r["optimizer"]
        xs, ys = zip(*r["curve"], strict=True)
        chosen = best.get(kind) is r
        lr = r["muon_lr"] if kind == "muon" else r["lr"]
        ax.plot(xs, ys, "o-" if chosen else "--", color=colors[kind], alpha=1.0 if chosen else 0.35,
                markersize=3, label=f"{kind} lr {lr:g}" + (" (best)" if chosen and kind != "tutorial" else ""))
    ax.axhline(target, color="tab:blue", linestyle=":", linewidth=1, label="tuned AdamW's final loss")
    ax.set(xlabel="training tokens", ylabel="validation loss (nats, fixed windows)",
           title="loss vs tokens at equal budget", ylim=(None, min(11.0, max(r["curve"][0][1] for r in rows) + 0.2)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--tokens", type=int, default=98_304, help="training tokens per run")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1], help="AdamW's peak LRs")
    p.add_argument("--muon-lrs", type=float, nargs="+", default=None, help="Muon's peak LRs (default: --lrs)")
    p.add_argument("--evals", type=int, default=8, help="evaluations per run (points of the curve)")
    p.add_argument("--eval-batches", type=int, default=4, help="fixed validation batches of the in-run curve")
    p.add_argument("--score", choices=("best", "all"), default="all",
                   help="score on the whole validation split every run, or the tutorial and each sweep's best")
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "../shared/data/tinystories"))
    p.add_argument("--workdir", default="runs/bench-recipe", help="runs and results (a rerun reuses finished runs)")
    p.add_argument("--plot", default="docs/recipe.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    work = Path(args.workdir)
    if not (work / "data" / "meta.json").is_file():
        prepare(PrepareConfig(source=args.source, out=str(work / "data")))

    rows = [run("tutorial", "tutorial", {}, args)]
    adamw = [run(f"adamw-{lr:g}", "adamw", {"lr": lr}, args) for lr in args.lrs]
    best_adamw = min(adamw, key=lambda r: r["curve"][-1][1])
    muon = [run(f"muon-{lr:g}", "muon", {"lr": best_adamw["lr"], "muon_lr": lr}, args)
            for lr in args.muon_lrs or args.lrs]
    best_muon = min(muon, key=lambda r: r["curve"][-1][1])
    rows += adamw + muon
    target = best_adamw["curve"][-1][1]
    best = {"tutorial": rows[0], "adamw": best_adamw, "muon": best_muon}
    for r in rows if args.score == "all" else best.values():
        score(r, args)
    plot(rows, best, target, Path(args.plot))

    print(f"\nmodel {args.model}, {args.tokens:,} tokens per run ({args.block_size} x {args.micro_batch} per step), "
          f"whole validation split: {rows[0]['val_tokens']:,} tokens; device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':<14}{'peak lr (AdamW / Muon)':>24}{'whole val':>10}{'curve end':>11}{'tokens to AdamW loss':>22}"
          f"{'min':>6}")
    for r in rows:
        reach = tokens_to_reach(r["curve"], target)
        lrs = f"{r['lr']:g}" + (f" / {r['muon_lr']:g}" if r["muon_lr"] is not None else "")
        whole = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
        print(f"{r['name']:<14}{lrs:>24}{whole:>10}{r['curve'][-1][1]:>11.4f}"
              f"{f'{reach:,.0f}' if reach is not None else 'not reached':>22}{r['train_minutes']:>6.1f}")
    reach = tokens_to_reach(best_muon["curve"], target)
    ratio = f"{reach / best_adamw['tokens']:.3f}" if reach is not None else f"> 1 (not reached in {args.tokens:,})"
    print(f"tokens Muon (best, {best_muon['name']}) needs to reach tuned AdamW's ({best_adamw['name']}) final loss "
          f"{target:.4f} / AdamW's tokens: {ratio}; whole-split val loss Muon - AdamW: "
          f"{best_muon['val_loss'] - best_adamw['val_loss']:+.4f} nats; plot: {args.plot}")


if __name__ == "__main__":
    main()
