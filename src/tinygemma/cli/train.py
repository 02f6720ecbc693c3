"""`tinygemma train` and `tinygemma finetune`."""

from __future__ import annotations

import argparse

from tinygemma.cli.args import add_dataclass_args, dataclass_overrides
from tinygemma.train.config import TrainConfig, load_recipe, parse_sets


# -- command line ---------------------------------------------------------------------------------------
def _common_args(p: argparse.ArgumentParser, recipe: str) -> None:
    p.add_argument("--resume", default=None, metavar="auto|CKPT", help="continue the latest checkpoint in --out "
                                                                        "(auto) or a given checkpoint folder")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable), e.g. --set lr=3e-4")
    # the help shows the values a new run gets: the default recipe's
    add_dataclass_args(p, TrainConfig, skip=("finetune_from",), defaults=load_recipe(recipe))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pre-train a model on prepared data",
                              description="Pre-train a Gemma 3 preset; flags override the recipe, --set KEY=VALUE "
                                          "sets any TrainConfig field.")
    p.add_argument("--recipe", default=None, help="default (= muon) | muon | adamw | tutorial | instruct (on "
                                                  "instruct records) | a JSON file (default: default)")
    _common_args(p, "default")
    p.set_defaults(func=_train)
    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint on instruct records (masked loss)",
                              description="Continue a pre-trained checkpoint on TinyStories-Instruct records made by "
                                          "`tinygemma prepare --instruct` or `--derive-instructions`: one record per "
                                          "sequence, the loss on the story and its final <|endoftext|> only. The "
                                          "same run folder, resume, signals and metrics as train.")
    p.add_argument("checkpoint", metavar="CKPT", help="the pre-trained checkpoint (or run folder: its best/)")
    p.add_argument("--recipe", default=None, help="finetune | a JSON file (default: finetune)")
    _common_args(p, "finetune")
    p.set_defaults(func=_finetune)


def _train(args: argparse.Namespace) -> int:
    from tinygemma.eval.samples import write_samples  # torch: only when a run starts, not for --help
    from tinygemma.train.trainer import train

    overrides = {**dataclass_overrides(args, TrainConfig), **parse_sets(args.sets)}
    train(overrides, recipe=args.recipe, resume=args.resume, force=args.force, write_samples=write_samples)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from tinygemma.eval.samples import write_samples  # torch: only when a run starts, not for --help
    from tinygemma.train.trainer import finetune

    overrides = {**dataclass_overrides(args, TrainConfig), **parse_sets(args.sets)}
    finetune(args.checkpoint, overrides, recipe=args.recipe, resume=args.resume, force=args.force,
             write_samples=write_samples)
    return 0
