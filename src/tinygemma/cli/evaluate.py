"""`tinygemma eval` and `tinygemma samples`."""

from __future__ import annotations

import argparse
import json

import torch

from tinygemma.cli.args import (
    add_checkpoint_arg,
    add_dataclass_args,
    add_device_arg,
    add_dtype_arg,
    add_eval_args,
    dataclass_overrides,
    sampling_config_from_args,
)
from tinygemma.config import UserError, from_dict
from tinygemma.device import parse_device
from tinygemma.eval.instruct import evaluate_instructions, summary_lines
from tinygemma.eval.loss import EvalConfig, evaluate_checkpoint
from tinygemma.eval.render import format_measure
from tinygemma.eval.report import remember_eval
from tinygemma.eval.samples import REPORT_SEED, SAMPLE_MEASURES, read_prompts, write_samples_report
from tinygemma.files import check_output_file
from tinygemma.prompts import TUTORIAL_PROMPTS
from tinygemma.quant import load_for_inference
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


def evaluate_from_args(model: torch.nn.Module, args: argparse.Namespace, out: str | None = None) -> dict:
    """``--instruct DATA`` of eval and samples: evaluate_instructions with the flags of add_eval_args."""
    limit = args.instruct_max_new_tokens or min(400, model.config.context_length // 2)
    sampling = from_dict(SamplingConfig, {"max_new_tokens": limit, "seed": args.instruct_seed}, "instruct")
    return evaluate_instructions(model, Tokenizer(), args.instruct, args.records, args.instruct_seed, sampling,
                                 out=out)


def _eval(args: argparse.Namespace) -> int:
    if args.report is not None:
        if args.instruct is None:
            raise UserError("--report needs --instruct DATA (it writes the instruction-following result)")
        check_output_file(args.report, "--report", force=args.force)
    if args.instruct is not None:
        return _eval_instruct(args)
    cfg = from_dict(EvalConfig, dataclass_overrides(args, EvalConfig), "eval")
    res = evaluate_checkpoint(args.checkpoint, cfg, parse_device(args.device), progress=not args.json,
                              dtype=args.dtype)
    if args.dtype == "fp32":
        remember_eval(args.checkpoint, cfg, res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{cfg.split}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
          f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']:,} tokens = {res['bytes']:,} bytes in "
          f"{res['windows']:,} windows of {res['block_size']}, {res['tokens_per_s']:,.0f} tokens/s)")
    if "context_use" in res:
        c = res["context_use"]
        print(f"context use: second halves {c['with_context']:.4f} nats/token given the first half, "
              f"{c['without_context']:.4f} without; gap {c['gap']:.4f} "
              f"({c['stories']} stories, {c['tokens']:,} tokens)")
    return 0


def _eval_instruct(args: argparse.Namespace) -> int:
    model = load_for_inference(args.checkpoint, parse_device(args.device), args.dtype)
    res = evaluate_from_args(model, args, args.report)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), **res}, indent=2, ensure_ascii=False))
    else:
        print("\n".join(summary_lines(res)))
    return 0


def _samples(args: argparse.Namespace) -> int:
    cfg = sampling_config_from_args(args)
    if cfg.seed is None:
        cfg.seed = REPORT_SEED
    out = check_output_file(args.out, "--out", force=args.force)
    check_output_file(out.with_suffix(".html"), "--out", force=args.force)
    prompts = TUTORIAL_PROMPTS + (read_prompts(args.prompts) if args.prompts else [])
    model = load_for_inference(args.checkpoint, parse_device(args.device), args.dtype)
    instructions = evaluate_from_args(model, args) if args.instruct is not None else None
    report = write_samples_report(model, Tokenizer(), out, prompts, cfg, title=f"Samples from {args.checkpoint}",
                                  instructions=instructions)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["overall"]
    print(", ".join(f"{label}: {format_measure(k, o[k])}" for k, label in SAMPLE_MEASURES))
    print(f"wrote {out} and {out.with_suffix('.html')}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="mean loss and perplexity of a checkpoint over a whole data split",
                       description="Score every token of a split exactly once, in non-overlapping windows "
                                   "that start without context from the previous window.")
    add_checkpoint_arg(p)
    add_dataclass_args(p, EvalConfig)
    add_eval_args(p)
    p.add_argument("--report", metavar="FILE", help="with --instruct: also write the result as JSON "
                   "(e.g. instruct_eval.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --report file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_arg(p)
    add_dtype_arg(p, default="fp32")
    p.set_defaults(func=_eval)

    p = sub.add_parser("samples", help="a Markdown/HTML report of sampled stories with automatic measures")
    add_checkpoint_arg(p)
    p.add_argument("--prompts", help="file with more prompts, one per line (added to the tutorial's five)")
    p.add_argument("--out", default="samples.md", help="Markdown report path; the HTML twin goes beside it")
    add_dataclass_args(p, SamplingConfig)
    add_eval_args(p)
    p.add_argument("--force", action="store_true", help="replace an existing report (--out and its .html twin)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_device_arg(p)
    add_dtype_arg(p, default="fp32")
    p.set_defaults(func=_samples)
