"""CPU speedrun: the lowest whole-validation loss a fixed training wall-clock buys on this machine.

    python bench/cpu_speedrun.py                          # the README's grid, 10 minutes of training per row
    python bench/cpu_speedrun.py --minutes 2 --only mini-muon-fp32 tiny-muon-fp32   # a quick look
    python bench/cpu_speedrun.py --rerun                  # forget earlier rows of WORKDIR and train again

Every row trains one configuration (preset, recipe, precision, block size, micro-batch) on the shared TinyStories
sample with the same seed and schedule shape (its recipe's warmup fraction, cosine to lr/10). The budget is wall
clock, but a run is counted in tokens: short probes measure every configuration's training tokens/s first (in
interleaved rounds, the median kept), and each run gets ``rate x minutes`` tokens (whole steps). So its loss does
not depend on what else the machine did during the run; only its wall time does, which the table reports beside
the load average. Run it on a quiet machine: the probes must be. On a busy one, ``--reference ROW=TOKENS_PER_S``
scales every probed rate by that row's rate measured earlier on the quiet machine (the ratios between rows probed
in the same rounds hold under a steady load; the absolute rates do not).

Each row: steps, tokens, probed tokens/s, wall time (evaluations included), the whole validation split's loss
and bits per byte (``tinygemma eval``'s measure, at the row's block size), and the samples report's measures on
the tutorial's five prompts (ends with <|endoftext|>, repeated 4-grams, distinct-2, non-words per 100 words).
One PNG shows the in-run validation loss (fixed windows) against wall time for the best rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tinygemma import rundir  # first: tinygemma turns on huge pages before torch allocates
from tinygemma.data.config import PrepareConfig
from tinygemma.data.dataset import TokenDataset
from tinygemma.data.prepare import prepare
from tinygemma.eval.loss import evaluate_tokens
from tinygemma.eval.samples import sample_report
from tinygemma.model import Gemma3
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer
from tinygemma.train.config import load_recipe, resolve_config
from tinygemma.train.trainer import train

# LRs: bench/recipe.py's best for the small preset (AdamW 3e-2; Muon 3e-3 with AdamW 1e-2 on the embedding).
MUON_LRS = {"lr": 1e-2, "muon_lr": 3e-3}
ADAMW_LRS = {"lr": 3e-2}


@dataclass(frozen=True)
class Row:
    name: str
    model: str
    recipe: str = "muon"
    precision: str = "fp32"
    block_size: int = 128
    micro_batch: int = 16

    @property
    def lrs(self) -> dict:
        return MUON_LRS if self.recipe == "muon" else ADAMW_LRS


GRID = [
    Row("mini-muon-fp32", "mini"),
    Row("mini-muon-fp32-b256", "mini", block_size=256, micro_batch=8),
    Row("small-muon-fp32", "small", micro_batch=8),
    Row("mini-muon-bf16", "mini", precision="bf16"),
    Row("mini-adamw-fp32", "mini", recipe="adamw"),
    Row("tiny-muon-fp32", "tiny"),
]
ROWS = {r.name: r for r in GRID}


def row_rate(text: str) -> tuple[str, float]:
    name, _, rate = text.partition("=")
    if name not in ROWS or not rate:
        raise argparse.ArgumentTypeError(f"expected ROW=TOKENS_PER_S with ROW one of {', '.join(ROWS)}")
    return name, float(rate)


def overrides(row: Row, out: Path, args: argparse.Namespace, **budget) -> dict:
    return {"model": row.model, "data": str(Path(args.workdir) / "data"), "out": str(out), "device": "cpu",
            "precision": row.precision, "block_size": row.block_size, "micro_batch": row.micro_batch,
            "grad_accum": 1, "seed": args.seed, "compile": False, "progress": False, **row.lrs, **budget}


def probe(row: Row, args: argparse.Namespace) -> float:
    """Training tokens/s of ``row``: the median step after ``--probe-warmup`` steps."""
    out = Path(args.workdir) / "probe" / row.name
    steps = args.probe_warmup + args.probe_steps
    cfg = resolve_config(load_recipe(row.recipe), overrides(row, out, args, max_steps=steps, log_interval=1,
                                                           eval_interval=10 * steps, eval_batches=1))
    train(cfg, recipe=row.recipe, force=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["step"] > args.probe_warmup and r.get("tokens_per_s")]
    return statistics.median(rates)


def probe_rates(rows: list[Row], args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of every row: the median over ``--probe-rounds`` interleaved rounds, scaled by ``--reference``."""
    measured: dict[str, list[float]] = {r.name: [] for r in rows}
    for _ in range(args.probe_rounds):  # interleaved, so that a burst of load hits every row alike
        for row in rows:
            measured[row.name].append(probe(row, args))
    rates = {name: statistics.median(values) for name, values in measured.items()}
    if args.reference:
        name, quiet = args.reference
        rates = {k: v * quiet / rates[name] for k, v in rates.items()}
    return rates


def run(row: Row, rate: float, args: argparse.Namespace) -> dict:
    """Train ``row`` on ``rate`` x minutes tokens; returns its results (kept in WORKDIR/NAME/row.json)."""
    out = Path(args.workdir) / row.name
    per_step = row.block_size * row.micro_batch
    steps = max(1, int(rate * args.minutes * 60 / per_step))
    cfg = resolve_config(load_recipe(row.recipe), overrides(
        row, out, args, max_tokens=steps * per_step, eval_interval=max(1, steps // args.evals),
        eval_batches=args.eval_batches, save_interval=steps, keep_last=1))
    load = os.getloadavg()[0]
    state = train(cfg, recipe=row.recipe, force=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    source = "given" if row.name in dict(args.rate) else "probed" + (" (scaled)" if args.reference else "")
    result = {**asdict(row), **row.lrs, "probe_tokens_per_s": rate, "rate_source": source,
              "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
              "steps": state.step, "tokens": state.tokens,
              "train_s": state.elapsed_s, "load_at_start": load, "load_at_end": os.getloadavg()[0],
              "curve": [(r["elapsed_s"], r["tokens"], r["val_loss"]) for r in records if "val_loss" in r],
              "checkpoint": str(rundir.checkpoint_dir(out, state.step))}
    result.update(score(result, args))
    (out / "row.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def score(result: dict, args: argparse.Namespace) -> dict:
    """The whole validation split's loss and bits/byte, and the samples report's measures."""
    model = Gemma3.from_pretrained(result["checkpoint"], device="cpu").eval()
    tokenizer = Tokenizer()
    whole = evaluate_tokens(model, TokenDataset(Path(args.workdir) / "data", "val").tokens, result["block_size"],
                            batch_size=16, tokenizer=tokenizer)
    report = sample_report(model, tokenizer, cfg=SamplingConfig(seed=args.seed, max_new_tokens=150))
    return {"val_loss": whole["loss"], "bits_per_byte": whole["bits_per_byte"], "samples": report["overall"],
            "params": sum(p.numel() for p in model.parameters())}


def plot(rows: list[dict], path: Path, best: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in sorted(rows, key=lambda r: r["val_loss"])[:best]:
        _, tokens, losses = zip(*r["curve"], strict=True)
        ax.plot([t / r["probe_tokens_per_s"] / 60 for t in tokens], losses, "o-", markersize=3,
                label=f"{r['name']}: {r['val_loss']:.3f} (whole val)")
    # tokens over the row's probed rate: the quiet machine's clock, whatever load the run itself met
    ax.set(xlabel="training minutes at the row's quiet rate (tokens / probed tokens/s)",
           ylabel="validation loss (nats, fixed windows)", title="CPU speedrun: loss against wall time", ylim=(2.5, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = ("| row | params | recipe | precision | block x micro | steps | tokens | tokens/s (probe) | huge pages "
            "| wall | load | whole val | bits/byte | ends with EOT | rep. 4-grams | distinct-2 | non-words/100 |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        s = r["samples"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['recipe']} | {r['precision']} | "
                     f"{r['block_size']} x {r['micro_batch']} | {r['steps']:,} | {r['tokens']:,} | "
                     f"{r['probe_tokens_per_s']:,.0f} | {'yes' if r.get('huge_pages') else 'no'} | "
                     f"{r['train_s'] / 60:.1f} min | {r['load_at_start']:.1f} | "
                     f"**{r['val_loss']:.3f}** | {r['bits_per_byte']:.3f} | {s['ended_with_eot']:.0%} | "
                     f"{s['repeated_4gram_rate']:.3f} | {s['distinct_2']:.3f} | {s['nonwords_per_100']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training wall clock per row")
    p.add_argument("--only", nargs="+", metavar="ROW", help=f"rows to run (default: all of {[r.name for r in GRID]})")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--evals", type=int, default=10, help="evaluations per run (points of the curve)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--probe-warmup", type=int, default=3)
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--probe-rounds", type=int, default=2)
    p.add_argument("--reference", type=row_rate, metavar="ROW=TOKENS_PER_S",
                   help="scale the probed rates so that ROW's is this (its rate on the quiet machine)")
    p.add_argument("--rate", type=row_rate, action="append", default=[], metavar="ROW=TOKENS_PER_S",
                   help="give ROW this rate instead of probing it (measured earlier; repeatable)")
    p.add_argument("--rerun", action="store_true", help="train rows that WORKDIR already holds again")
    p.add_argument("--source", default=os.environ.get("TINYSTORIES_DIR", "../shared/data/tinystories"))
    p.add_argument("--workdir", default="runs/bench-speedrun")
    p.add_argument("--plot", default="docs/speedrun.png")
    p.add_argument("--best", type=int, default=4, help="rows in the plot")
    args = p.parse_args()
    if unknown := set(args.only or []) - set(ROWS):
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    work = Path(args.workdir)
    if not (work / "data" / "meta.json").is_file():
        prepare(PrepareConfig(source=args.source, out=str(work / "data")))
    names = args.only or list(ROWS)
    done = {n: json.loads((work / n / "row.json").read_text()) for n in names
            if (work / n / "row.json").is_file() and not args.rerun}
    given = dict(args.rate)
    todo = [n for n in names if n not in done and n not in given]
    if args.reference and todo and args.reference[0] not in todo:  # probed in the same rounds as the others
        todo.append(args.reference[0])
    rates = {**(probe_rates([ROWS[n] for n in todo], args) if todo else {}), **given}
    rows = []
    for name in names:
        rows.append(done.get(name) or run(ROWS[name], rates[name], args))
        print(f"{name}: whole val {rows[-1]['val_loss']:.4f} after {rows[-1]['tokens']:,} tokens "
              f"({rows[-1]['train_s'] / 60:.1f} min)", flush=True)
    plot(rows, Path(args.plot), args.best)
    import torch  # imported by tinygemma above, after it set THP_MEM_ALLOC_ENABLE

    print(f"\n{args.minutes:g} min of training per row, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; plot: {args.plot}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
