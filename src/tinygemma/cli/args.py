"""Argument helpers shared by the commands: dataclass flags, checkpoint, device, dtype and prompt flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from tinygemma.config import from_dict
from tinygemma.prompts import FEATURES, instruction_header
from tinygemma.sampling import SamplingConfig


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                       defaults: dict[str, Any] | None = None) -> None:
    """Add one ``--flag`` per scalar field of ``cls``; unset flags stay None (no override). The help shows
    ``defaults`` (e.g. a recipe's values) over the fields' own."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        helptext = (f.metadata.get("help", "") + f" (default: {default})").strip()
        if base is bool:
            group.add_argument(cli_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=helptext)
        elif base in (int, float, str):
            group.add_argument(cli_flag(f.name), dest=f.name, type=base, default=None, help=helptext)


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def add_instruction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instructions (TinyStories-Instruct prompt)")
    g.add_argument("--words", help="words the story must use, comma-separated: 'frog, jump, shiny'")
    g.add_argument("--features", help=f"comma list from {', '.join(FEATURES)}")
    g.add_argument("--summary", help="what the story is about")
    g.add_argument("--sentence", help="a sentence the story must contain")


def prompt_from_args(args: argparse.Namespace) -> str | None:
    """The instruction prompt the flags ask for, or None when no instruction flag was given."""
    return instruction_header(words=args.words, features=args.features, summary=args.summary,
                              sentence=args.sentence, flag="--")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instruction following (TinyStories-Instruct)")
    g.add_argument("--instruct", metavar="DATA", help="instruct data folder: write a story for each held-out "
                   "record's instructions and report how often they are followed")
    g.add_argument("--records", type=int, default=100, help="first N val records (default: 100)")
    g.add_argument("--instruct-seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--instruct-max-new-tokens", type=int, default=None,
                   help="story length limit (default: min(400, context / 2))")


def add_checkpoint_arg(p: argparse.ArgumentParser, metavar: str = "CKPT") -> None:
    p.add_argument("checkpoint", metavar=metavar,
                   help="a checkpoint folder, or a run folder (then its best/; see resolve_checkpoint)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto = cuda if available)")


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    from tinygemma.quant import INFERENCE_DTYPES  # torch: only for the commands that run a model

    p.add_argument("--dtype", choices=["auto", *INFERENCE_DTYPES], default=default,
                   help="weights: auto = bf16 on CUDA GPUs with native bf16, fp32 elsewhere; bf16 (activations "
                        f"too); int8 = int8 weights, fp32 activations (see docs/generation.md) (default: {default})")


def sampling_config_from_args(args: argparse.Namespace) -> SamplingConfig:
    return from_dict(SamplingConfig, dataclass_overrides(args, SamplingConfig), "sampling")
