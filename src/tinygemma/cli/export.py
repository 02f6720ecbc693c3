"""`tinygemma export`: a clean Hugging Face folder or a GGUF file."""

from __future__ import annotations

import argparse

from tinygemma.cli.args import add_checkpoint_arg, add_dataclass_args, dataclass_overrides
from tinygemma.config import from_dict
from tinygemma.export import ExportConfig, export


def _export(args: argparse.Namespace) -> int:
    cfg = from_dict(ExportConfig, {"source": args.checkpoint, "out": args.out,
                                   **dataclass_overrides(args, ExportConfig)}, "export")
    out = export(cfg)
    sizes = sorted((p.name, p.stat().st_size) for p in (out.iterdir() if out.is_dir() else [out]))
    print(f"exported {cfg.source} -> {out}")
    for name, size in sizes:
        print(f"  {name:<26}{size:>14,} bytes")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a checkpoint to a clean Hugging Face model folder (no trainer state)",
                       description="Copy a checkpoint (or a run folder's best/) to OUT with config.json, "
                                   "model.safetensors, tokenizer files, generation_config.json and a model card; "
                                   "optimizer and trainer state stay behind. With --format gguf, OUT is one "
                                   ".gguf file for llama.cpp and ollama.")
    add_checkpoint_arg(p)
    p.add_argument("out", metavar="OUT", help="folder to create (a .gguf file with --format gguf)")
    add_dataclass_args(p, ExportConfig, skip=("source", "out"))
    p.set_defaults(func=_export)
