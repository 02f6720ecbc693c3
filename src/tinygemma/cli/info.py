"""`tinygemma info`: a model's config, parameter counts and FLOPs per token."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tinygemma.cli import COMMANDS
from tinygemma.config import UserError
from tinygemma.rundir import resolve_checkpoint


def _info(args: argparse.Namespace) -> int:
    from tinygemma.model import load_model_config, param_table

    if args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    target = args.target
    if target and Path(target).is_dir() and not (Path(target) / "config.json").is_file():
        target = str(resolve_checkpoint(target))  # a run folder: its best/ (else its newest checkpoint)
    cfg = load_model_config(target or args.model)
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
    info.add_argument("target", nargs="?", help="a checkpoint or run folder, or a config file (instead of --model)")
    info.add_argument("--model", default="gemma3-270m", help="preset name or config file (default: gemma3-270m)")
    info.add_argument("--seq-len", type=int, default=128, help="sequence length for the FLOPs count")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
