"""One results page for one or more runs: ``tinygemma report RUN [RUN ...] --out DIR``.

Writes ``DIR/report.md``, its HTML twin ``DIR/report.html`` and the PNG plots beside them: per run its
model, recipe, tokens, wall time and hardware; best and final validation loss from training's
evaluations; loss, perplexity and bits per byte over the whole split, and context use (``eval``); the
samples report's measures; instruct rates (``RUN/instruct_eval.json``) and judge scores
(``RUN/judge/judge_summary.json``) when a run has them; loss and LR/gradient-norm curves overlaid across
runs; the same prompts with the same seeds side by side.

What a run already wrote is read; what is missing is computed once and kept in ``RUN/report_cache.json``,
keyed by the checkpoint file, the data and the settings, so a second report costs nothing. A run that
cannot be read (no folder, no metrics, no checkpoint, no data) gets a line saying so, never a crash.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinygemma import rundir
from tinygemma.config import UserError, check_seed, load_json
from tinygemma.eval.instruct import INSTRUCT_MEASURES, rates
from tinygemma.eval.judge import AGE_GROUPS, CRITERIA
from tinygemma.eval.loss import EvalConfig, evaluate_checkpoint
from tinygemma.eval.render import format_measure, to_html, to_markdown
from tinygemma.eval.samples import REPORT_SEED, SAMPLE_MEASURES, sample_report
from tinygemma.files import atomic_write_text
from tinygemma.generate import load_checkpoint
from tinygemma.hf_folder import human_duration
from tinygemma.model import ModelConfig
from tinygemma.prompts import TUTORIAL_PROMPTS
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


@dataclass
class ReportConfig:
    out: str | None = field(default=None, metadata={"help": "folder for report.md, report.html and the plots"})
    data: str | None = field(default=None, metadata={"help": "prepared data for the whole-split evaluation "
                                                            "(default: each run's own training data)"})
    split: str = field(default="val", metadata={"help": "split to score"})
    context_stories: int = field(default=200, metadata={"help": "held-out stories for context use"})
    max_new_tokens: int = field(default=120, metadata={"help": "tokens per side-by-side sample"})
    seed: int = field(default=REPORT_SEED, metadata={"help": "seed of the side-by-side samples"})
    compute: bool = field(default=True, metadata={"help": "compute what runs have not written (--no-compute: "
                                                          "only read)"})

    def __post_init__(self):
        check_seed(self.seed)


OUTPUT_FILES = ("report.md", "report.html", "loss.png", "lr_grad_norm.png")


def is_report_folder(folder: Path) -> bool:
    """A folder an earlier ``tinygemma report`` wrote (a re-run there replaces its page)."""
    try:
        with open(Path(folder) / "report.md", encoding="utf-8") as f:
            return f.read(20).startswith("# tinygemma report")
    except (OSError, UnicodeDecodeError):
        return False


# -- reading a run ---------------------------------------------------------------------------------
def _hardware(ckpt: Path) -> str | None:
    """The hardware line of the checkpoint's model card (``- hardware: ...``)."""
    card = ckpt / "README.md"
    match = re.search(r"^- hardware: (.+)$", card.read_text(encoding="utf-8"), re.M) if card.is_file() else None
    return match.group(1).strip() if match else None


def _optional_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        return load_json(path)
    except UserError as e:
        problems.append(str(e))
        return None


def _is_instruct_result(res: object) -> bool:
    try:
        measures = rates(res).values()
        return (all(isinstance(r["n"], int) for r in measures) and isinstance(res["records"], int)
                and isinstance(res["story_loss"], float))
    except (KeyError, TypeError, AttributeError):
        return False


def _cached(run: Path, name: str, key: dict, compute) -> dict | None:
    """The result kept under ``name`` in ``RUN/report_cache.json`` for the same ``key``, else ``compute()``
    (kept for next time), or None without ``compute``."""
    cache = _read_cache(run)
    if isinstance(cache.get(name), dict) and cache[name].get("key") == key:
        return cache[name]["result"]
    if compute is None:
        return None
    result = compute()
    _store(run, name, key, result)
    return result


def _read_cache(run: Path) -> dict:
    path = run / "report_cache.json"
    cache = load_json(path) if path.is_file() else {}
    return cache if isinstance(cache, dict) else {}


def _store(run: Path, name: str, key: dict, result: dict) -> None:
    cache = _read_cache(run)
    cache[name] = {"key": key, "result": result}
    atomic_write_text(run / "report_cache.json", json.dumps(cache, indent=2) + "\n")


def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _eval_key(weights: list, eval_cfg: EvalConfig) -> dict:
    """The data is keyed by its resolved meta.json, not by how ``--data`` was spelled."""
    config = {k: v for k, v in asdict(eval_cfg).items() if k != "data"}
    return {"weights": weights, "data": _file_key(Path(eval_cfg.data) / "meta.json"), "config": config}


def remember_eval(run: str | os.PathLike, eval_cfg: EvalConfig, result: dict) -> None:
    """Keep ``tinygemma eval RUN``'s result (fp32 weights) where ``report`` looks for it, so that a report with
    the same settings (``make demo``'s) does not score the whole split a second time."""
    run = Path(run)
    if rundir.is_run_folder(run) and eval_cfg.data is not None:
        weights = _file_key(rundir.resolve_checkpoint(run) / "model.safetensors")
        _store(run, "eval", _eval_key(weights, eval_cfg), result)


def collect_run(run: Path, cfg: ReportConfig, device: str = "cpu") -> dict:
    """Everything the report shows about one run; ``problems`` lists what could not be read or computed."""
    info: dict = {"name": run.name, "path": str(run), "problems": []}
    problems = info["problems"]
    if not run.is_dir():
        problems.append(f"{run}: no such run folder")
        return info
    try:
        run_config = rundir.read_run_config(run) or {}
    except UserError as e:
        problems.append(str(e))
        run_config = {}
    if run_config.get("model"):
        mc = ModelConfig(**run_config["model"])
        info["model"] = {"name": run_config.get("train", {}).get("model", "?"),
                         "params": mc.param_breakdown()["total"]}
    info["recipe"] = run_config.get("recipe")
    if (run / rundir.METRICS).is_file():
        info["metrics"] = rundir.Metrics(run).read()
        vals = [r["val_loss"] for r in info["metrics"] if r.get("val_loss") is not None]
        last = info["metrics"][-1] if info["metrics"] else {}
        info.update(tokens=last.get("tokens"), wall_s=last.get("elapsed_s"),
                    best_val=min(vals) if vals else None, final_val=vals[-1] if vals else None)
    else:
        problems.append("no metrics.jsonl: no curves, tokens or training losses")
    info["instruct"] = _optional_json(run / "instruct_eval.json", problems)
    if info["instruct"] is not None and not _is_instruct_result(info["instruct"]):
        problems.append("instruct_eval.json: not a result of `tinygemma eval --instruct`; left out")
        info["instruct"] = None
    info["judge"] = _optional_json(run / "judge" / "judge_summary.json", problems)
    try:
        ckpt = rundir.resolve_checkpoint(run)
    except UserError as e:
        problems.append(f"no checkpoint ({e}): nothing evaluated or sampled")
        return info
    info["checkpoint"], info["hardware"] = str(ckpt), _hardware(ckpt)
    _evaluate(run, ckpt, run_config, cfg, device, info)
    return info


def _evaluate(run: Path, ckpt: Path, run_config: dict, cfg: ReportConfig, device: str, info: dict) -> None:
    """Whole-split evaluation and the side-by-side samples, from the cache or computed (``cfg.compute``)."""
    weights = _file_key(ckpt / "model.safetensors")
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    prompts = list(TUTORIAL_PROMPTS)

    data = Path(cfg.data or run_config.get("train", {}).get("data") or "")
    eval_cfg = EvalConfig(data=str(data), split=cfg.split, context_stories=cfg.context_stories)

    def sample() -> dict:
        return sample_report(load_checkpoint(ckpt, device=device), Tokenizer(), prompts, sampling)

    def score() -> dict:
        return evaluate_checkpoint(ckpt, eval_cfg, device)

    if (data / "meta.json").is_file():
        info["eval"] = _maybe(run, "eval", _eval_key(weights, eval_cfg), score, cfg, info)
    else:
        info["problems"].append(f"no prepared data at '{data}' (--data): no whole-split loss or context use")
    key = {"weights": weights, "prompts": prompts, "sampling": asdict(sampling)}
    info["samples"] = _maybe(run, "samples", key, sample, cfg, info)


def _maybe(run: Path, name: str, key: dict, compute, cfg: ReportConfig, info: dict) -> dict | None:
    """:func:`_cached`, with problems noted in ``info`` rather than raised."""
    try:
        result = _cached(run, name, key, compute if cfg.compute else None)
    except UserError as e:
        info["problems"].append(f"{name}: {e}")
        return None
    if result is None:
        info["problems"].append(f"{name}: not computed yet (--no-compute)")
    return result


# -- plots ---------------------------------------------------------------------------------------------
def write_overlay_plots(runs: list[dict], out: Path) -> list[str]:
    """``loss.png`` (validation and train loss vs tokens) and ``lr_grad_norm.png`` (vs step), one colour per
    run; the file names written."""
    from matplotlib.figure import Figure

    from tinygemma.plots import save_png, series

    with_metrics = [r for r in runs if r.get("metrics")]
    if not with_metrics:
        return []

    fig = Figure(figsize=(7.5, 4.2), layout="tight")
    ax = fig.subplots()
    for i, r in enumerate(with_metrics):
        colour = f"C{i % 10}"
        ax.plot(*series(r["metrics"], "train_loss", "tokens"), "-", color=colour, alpha=0.3)
        ax.plot(*series(r["metrics"], "val_loss", "tokens"), "o-", color=colour, markersize=3,
                label=f"{r['name']} (validation)")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="loss (faint: training batches)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, out / "loss.png")
    fig = Figure(figsize=(10, 3.6), layout="tight")
    axes = fig.subplots(1, 2)
    for key, ax, title in (("lr", axes[0], "learning rate"), ("grad_norm", axes[1], "gradient norm")):
        for i, r in enumerate(with_metrics):
            ax.plot(*series(r["metrics"], key, "step"), color=f"C{i % 10}", label=r["name"])
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, out / "lr_grad_norm.png")
    return ["loss.png", "lr_grad_norm.png"]


# -- the page: a list of blocks, rendered to Markdown and to HTML ------------------------------------
def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def build_blocks(runs: list[dict], plots: list[str]) -> list[tuple]:
    """The page as blocks: ("h2", text), ("p", text), ("table", header, rows), ("img", file, alt),
    ("list", items), ("quote", title, text)."""
    b: list[tuple] = [("h2", "Runs"), ("table", ["run", "model", "parameters", "recipe", "tokens", "wall time",
                                                  "hardware"],
                                       [[r["name"], r.get("model", {}).get("name", "–"),
                                         _num(r.get("model", {}).get("params")), r.get("recipe") or "–",
                                         _num(r.get("tokens")), _wall(r.get("wall_s")),
                                         r.get("hardware") or "–"]
                                        for r in runs])]
    problems = [f"{r['name']}: {p}" for r in runs for p in r["problems"]]
    if problems:
        b.append(("list", problems))
    b += [("h2", "Loss"),
          ("p", "Best and final validation loss are training's evaluations (fixed batches); the whole-split "
                "columns score every token of the split once (`tinygemma eval`). Bits per byte count each "
                "<|endoftext|> as one byte."),
          ("table", ["run", "best val loss", "final val loss", "split loss", "perplexity", "bits per byte",
                     "tokens scored"],
           [[r["name"], _num(r.get("best_val")), _num(r.get("final_val")), _num(_get(r, "eval", "loss")),
             _num(_get(r, "eval", "perplexity"), 2), _num(_get(r, "eval", "bits_per_byte")),
             _num(_get(r, "eval", "tokens"))] for r in runs])]
    b += [("img", name, name.removesuffix(".png").replace("_", " ")) for name in plots]
    b += [("h2", "Context use"),
          ("p", "Mean loss of held-out stories' second halves given their first half, and given only "
                "<|endoftext|>: the gap (nats/token) is how much the model uses what the story has said."),
          ("table", ["run", "given the first half", "given nothing", "gap", "stories"],
           [[r["name"], *(_num(_get(r, "eval", "context_use", k)) for k in ("with_context", "without_context",
                                                                             "gap", "stories"))] for r in runs])]
    overall = [_get(r, "samples", "overall") for r in runs]
    b += [("h2", "Sample measures"),
          ("table", ["run", *(label for _, label in SAMPLE_MEASURES)],
           [[r["name"], *(format_measure(k, o.get(k, math.nan)) if o else "–" for k, _ in SAMPLE_MEASURES)]
            for r, o in zip(runs, overall, strict=True)])]
    b += _instruct_blocks(runs) + _judge_blocks(runs) + _sample_blocks(runs)
    return b


def _wall(seconds: float | None) -> str:
    return "–" if seconds is None else human_duration(seconds)


def _get(d: dict | None, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _instruct_blocks(runs: list[dict]) -> list[tuple]:
    results = {r["name"]: r["instruct"] for r in runs if isinstance(r.get("instruct"), dict)}
    if not results:
        return []

    def row(name: str, res: dict) -> list[str]:
        return [name, _num(res["records"]), *(f"{c['rate']:.1%} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
                                            if c["n"] else "–" for c in rates(res).values()),
                _num(res["story_loss"])]

    return [("h2", "Instruction following"),
            ("p", "Share of stories that follow each instruction, with 95% Wilson intervals, and the masked story "
                  "loss, from each run's instruct_eval.json (`tinygemma eval RUN --instruct DATA --report "
                  "RUN/instruct_eval.json`)."),
            ("table", ["run", "records", *INSTRUCT_MEASURES, "story loss"],
             [row(name, res) for name, res in results.items()])]


def _judge_blocks(runs: list[dict]) -> list[tuple]:
    judged = [r for r in runs if isinstance(r.get("judge"), dict)]
    if not judged:
        return []

    def cell(c: dict | None) -> str:
        return f"{c['mean']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if c and c.get("n") else "–"

    rows = [[r["name"], r["judge"].get("judge_model", "?"), *(cell(_get(r, "judge", "criteria", c)) for c in CRITERIA),
             max(AGE_GROUPS, key=lambda g: _get(r, "judge", "age_groups", g) or 0) if r["judge"].get("graded") else "–",
             f"{r['judge'].get('graded', 0)} / {r['judge'].get('failures', 0)}"] for r in judged]
    return [("h2", "Judge scores"), ("p", "Means with 95% intervals, 1-10, from `tinygemma judge`."),
            ("table", ["run", "judge", *CRITERIA, "most common age group", "graded / failures"], rows)]


def _sample_blocks(runs: list[dict]) -> list[tuple]:
    sampled = [r for r in runs if r.get("samples")]
    if not sampled:
        return []
    cfg = sampled[0]["samples"]["config"]
    b: list[tuple] = [("h2", "Samples"), ("p", f"The same prompts with the same seed ({cfg['seed']}) per run, "
                                               f"temperature {cfg['temperature']}, top-k {cfg['top_k']}, top-p "
                                               f"{cfg['top_p']}, at most {cfg['max_new_tokens']} tokens.")]
    for i, prompt in enumerate(sampled[0]["samples"]["samples"]):
        b.append(("h3", prompt["prompt"]))
        for r in sampled:
            s = r["samples"]["samples"][i]
            b.append(("quote", r["name"], s["prompt"] + s["text"] + (" ⟨end⟩" if s["ended_with_eot"] else " ⟨cut⟩")))
    return b


def write_report(runs: list[str | os.PathLike], cfg: ReportConfig, device: str = "cpu",
                 log=print) -> dict:
    """Collect every run, write ``report.md``, ``report.html`` and the plots into ``cfg.out``; returns
    {"runs": [...], "files": [...]}."""
    if not cfg.out:
        raise UserError("--out is required")
    if not runs:
        raise UserError("give at least one run folder")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    collected = []
    for run in runs:
        log(f"report: {run}")
        collected.append(collect_run(Path(run), cfg, device))
    names = [r["name"] for r in collected]
    for i, r in enumerate(collected):  # runs/a/best and runs/b/best must not share a label
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({i + 1})"
    plots = write_overlay_plots(collected, out)
    blocks = build_blocks(collected, plots)
    title = "tinygemma report: " + ", ".join(r["name"] for r in collected)
    atomic_write_text(out / "report.md", to_markdown(title, blocks))
    atomic_write_text(out / "report.html", to_html(title, blocks))
    return {"runs": collected, "files": ["report.md", "report.html", *plots]}
