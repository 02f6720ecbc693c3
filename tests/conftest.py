import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# The suite runs offline: default to the GPT-2 BPE file and the sample beside the checkout.
if (SHARED / "gpt2.tiktoken").exists():
    os.environ.setdefault("TINYGEMMA_GPT2_BPE", str(SHARED / "gpt2.tiktoken"))
if (SHARED / "tinystories").exists():
    os.environ.setdefault("TINYSTORIES_DIR", str(SHARED / "tinystories"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    path = Path(os.environ.get("TINYSTORIES_DIR", SHARED / "tinystories"))
    if not (path / "TinyStories-valid.txt").exists():
        pytest.fail(f"TinyStories sample not found at {path}; set TINYSTORIES_DIR")
    return path


@pytest.fixture(scope="session")
def sample_stories(sample_dir) -> dict[str, list[str]]:
    out = {}
    for split, name in (("train", "TinyStories-train.txt"), ("val", "TinyStories-valid.txt")):
        text = (sample_dir / name).read_text(encoding="utf-8")
        out[split] = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from tinygemma.tokenizer import Tokenizer

    return Tokenizer()
