"""The ``tinygemma`` command: one subcommand per pipeline stage.

Each stage module contributes its subcommands through ``add_commands(subparsers)``; the
flags come from that stage's config dataclass. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict

from tinygemma.config import UserError

# Stage modules, in pipeline order; each defines add_commands(subparsers).
STAGES: tuple[str, ...] = (
    "tinygemma.data", "tinygemma.train", "tinygemma.generate", "tinygemma.evaluate", "tinygemma.export",
    "tinygemma.serve",
)


def _info(args: argparse.Namespace) -> int:
    from tinygemma.model import load_model_config, param_table

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygemma", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="show a model's config, parameter counts and FLOPs per token")
    info.add_argument("target", nargs="?", help="a checkpoint folder or config file (instead of --model)")
    info.add_argument("--model", default="gemma3-270m", help="preset name or config file (default: gemma3-270m)")
    info.add_argument("--seq-len", type=int, default=128, help="sequence length for the FLOPs count")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    for name in STAGES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinygemma {args.command}: interrupted", file=sys.stderr)
        return 130
