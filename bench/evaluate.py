"""Do the offline measures separate good models from bad? Random weights vs the demo's tiny model vs a small one.

    python bench/evaluate.py                        # CPU: trains tiny and small for a few minutes each
    python bench/evaluate.py --minutes 30 --device cuda

Prepares the TinyStories sample, trains the ``tiny`` preset with the demo's settings and the ``small`` preset
with the same batch for ``--minutes`` each, and scores both and a ``tiny`` model with random weights
(the baseline) on the whole validation split, as ``tinygemma eval`` does: loss, bits per byte, and context
use on the first 200 held-out stories. Ratios are to the random model.
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
from tinygemma.data import PrepareConfig, prepare
from tinygemma.evaluate import EvalConfig, evaluate_checkpoint
from tinygemma.model import Gemma3, load_model_config


def train(model: str, data: Path, out: Path, minutes: float, device: str) -> None:
    """The demo's recipe (scripts/demo.sh) under a time budget."""
    assert cli(["train", "--data", str(data), "--out", str(out), "--model", model, "--device", device,
                "--block-size", "128", "--micro-batch", "16", "--grad-accum", "1", "--lr", "3e-3" if model == "tiny"
                else "1e-3", "--warmup-steps", "20", "--time-budget", str(minutes), "--eval-interval", "50",
                "--eval-batches", "4", "--no-progress", "--log-interval", "50"]) == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="training time per trained model")
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "../shared/data/tinystories"))
    p.add_argument("--context-stories", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(PrepareConfig(source=args.source, out=str(tmp / "data")))
        torch.manual_seed(0)
        Gemma3(load_model_config("tiny")).save_pretrained(tmp / "random")
        for name in ("tiny", "small"):
            train(name, tmp / "data", tmp / name, args.minutes, args.device)
        for name, label in (("random", "tiny, random weights"), ("tiny", f"tiny, {args.minutes:g} min"),
                            ("small", f"small, {args.minutes:g} min")):
            res = evaluate_checkpoint(tmp / name, EvalConfig(data=str(tmp / "data"), block_size=128,
                                                             context_stories=args.context_stories), args.device)
            state = tmp / name / "best" / "trainer_state.json"
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
