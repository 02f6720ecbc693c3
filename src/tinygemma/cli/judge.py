"""`tinygemma judge`: grade completions with an LLM judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygemma.cli.args import (
    add_checkpoint_arg,
    add_dataclass_args,
    add_device_arg,
    dataclass_overrides,
    sampling_config_from_args,
)
from tinygemma.config import UserError, from_dict
from tinygemma.device import parse_device
from tinygemma.eval.judge import AGE_GROUPS, OUTPUT_FILES, JudgeConfig, is_judge_folder, judge_checkpoint
from tinygemma.eval.samples import read_prompts
from tinygemma.files import check_output_dir, check_output_file
from tinygemma.sampling import SamplingConfig


def _judge(args: argparse.Namespace) -> int:
    cfg = from_dict(JudgeConfig, dataclass_overrides(args, JudgeConfig), "judge")
    sampling = sampling_config_from_args(args)  # seed and num_samples are replaced per prompt
    prompts = read_prompts(args.prompts) if args.prompts else None
    out = Path(args.out) if args.out else Path(args.checkpoint) / "judge"
    check_output_dir(out, "--out", OUTPUT_FILES, force=args.force, ours=is_judge_folder)
    if args.cache:
        check_output_file(args.cache, "--cache")
    s = judge_checkpoint(args.checkpoint, cfg, sampling, out, prompts, args.cache, parse_device(args.device),
                         progress=True)
    for name, c in s["criteria"].items():
        print(f"{name:<12} {c['mean']:5.2f}  95% [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  n={c['n']}")
    ages = ", ".join(f"{g} ({AGE_GROUPS[g]}): {n}" for g, n in s["age_groups"].items() if n)
    print(f"age groups: {ages or '-'}")
    print(f"{s['graded']} of {s['completions']} graded ({s['cached']} from the cache), {s['failures']} failures"
          + (f" ({s['failures'] / s['completions']:.0%}): {'; '.join(s['failure_reasons'][:3])}"
             if s["failures"] else ""))
    print(f"wrote {out}")
    if s["completions"] and not s["graded"]:
        raise UserError(f"nothing graded: 0 of {s['completions']} completions, {s['failures']} failures; first: "
                        f"{s['failure_reasons'][0] if s['failure_reasons'] else '?'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="grade completions with an LLM judge (the TinyStories paper's rubric)",
                       description="Complete story beginnings with the model, then grade each completion with a "
                                   "judge model behind an OpenAI-compatible chat endpoint.")
    add_checkpoint_arg(p, "CKPT_OR_RUN")
    add_dataclass_args(p, JudgeConfig)
    add_dataclass_args(p, SamplingConfig, skip=("seed", "num_samples"))
    p.add_argument("--prompts", help="file of story beginnings, one per line (instead of the built-in set)")
    p.add_argument("--out", help="output folder (default: CKPT_OR_RUN/judge)")
    p.add_argument("--cache", help="grade cache, JSONL (default: OUT/cache.jsonl)")
    p.add_argument("--force", action="store_true", help="replace grades.jsonl and judge_summary.json in an --out "
                                                        "that is not an earlier judge's folder")
    add_device_arg(p)
    p.set_defaults(func=_judge)
