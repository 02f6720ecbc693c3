"""Quality at equal compute: the ``tutorial`` recipe vs ``default`` on a small preset, same data, same tokens.

    python bench/recipe.py                       # CPU: tiny preset, 98,304 tokens per run (a few minutes)
    python bench/recipe.py --model small --tokens 2000000 --batch-scale 8   # bigger, e.g. on a GPU

Both recipes are scaled to the budget the same way: every recipe's tokens per optimizer step is divided by
``--batch-scale`` (micro-batch first, then accumulation; block size kept), so each keeps its ratio of steps;
warmup and decay stay the same fractions of the run; LR values, betas, eps, weight decay and clipping are
the recipes' own. Both final models are then scored on the same validation tokens, cut into consecutive
windows of 128 (the tutorial's block) and of 512 tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinygemma.data import PrepareConfig, TokenDataset, prepare
from tinygemma.model import Gemma3
from tinygemma.train import load_recipe, resolve_config
from tinygemma.trainer import train


def scaled(recipe: str, args: argparse.Namespace, data: Path, out: Path):
    base = load_recipe(recipe)
    cfg = resolve_config(base, {})
    per_step = cfg.micro_batch * cfg.grad_accum // args.batch_scale  # sequences per step after scaling
    if per_step < 1:
        raise SystemExit(f"--batch-scale {args.batch_scale} leaves {recipe} less than one sequence per step")
    micro = min(cfg.micro_batch, per_step)
    overrides = {"model": args.model, "data": str(data), "out": str(out), "max_tokens": args.tokens,
                 "micro_batch": micro, "grad_accum": per_step // micro, "eval_batches": 1, "progress": False,
                 "compile": False, "device": args.device}
    steps = math.ceil(args.tokens / (cfg.block_size * per_step))
    overrides["eval_interval"] = steps  # score once, at the end, on the shared windows below
    return resolve_config(base, overrides), steps


@torch.no_grad()
def val_loss(model: Gemma3, tokens: np.ndarray, block: int, limit: int, device: str) -> float:
    n = min(limit, len(tokens) - 1) // block * block
    x = torch.from_numpy(tokens[:n].astype(np.int64)).view(-1, block)
    y = torch.from_numpy(tokens[1: n + 1].astype(np.int64)).view(-1, block)
    total = 0.0
    for i in range(0, len(x), 16):
        _, loss = model(x[i: i + 16].to(device), y[i: i + 16].to(device))
        total += loss.item() * len(x[i: i + 16])
    return total / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--tokens", type=int, default=98_304, help="training tokens per recipe")
    p.add_argument("--batch-scale", type=int, default=64, help="divide each recipe's tokens per step by this")
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "../shared/data/tinystories"))
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(PrepareConfig(source=args.source, out=str(tmp / "data")))
        val = TokenDataset(tmp / "data", "val").tokens
        rows = []
        for recipe in ("tutorial", "default"):
            cfg, steps = scaled(recipe, args, tmp / "data", tmp / recipe)
            start = time.perf_counter()
            state = train(cfg, recipe=recipe)
            model = Gemma3.from_pretrained(tmp / recipe / f"checkpoint-{state['step']}", device=args.device).eval()
            rows.append({"recipe": recipe, "steps": steps, "batch": f"{cfg.micro_batch}x{cfg.block_size}x"
                         f"{cfg.grad_accum}", "lr": f"{cfg.lr:g}->{cfg.final_lr:g}", "tokens": state["tokens"],
                         "val128": val_loss(model, val, 128, args.eval_tokens, args.device),
                         "val512": val_loss(model, val, 512, args.eval_tokens, args.device),
                         "minutes": (time.perf_counter() - start) / 60})
    print(f"\nmodel {args.model}, {args.tokens:,} training tokens per recipe, batch scale 1/{args.batch_scale}, "
          f"validation on {args.eval_tokens:,} tokens")
    print(f"{'recipe':<10}{'steps':>7}{'micro x block x accum':>23}{'lr':>16}{'tokens':>10}{'val@128':>9}"
          f"{'val@512':>9}{'min':>6}")
    for r in rows:
        print(f"{r['recipe']:<10}{r['steps']:>7}{r['batch']:>23}{r['lr']:>16}{r['tokens']:>10,}{r['val128']:>9.3f}"
              f"{r['val512']:>9.3f}{r['minutes']:>6.1f}")
    tut, dflt = rows
    print(f"default - tutorial: {dflt['val128'] - tut['val128']:+.3f} nats at 128 tokens, "
          f"{dflt['val512'] - tut['val512']:+.3f} at 512 (perplexity x{math.exp(dflt['val128'] - tut['val128']):.2f})")


if __name__ == "__main__":
    main()
