"""Instruction following of a model trained on instruct records, against a control, on held-out stories.

    python bench/instruct.py                          # CPU: small preset on the TinyStories sample
    python bench/instruct.py --base runs/small        # reuse a pre-trained run (its best/)
    python bench/instruct.py --window 512 --route scratch --epochs 2 --name w512-scratch --json w512.json

1. derive instructions from the stories themselves (``prepare --derive-instructions``: three of the story's
   content words, one of its sentences, Dialogue when it has quoted speech): the training split's records to
   train on, the validation split's records (never trained on; or ``--eval-data``'s) to measure;
2. pre-train the base on the plain stories (``--model``, ``--window``, ``--pretrain-tokens``; or take ``--base``;
   cached in the work folder by its config);
3. the route (``--route``): ``finetune`` the base on the instruct records; ``scratch``: a fresh model trained on
   the instruct records from the first step; ``mix``: the same on records of which only a share
   (``--instruct-share``) keeps its instruction lines. The control is trained alike (same start, steps and
   recipe) on the same stories with the same "Story:" layout but no instruction lines: a gain over the control is
   what the instructions taught, not more training on the stories;
4. for the first ``--records`` validation records, each model writes a story from the record's instructions
   (seeded sampling) and is scored: all three words used (inflections count), the sentence contained, dialogue
   when asked, all of them, each word; with 95% Wilson intervals; beside them the masked story loss, the share of
   stories ending with <|endoftext|> and repeated 4-grams (what word-stuffing would show); ``--diagnose`` adds
   per layer the attention from the story onto the instruction lines and the loss on the required words.

Bad flag values are refused in one line (exit 2). ``--json`` writes the run's config, wall times and every
model's every measure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tinygemma import rundir
from tinygemma.config import UserError, to_dict
from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.instruct import prepare_instruct, read_records
from tinygemma.data.prepare import prepare
from tinygemma.eval.instruct import INSTRUCT_MEASURES as MEASURES
from tinygemma.eval.instruct import evaluate_instructions, rates
from tinygemma.eval.instruct_diagnose import diagnose, diagnosis_lines
from tinygemma.generate import load_checkpoint
from tinygemma.model import load_model_config
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer
from tinygemma.train.config import MUON_KEYS, load_recipe
from tinygemma.train.sampler import InstructDataset
from tinygemma.train.trainer import Trainer, finetune

ROUTES = ("finetune", "scratch", "mix")
# pre-training (and scratch/mix's default): bench/recipe.py's best small-preset LRs for the muon recipe
PRETRAIN_LR, PRETRAIN_MUON_LR = 1e-2, 3e-3


@dataclass
class Bench:
    """The flags, checked; every field lands in the JSON output's config."""

    source: str
    workdir: str
    name: str | None
    base: str | None
    model: str
    window: int | None
    pretrain_tokens: int
    route: str
    instruct_share: float
    finetune_steps: int | None
    epochs: float | None
    finetune_recipe: str | None
    optimizer: str | None
    finetune_lr: float | None
    muon_lr: float | None
    block_size: int
    micro_batch: int
    records: int
    eval_data: str | None
    diagnose: bool
    json: str | None

    def __post_init__(self):
        checks = [(self.window is None or self.window >= 1, f"--window must be >= 1, got {self.window}"),
                  (self.pretrain_tokens >= 1, f"--pretrain-tokens must be >= 1, got {self.pretrain_tokens}"),
                  (self.finetune_steps is None or self.finetune_steps >= 1,
                   f"--finetune-steps must be >= 1, got {self.finetune_steps}"),
                  (self.epochs is None or 0 < self.epochs < math.inf, f"--epochs must be > 0, got {self.epochs}"),
                  (self.finetune_steps is None or self.epochs is None, "--finetune-steps and --epochs exclude each "
                                                                       "other"),
                  (self.block_size >= 64, f"--block-size must be >= 64, got {self.block_size}"),
                  (self.micro_batch >= 1, f"--micro-batch must be >= 1, got {self.micro_batch}"),
                  (self.records >= 1, f"--records must be >= 1, got {self.records}"),
                  (self.instruct_share == 1.0 or self.route == "mix", "--instruct-share goes with --route mix"),
                  (not (self.base and self.window and self.route == "finetune"),
                   "--window sets the model to pre-train and fine-tune; --base brings its own")]
        for name in ("finetune_lr", "muon_lr"):
            value = getattr(self, name)
            checks.append((value is None or 0 < value < math.inf, f"--{name.replace('_', '-')} must be > 0, "
                                                                  f"got {value}"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        InstructOptions(derive_instructions=True, instruct_share=self.instruct_share)  # its own range check
        if self.phase_optimizer() != "muon" and self.muon_lr is not None:  # (also refuses an unknown recipe)
            raise UserError(f"--muon-lr needs Muon: the {self.phase_recipe()} recipe uses AdamW (add --optimizer muon)")

    def phase_recipe(self) -> str:
        return self.finetune_recipe or ("finetune" if self.route == "finetune" else "instruct")

    def phase_optimizer(self) -> str:
        """The instruct phase's optimizer: --optimizer, else its recipe's (an unknown recipe is refused here,
        not after pre-training)."""
        recipe = load_recipe(self.phase_recipe())
        return self.optimizer or recipe.get("optimizer", "adamw")

    @property
    def trained(self) -> str:
        """The name of the model the route trains on instructions."""
        return {"finetune": "fine-tuned", "scratch": "scratch", "mix": f"mix {self.instruct_share:g}"}[self.route]

    def run_folder(self) -> Path:
        return Path(self.workdir) / (self.name or self.route)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every tinygemma command refuses bad input
        raise UserError(message)


def parse(argv: list[str] | None = None) -> Bench:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "roneneldan/TinyStories"))
    p.add_argument("--workdir", default="runs/bench-instruct")
    p.add_argument("--name", default=None, help="this run's row name (default: the route); its runs' folder")
    p.add_argument("--base", default=None, help="a pre-trained checkpoint or run folder (default: pre-train one)")
    p.add_argument("--model", default="small", help="the base's preset or model config JSON (default small)")
    p.add_argument("--window", type=int, default=None, help="the model's sliding window (every other Gemma 3 "
                   "feature kept: local/global layers, MQA, QK-norm); default: the preset's")
    p.add_argument("--pretrain-tokens", type=int, default=1_300_000, help="about one pass over the sample")
    p.add_argument("--route", default="finetune", choices=ROUTES)
    p.add_argument("--instruct-share", type=float, default=1.0, help="--route mix: the share of records that "
                   "keep their instruction lines")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps on instruct records (default 400)")
    p.add_argument("--epochs", type=float, default=None, help="instead of --finetune-steps: passes over the "
                   "training records")
    p.add_argument("--finetune-recipe", default=None, help="recipe of the instruct phase (default: finetune, "
                   "or instruct for scratch/mix)")
    p.add_argument("--optimizer", default=None, choices=("muon", "adamw"), help="default: the recipe's")
    p.add_argument("--finetune-lr", type=float, default=None, help=f"peak LR (default: 1e-3 for finetune, "
                   f"{PRETRAIN_LR:g} for scratch/mix)")
    p.add_argument("--muon-lr", type=float, default=None, help=f"Muon's peak LR (default: lr; {PRETRAIN_MUON_LR:g}"
                   " for scratch/mix)")
    p.add_argument("--block-size", type=int, default=384, help="longest record row of the instruct phase")
    p.add_argument("--micro-batch", type=int, default=8, help="records per step of the instruct phase")
    p.add_argument("--records", type=int, default=200, help="validation records scored per model")
    p.add_argument("--eval-data", default=None, help="score on this prepared instruct folder's validation records")
    p.add_argument("--diagnose", action="store_true", help="add the attention and word-loss diagnosis")
    p.add_argument("--json", default=None, help="also write the results here")
    return Bench(**vars(p.parse_args(argv)))


# -- data and models ----------------------------------------------------------------------------------------
def prepare_data(b: Bench) -> dict[str, Path]:
    """The plain stories, their derived instruct records, the control's (no instruction lines), and for the mix
    route the share-F records; prepared once (``prepare`` skips an up-to-date folder)."""
    work = Path(b.workdir)
    folders = {"plain": work / "data", "instruct": work / "instruct", "control": work / "control"}
    prepare(PrepareConfig(source=b.source, out=str(folders["plain"])))
    options = {"instruct": InstructOptions(derive_instructions=True),
               "control": InstructOptions(derive_instructions=True, headers=False)}
    if b.route == "mix":
        folders["mix"] = work / f"mix-{b.instruct_share:g}"
        options["mix"] = InstructOptions(derive_instructions=True, instruct_share=b.instruct_share)
    for name, opts in options.items():
        prepare_instruct(PrepareConfig(source=b.source, out=str(folders[name])), opts)
    return folders


def model_spec(b: Bench) -> str:
    """--model, or with --window a config JSON in the work folder: the same model with that sliding window."""
    if b.window is None:
        return b.model
    cfg = load_model_config(b.model)
    if b.window > cfg.context_length:
        raise UserError(f"--window {b.window} exceeds the model's context length {cfg.context_length}")
    path = Path(b.workdir) / f"model-{Path(b.model).stem}-w{b.window}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(replace(cfg, sliding_window=b.window)), indent=2) + "\n")
    return str(path)


def pretrain(b: Bench, data: Path, model: str) -> tuple[Path, float]:
    """The base on the plain stories with the muon recipe at bench/recipe.py's best small-preset LRs (AdamW 1e-2
    on embedding and norms, Muon 3e-3 on the blocks' matrices), cached by its config; (checkpoint, seconds)."""
    overrides = {"data": str(data), "model": model, "device": "cpu", "compile": False, "block_size": 256,
                 "micro_batch": 8, "grad_accum": 1, "max_tokens": b.pretrain_tokens, "max_steps": None,
                 "lr": PRETRAIN_LR, "muon_lr": PRETRAIN_MUON_LR, "warmup_steps": 30, "eval_interval": 200,
                 "eval_batches": 4, "progress": False}
    key = hashlib.sha256(json.dumps([overrides, to_dict(load_model_config(model))], sort_keys=True).encode())
    out = Path(b.workdir) / f"base-{Path(model).stem}-{key.hexdigest()[:8]}"
    if rundir.latest_checkpoint(out) is None or not (out / rundir.BEST).is_dir():
        Trainer({**overrides, "out": str(out)}, recipe="muon", force=True).fit()
    state = json.loads((rundir.latest_checkpoint(out) / rundir.TRAINER_STATE).read_text())
    return out / rundir.BEST, state["train_time_s"]


def phase_steps(b: Bench, data: Path) -> int:
    """Steps of the instruct phase: --finetune-steps, or --epochs over the training records (default 400)."""
    if b.epochs is None:
        return b.finetune_steps or 400
    return max(1, math.ceil(b.epochs * len(InstructDataset(data, "train")) / b.micro_batch))


def phase_overrides(b: Bench, data: Path, out: Path, steps: int) -> dict:
    scratch = b.route != "finetune"
    o = {"data": str(data), "out": str(out), "device": "cpu", "compile": False, "block_size": b.block_size,
         "micro_batch": b.micro_batch, "grad_accum": 1, "max_steps": steps, "max_tokens": None,
         "lr": b.finetune_lr or (PRETRAIN_LR if scratch else 1e-3), "warmup_steps": 30 if scratch else 10,
         "eval_interval": steps, "eval_batches": 2, "progress": False}
    if b.phase_optimizer() == "adamw":
        o |= {"optimizer": "adamw", **{k: None for k in MUON_KEYS}}  # a Muon recipe's Muon fields go too
    else:
        o["optimizer"] = "muon"
        if b.muon_lr is not None or (scratch and b.finetune_lr is None):
            o["muon_lr"] = b.muon_lr or PRETRAIN_MUON_LR
    return o


def train_phase(b: Bench, base: Path, model: str, data: Path, name: str) -> tuple[Path, float, dict]:
    """One model of the route on ``data``: the base fine-tuned, or a fresh ``model`` (scratch, mix);
    (its last checkpoint, training seconds, resolved train config)."""
    out = b.run_folder() / name
    steps = phase_steps(b, data)
    overrides = phase_overrides(b, data, out, steps)
    if b.route == "finetune":
        state = finetune(base, overrides, recipe=b.phase_recipe(), force=True)
    else:
        state = Trainer({**overrides, "model": model}, recipe=b.phase_recipe(), force=True).fit()
    return rundir.checkpoint_dir(out, steps), state.train_time_s, rundir.read_run_config(out)["train"]


# -- scoring and output -------------------------------------------------------------------------------------
def score(b: Bench, ckpt: Path, data: Path) -> dict:
    """Every measure of ``ckpt`` on ``data``'s first --records validation records (and the diagnosis)."""
    model = load_checkpoint(ckpt)
    t0 = time.perf_counter()
    res = evaluate_instructions(model, Tokenizer(), data, n=b.records, seed=0,
                                sampling=SamplingConfig(max_new_tokens=300), batch_size=16)
    out = {"checkpoint": str(ckpt), "rates": rates(res), "score_seconds": time.perf_counter() - t0,
           **{k: res[k] for k in ("story_loss", "story_tokens", "ended_with_eot", "repeated_4gram_rate")}}
    if b.diagnose:
        out["diagnosis"] = diagnose(model, read_records(data), n=b.records)
    return out


def table(b: Bench, results: dict[str, dict]) -> list[str]:
    """The rows: every rate with its interval, story loss, repeated 4-grams, the share ending with
    <|endoftext|>; then the ratios the targets name."""
    width = max(len(n) for n in results) + len(b.name or "") + 3
    head = "".join(f"{m:>20}" for m in MEASURES)
    lines = [f"{'model':<{width}}{head}{'story loss':>12}{'rep. 4-grams':>14}{'ends EOT':>10}"]
    for name, r in results.items():
        row = "".join(f"{c['rate']:>7.1%} [{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}]" if c["n"] else f"{'-':>20}"
                      for c in r["rates"].values())
        label = f"{b.name} / {name}" if b.name else name
        lines.append(f"{label:<{width}}{row}{r['story_loss']:>12.4f}{r['repeated_4gram_rate']:>14.1%}"
                     f"{r['ended_with_eot']:>10.1%}")
    for measure in ("words", "each word"):
        rate = {name: r["rates"][measure]["rate"] or 0.0 for name, r in results.items()}
        pairs = [(b.trained, "base"), ("control", "base"), (b.trained, "control")]
        parts = [f"{x} / {y} = {rate[x] / rate[y]:.2f}x" for x, y in pairs if rate.get(y)]
        if parts:
            lines.append(f"{measure}: " + ", ".join(parts))
    return lines


def machine() -> str:
    return f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def run(b: Bench) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    if b.eval_data:  # not instruct data: refused before any work
        InstructDataset(b.eval_data, "val")
    given_base = rundir.resolve_checkpoint(b.base) if b.base else None
    model = model_spec(b)
    folders = prepare_data(b)
    scored = Path(b.eval_data) if b.eval_data else folders["instruct"]
    base, base_seconds = (given_base, None) if given_base else pretrain(b, folders["plain"], model)
    trained_data = folders["mix" if b.route == "mix" else "instruct"]
    trained, seconds, configs = {}, {"base": base_seconds}, {}
    for name, data in ((b.trained, trained_data), ("control", folders["control"])):
        trained[name], seconds[name], configs[name] = train_phase(b, base, model, data, name.split()[0])
    results = {name: score(b, ckpt, scored) for name, ckpt in {"base": base, **trained}.items()}
    for name, r in results.items():
        r["train_seconds"] = seconds[name]
    return {"name": b.name, "machine": machine(), "config": asdict(b), "model": to_dict(load_model_config(
        str(base))), "scored_on": str(scored), "train_configs": configs, "models": results,
        "wall_seconds": time.perf_counter() - t_start}


def report(out: dict, b: Bench) -> None:
    steps = out["train_configs"]["control"]["max_steps"]
    m = out["model"]
    print(f"\n{out['machine']}; {b.name or b.route}: route {b.route}, model {b.base or b.model} (window "
          f"{m['sliding_window']}, {m['num_layers']} layers), {steps} steps of the {b.phase_recipe()} recipe "
          f"({b.phase_optimizer()}); {b.records} validation records of {out['scored_on']}; "
          f"{out['wall_seconds'] / 60:.1f} min in all")
    print("\n".join(table(b, out["models"])))
    for name, r in out["models"].items():
        if "diagnosis" in r:
            print(f"\n{name}:\n" + "\n".join(diagnosis_lines(r["diagnosis"])))


def main(argv: list[str] | None = None) -> int:
    try:
        b = parse(argv)
        out = run(b)
    except UserError as e:
        print(f"bench/instruct.py: error: {e}", file=sys.stderr)
        return 2
    report(out, b)
    if b.json:
        Path(b.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
