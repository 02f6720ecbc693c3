"""Helpers shared by test modules in several folders (import them as ``from tests.helpers import ...``)."""

import hashlib
import time
from pathlib import Path

import torch

from tinygemma import rundir
from tinygemma.cli import main
from tinygemma.model import Gemma3, load_model_config


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != rundir.LOCK}


def one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tiny_model(delay: float = 0.0, fail: bool = False) -> Gemma3:
    """The tiny preset with fixed random weights; ``delay`` seconds per forward pass stands in for a big model."""
    torch.manual_seed(0)
    model = Gemma3(load_model_config("tiny")).eval()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        if fail:
            raise RuntimeError("secret detail /home/someone/model.py")
        time.sleep(delay)
        return forward(*args, **kwargs)

    if delay or fail:
        model.forward = slow_forward
    return model


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` runs (the storages of the
    tensors in ``exclude``, e.g. the parameters, left out). Every saved tensor stays alive until the count is made,
    so no storage address is reused within it."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    total = sum(seen.values())
    del out
    return total
