"""`tinygemma prepare`: tokenize TinyStories (or instruct records) into token files."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace

from tinygemma.cli.args import add_dataclass_args, cli_flag, dataclass_overrides
from tinygemma.config import from_dict
from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.instruct import prepare_instruct
from tinygemma.data.prepare import prepare, verify


def _prepare(args: argparse.Namespace) -> int:
    if args.verify:
        verify(args.verify)
        return 0
    given = dataclass_overrides(args, PrepareConfig)
    instruct_given = dataclass_overrides(args, InstructOptions)
    cfg = from_dict(PrepareConfig, given, "prepare")
    flags = []
    for key, value in (given | instruct_given).items():
        flag = cli_flag(key)
        flags += [flag if value is True else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    command = shlex.join(["tinygemma", "prepare", *flags])
    opts = from_dict(InstructOptions, instruct_given, "prepare")
    if opts.instruct or opts.derive_instructions:  # records with a loss mask
        _prepare_instruct(cfg, opts, given, command)
    else:
        prepare(cfg, command)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenise TinyStories into train.bin/val.bin/meta.json",
        description="Tokenise TinyStories (hub or local .txt/.json/.jsonl/.parquet) with GPT-2's BPE into "
                    "uint16 memmaps, every story followed by <|endoftext|>.")
    add_dataclass_args(p, PrepareConfig)
    add_dataclass_args(p, InstructOptions)
    p.add_argument("--verify", metavar="DIR", help="check the sha256 of prepared data in DIR and exit")
    p.set_defaults(func=_prepare)


def _prepare_instruct(cfg: PrepareConfig, opts: InstructOptions, given: dict, command: str) -> dict:
    """The prepare handler's instruct branch: an instruct folder of its own unless --out says otherwise."""
    if "out" not in given:
        cfg = replace(cfg, out="data/tinystories-derived" if opts.derive_instructions else "data/tinystories-instruct")
    return prepare_instruct(cfg, opts, command)
