"""Writing and reading training checkpoints: weights, optimizer, RNG states, trainer state."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygemma import rundir
from tinygemma.config import UserError
from tinygemma.hf_folder import write_hf_files
from tinygemma.model import Gemma3
from tinygemma.train.optim import Optimizers


# -- checkpoints ----------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(folder: Path, model: Gemma3, optimizer: Optimizers, state: dict[str, Any],
                     run_config: dict[str, Any], card: dict[str, Any] | None = None) -> Path:
    """Write one complete checkpoint folder atomically: everything goes to ``.tmp-NAME`` and is then renamed.

    Contents: a complete Hugging Face model (config.json, model.safetensors, tokenizer files,
    generation_config.json, README.md model card from ``card``) plus optimizer.pt, rng_state.pt,
    trainer_state.json and run_config.json. ``model`` is the plain module (never compiled/DDP-wrapped).
    """
    tmp = rundir.temp_dir(folder)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng_state.pt")
    (tmp / rundir.TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (tmp / rundir.RUN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")
    write_hf_files(tmp, card)
    rundir.replace_dir(tmp, folder)
    return folder


def load_torch(path: Path, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: unreadable or corrupt ({type(e).__name__})") from None
