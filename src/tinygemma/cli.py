"""The ``tinygemma`` command: one subcommand per pipeline stage.

Each stage module contributes its subcommands through ``add_commands(subparsers)``; the
flags come from that stage's config dataclass. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict

from tinygemma.config import UserError

# Each command and the stage module that builds its parser (``add_commands(subparsers)``), in pipeline order.
# A module is imported only when its command runs, so `tinygemma prepare` and `tinygemma --help` never load torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("tinygemma.cli", "show a model's config, parameter counts and FLOPs per token"),
    "prepare": ("tinygemma.data", "tokenize TinyStories into train/val token files"),
    "train": ("tinygemma.trainer", "pre-train a model on prepared data"),
    "finetune": ("tinygemma.trainer", "fine-tune a checkpoint on instruct records (masked loss)"),
    "generate": ("tinygemma.generate", "write stories from a checkpoint (KV-cache sampling)"),
    "eval": ("tinygemma.evaluate", "mean loss and perplexity of a checkpoint over a whole data split"),
    "samples": ("tinygemma.evaluate", "a Markdown/HTML report of sampled stories with automatic measures"),
    "export": ("tinygemma.export", "copy a checkpoint to a clean Hugging Face model folder (no trainer state)"),
    "serve": ("tinygemma.serve", "a local web page that streams stories and shows training; OpenAI-style API"),
    "judge": ("tinygemma.judge", "grade completions with an LLM judge (the TinyStories paper's rubric)"),
    "report": ("tinygemma.report", "one Markdown + HTML results page comparing runs"),
}


def _info(args: argparse.Namespace) -> int:
    from tinygemma.model import load_model_config, param_table

    if args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    cfg = load_model_config(args.target or args.model)
    sizes = cfg.param_breakdown()
    flops = cfg.flops_per_token(args.seq_len)
    if args.json:
        print(json.dumps({"config": asdict(cfg), "params": sizes, "seq_len": args.seq_len,
                          "train_flops_per_token": flops}, indent=2))
        return 0
    print(json.dumps(asdict(cfg), indent=2))
    print("\nparameters\n" + param_table(cfg))
    print(f"\ntraining FLOPs per token at seq_len {args.seq_len}: {flops:,} ({flops / 1e9:.3f} GFLOP)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help=COMMANDS["info"][1])
    info.add_argument("target", nargs="?", help="a checkpoint folder or config file (instead of --model)")
    info.add_argument("--model", default="gemma3-270m", help="preset name or config file (default: gemma3-270m)")
    info.add_argument("--seq-len", type=int, default=128, help="sequence length for the FLOPs count")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command`` (its stage module imported), or of every command when None; with an unknown
    or missing command, only the command list (which is all ``tinygemma --help`` needs)."""
    parser = argparse.ArgumentParser(prog="tinygemma", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command][0]] if command in COMMANDS else \
        list(dict.fromkeys(m for m, _ in COMMANDS.values())) if command is None else []
    for module in modules:
        importlib.import_module(module).add_commands(sub)
    for name, (_, helptext) in COMMANDS.items():  # the others listed only
        if name not in sub.choices:
            sub.add_parser(name, help=helptext, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as e:  # UserError, and what pure modules raise for bad values
        if os.environ.get("TINYGEMMA_DEBUG"):
            raise
        print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinygemma {args.command}: interrupted", file=sys.stderr)
        return 130
