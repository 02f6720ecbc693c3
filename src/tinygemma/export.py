"""Make a model folder a complete Hugging Face model: tokenizer, generation config, model card.

``write_hf_files(folder, info)`` adds to a folder written by ``Gemma3.save_pretrained``:

- ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json``: GPT-2's BPE, built
  offline from the same tiktoken ranks the project encodes with, by transformers' own
  ``TikTokenConverter``; ``<|endoftext|>`` (50256) is bos, eos, pad and unk, as in GPT-2.
- ``generation_config.json``: eos/bos/pad 50256 and the project's default sampling settings.
- ``README.md``: a model card (Hugging Face YAML front matter + markdown).

``tinygemma export CKPT OUT`` copies a checkpoint into a clean folder with only these files
plus config.json and model.safetensors (optionally cast to bf16/fp32), for sharing.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygemma.config import UserError, load_json
from tinygemma.device import DTYPES
from tinygemma.files import follow_umask
from tinygemma.hf_folder import write_hf_files
from tinygemma.model import Gemma3
from tinygemma.rundir import replace_dir, resolve_checkpoint


# -- tinygemma export ----------------------------------------------------------------------------
@dataclass
class ExportConfig:
    source: str = ""
    out: str = ""
    dtype: str | None = field(default=None, metadata={
        "help": "hf: bf16 or fp32, None keeps the stored dtype; gguf: f32, f16 or q8_0, None means f16"})
    force: bool = field(default=False, metadata={"help": "replace OUT if it exists and is not empty"})
    format: str = field(default="hf", metadata={"help": "hf (a Hugging Face folder) or gguf (one file for llama.cpp)"})


def export(cfg: ExportConfig) -> Path:
    """Copy checkpoint ``cfg.source`` to ``cfg.out`` with only the Hugging Face files (or, with format gguf,
    write it as one GGUF file: see tinygemma.gguf_export); atomic."""

    if cfg.format not in ("hf", "gguf"):
        raise UserError(f"--format {cfg.format!r}: choose hf or gguf")
    if cfg.format == "gguf":
        from tinygemma.gguf_export import export_gguf  # the gguf package is needed only here

        return export_gguf(cfg.source, cfg.out, cfg.dtype or "f16", force=cfg.force)
    src = resolve_checkpoint(cfg.source)
    out = Path(cfg.out)
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: choose {' or '.join(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise UserError(f"{out}: exists and is not empty (use --force to replace it)")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents or s in o.parents:  # --force would delete the source
        raise UserError(f"{out}: overlaps the checkpoint {src}; choose another folder")

    model = Gemma3.from_pretrained(src)  # checks every tensor against config.json
    stored = load_json(src / "config.json").get("dtype", "float32")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else getattr(torch, str(stored), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"{src / 'config.json'}: unknown dtype {stored!r}; pass --dtype")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        follow_umask(tmp, folder=True)  # mkdtemp makes it 0700
        model.to(dtype).save_pretrained(tmp)
        has_card = (src / "README.md").is_file()
        if has_card:  # the card written during training knows the run (data seen, losses, samples)
            shutil.copyfile(src / "README.md", tmp / "README.md")
        write_hf_files(tmp, {"name": out.resolve().name}, card=not has_card)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
