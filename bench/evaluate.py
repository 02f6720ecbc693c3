"""Do the offline measures separate good models from bad? Random weights vs the demo's tiny model vs a small one.

    python bench/evaluate.py --tiny runs/demo       # the demo's run; trains the small preset for 60 steps
    python bench/evaluate.py --small-steps 2000 --device cuda

Prepares the TinyStories sample; trains the ``tiny`` preset with the demo's recipe (scripts/demo.sh) for
``--tiny-steps`` unless ``--tiny`` names a run or checkpoint, and the ``small`` preset with the same batch
for ``--small-steps`` unless ``--small`` does; then scores both and a ``tiny`` model with random weights
(the baseline) on the whole validation split (or its first ``--val-stories``) as ``tinygemma eval`` does
(windows of 128): loss, bits per byte, and context use on the first ``--context-stories`` held-out stories.
Step budgets, not time budgets, so that a busy machine changes the run time, not the models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from tinygemma.cli import main as cli
from tinygemma.data.config import PrepareConfig
from tinygemma.data.prepare import prepare
from tinygemma.eval.loss import EvalConfig, evaluate_checkpoint
from tinygemma.model import Gemma3, load_model_config
from tinygemma.rundir import resolve_checkpoint


def train(model: str, data: Path, out: Path, steps: int, device: str) -> Path:
    """The demo's recipe (scripts/demo.sh: LR 3e-3, warmup 20) for ``steps`` steps; the bigger ``small`` gets
    LR 2e-3, and a short run a warmup of a fifth of it."""
    lr, warmup = ("3e-3" if model == "tiny" else "2e-3"), min(20, steps // 5)
    assert cli(["train", "--data", str(data), "--out", str(out), "--model", model, "--device", device,
                "--block-size", "128", "--micro-batch", "16", "--grad-accum", "1", "--lr", lr, "--warmup-steps",
                str(warmup), "--max-steps", str(steps), "--eval-interval", str(steps), "--eval-batches", "4",
                "--no-progress", "--log-interval", "10"]) == 0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", help="a trained tiny run or checkpoint (default: train one)")
    p.add_argument("--small", help="a trained small run or checkpoint (default: train one)")
    p.add_argument("--tiny-steps", type=int, default=360, help="the demo's 360 steps of 16 x 128 tokens")
    p.add_argument("--small-steps", type=int, default=60)
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "../shared/data/tinystories"))
    p.add_argument("--context-stories", type=int, default=200)
    p.add_argument("--val-stories", type=int, help="score only the first N validation stories (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(PrepareConfig(source=args.source, out=str(tmp / "data")))
        scored = tmp / "data"
        if args.val_stories:  # a busy CPU: the first N stories of each split, of which only val is used
            scored = tmp / "scored"
            prepare(PrepareConfig(source=args.source, out=str(scored), max_stories=args.val_stories))
        torch.manual_seed(0)
        models = {"tiny, random weights": Gemma3(load_model_config("tiny")).save_pretrained(tmp / "random"),
                  "tiny": Path(args.tiny) if args.tiny else train("tiny", tmp / "data", tmp / "tiny",
                                                                  args.tiny_steps, args.device),
                  "small": Path(args.small) if args.small else train("small", tmp / "data", tmp / "small",
                                                                     args.small_steps, args.device)}
        for label, path in models.items():
            res = evaluate_checkpoint(path, EvalConfig(data=str(scored), block_size=128,
                                                       context_stories=args.context_stories), args.device)
            state = resolve_checkpoint(path) / "trainer_state.json"
            rows.append({"model": label, "trained_tokens": json.loads(state.read_text())["tokens"] if state.exists()
                         else 0, **{k: res[k] for k in ("loss", "bits_per_byte", "tokens", "bytes")},
                         "context": res["context_use"]})
    base = rows[0]
    print(f"\n{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}; "
          f"validation split: {base['tokens']:,} tokens = {base['bytes']:,} bytes; context use: second halves of "
          f"{base['context']['stories']} stories ({base['context']['tokens']:,} tokens)")
    print(f"{'model':<24}{'trained on':>12}{'loss':>8}{'bits/byte':>11}{'x random':>10}{'2nd half|1st':>14}"
          f"{'2nd half|-':>12}{'gap':>8}")
    for r in rows:
        c = r["context"]
        print(f"{r['model']:<24}{r['trained_tokens']:>12,}{r['loss']:>8.3f}{r['bits_per_byte']:>11.3f}"
              f"{r['bits_per_byte'] / base['bits_per_byte']:>10.3f}{c['with_context']:>14.3f}"
              f"{c['without_context']:>12.3f}{c['gap']:>8.3f}")

if __name__ == "__main__":
    main()
