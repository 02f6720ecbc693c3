"""Instruction following before and after ``tinygemma finetune``, against a control, on held-out stories.

    python bench/instruct.py                          # CPU: small preset on the TinyStories sample
    python bench/instruct.py --base runs/small        # reuse a pre-trained run (its best/)

1. pre-train the small preset on the plain stories (or take ``--base``; cached in the work folder);
2. derive instructions from the stories themselves (``prepare --derive-instructions``: three of the story's
   content words, one of its sentences, Dialogue when it has quoted speech): the training split's records to
   fine-tune on, the validation split's records (never trained on) to measure;
3. fine-tune the base model on the instruct records, and, as a control, on the same stories with the same
   "Story:" layout but no instruction lines (same steps, same recipe): so a gain over the control is what the
   instructions taught, not more training on the stories;
4. for the first ``--records`` validation records, each model writes a story from the record's instructions
   (seeded sampling) and is scored: all three words used (inflections count), the sentence contained,
   dialogue when asked, all of them; with 95% Wilson intervals, and the masked story loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tinygemma import rundir
from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.instruct import prepare_instruct
from tinygemma.data.prepare import prepare
from tinygemma.eval.instruct import INSTRUCT_MEASURES as MEASURES
from tinygemma.eval.instruct import evaluate_instructions, rates
from tinygemma.generate import load_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer
from tinygemma.train.trainer import Trainer, finetune


def pretrain(args: argparse.Namespace, data: Path) -> Path:
    """The small preset on the plain stories with the muon recipe at bench/recipe.py's best small-preset LRs
    (AdamW 1e-2 on embedding and norms, Muon 3e-3 on the blocks' matrices)."""
    out = Path(args.workdir) / "base"
    if rundir.latest_checkpoint(out) is not None and (out / rundir.BEST).is_dir():
        return out / rundir.BEST  # cached
    Trainer({"data": str(data), "out": str(out), "model": "small", "device": "cpu", "compile": False,
             "block_size": 256, "micro_batch": 8, "grad_accum": 1, "max_tokens": args.pretrain_tokens,
             "max_steps": None, "lr": 1e-2, "muon_lr": 3e-3, "warmup_steps": 30, "eval_interval": 200,
             "eval_batches": 4, "progress": False}, recipe="muon", force=True).fit()
    return out / rundir.BEST


def tune(args: argparse.Namespace, base: Path, data: Path, name: str) -> Path:
    out = Path(args.workdir) / name
    finetune(base, {"data": str(data), "out": str(out), "device": "cpu", "compile": False, "block_size": 384,
                    "micro_batch": 8, "max_steps": args.finetune_steps, "lr": args.finetune_lr,
                    "warmup_steps": 10, "eval_interval": args.finetune_steps, "eval_batches": 2,
                    "progress": False}, force=True)
    return out / rundir.checkpoint_dir(out, args.finetune_steps).name


def score(ckpt: Path, instruct: Path, args: argparse.Namespace) -> dict:
    model = load_checkpoint(ckpt)
    t0 = time.perf_counter()
    res = evaluate_instructions(model, Tokenizer(), instruct, n=args.records, seed=0,
                                sampling=SamplingConfig(max_new_tokens=300), batch_size=16)
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "roneneldan/TinyStories"))
    p.add_argument("--workdir", default="runs/bench-instruct")
    p.add_argument("--base", default=None, help="a pre-trained checkpoint or run folder (default: pre-train one)")
    p.add_argument("--pretrain-tokens", type=int, default=1_300_000, help="about one pass over the sample")
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--records", type=int, default=200, help="validation records scored per model")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir)
    plain, instruct, control = work / "data", work / "instruct", work / "control"
    prepare(PrepareConfig(source=args.source, out=str(plain)))
    prepare_instruct(PrepareConfig(source=args.source, out=str(instruct)), InstructOptions(derive_instructions=True))
    prepare_instruct(PrepareConfig(source=args.source, out=str(control)),
                     InstructOptions(derive_instructions=True, headers=False))
    base = rundir.resolve_checkpoint(args.base) if args.base else pretrain(args, plain)
    models = {"base": base, "fine-tuned": tune(args, base, instruct, "finetuned"),
              "control": tune(args, base, control, "control")}
    results = {name: score(ckpt, instruct, args) for name, ckpt in models.items()}
    print(f"\nCPU ({os.cpu_count()} cores), torch {torch.__version__}; base {base}; {args.records} validation "
          f"records; fine-tuning {args.finetune_steps} steps at lr {args.finetune_lr}")
    print(f"{'model':<12}" + "".join(f"{m:>22}" for m in MEASURES) + f"{'story loss':>12}")
    for name, res in results.items():
        print(f"{name:<12}" + "".join(f"{c['rate']:>8.1%} [{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}]"
                                      for c in rates(res).values()) + f"{res['story_loss']:>12.4f}")
    for measure, label in (("words", "all three words used"), ("each word", "each required word used")):
        rate = {name: rates(res)[measure]["rate"] for name, res in results.items()}
        if rate["base"] > 0:
            print(f"{label}: fine-tuned / base = {rate['fine-tuned'] / rate['base']:.2f}x, "
                  f"control / base = {rate['control'] / rate['base']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({n: {k: v for k, v in r.items() if k != "samples"}
                                               for n, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
