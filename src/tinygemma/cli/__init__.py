"""The ``tinygemma`` command: one subcommand per pipeline stage.

Each command's module in this package builds its parser (``add_commands(subparsers)``) and calls one library
function; the flags come from that stage's config dataclass. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tinygemma.config import UserError
from tinygemma.log import install_handler

# Each command and the stage module that builds its parser (``add_commands(subparsers)``), in pipeline order.
# A module is imported only when its command runs, so `tinygemma prepare` and `tinygemma --help` never load torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("tinygemma.cli.info", "show a model's config, parameter counts and FLOPs per token"),
    "prepare": ("tinygemma.cli.prepare", "tokenize TinyStories into train/val token files"),
    "train": ("tinygemma.cli.train", "pre-train a model on prepared data"),
    "finetune": ("tinygemma.cli.train", "fine-tune a checkpoint on instruct records (masked loss)"),
    "generate": ("tinygemma.cli.generate", "write stories from a checkpoint (KV-cache sampling)"),
    "eval": ("tinygemma.cli.evaluate", "mean loss and perplexity of a checkpoint over a whole data split"),
    "samples": ("tinygemma.cli.evaluate", "a Markdown/HTML report of sampled stories with automatic measures"),
    "export": ("tinygemma.cli.export", "copy a checkpoint to a clean Hugging Face model folder (no trainer state)"),
    "serve": ("tinygemma.cli.serve", "a local web page that streams stories and shows training; OpenAI-style API"),
    "judge": ("tinygemma.cli.judge", "grade completions with an LLM judge (the TinyStories paper's rubric)"),
    "report": ("tinygemma.cli.report", "one Markdown + HTML results page comparing runs"),
}


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
    install_handler()
    args = build_parser(next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:  # bad input, checked where it came in; any other exception is a bug: its traceback
        if os.environ.get("TINYGEMMA_DEBUG"):
            raise
        print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinygemma {args.command}: interrupted", file=sys.stderr)
        return 130
