"""tinygemma: Gemma 3 270M from scratch, pre-trained on TinyStories with the GPT-2 tokenizer."""

import os

# PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when this is set before
# torch's first allocation (it is read once): otherwise every training step page-faults its 412 MB chunk of
# logits in 100,000 pages of 4 KB (measured: a `mini` step 1.15x faster in fp32, 1.25x in bf16). Set it to 0 to
# turn it off; it has no effect once torch has allocated, e.g. when torch is imported before tinygemma.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = ["PRESETS", "Gemma3", "ModelConfig", "load_model_config"]


def __getattr__(name: str):
    # Lazy, so that `tinygemma prepare` and its worker processes never import torch.
    if name in __all__:
        from tinygemma import model

        return getattr(model, name)
    raise AttributeError(f"module 'tinygemma' has no attribute {name!r}")
