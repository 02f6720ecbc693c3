"""tinygemma: Gemma 3 270M from scratch, pre-trained on TinyStories with the GPT-2 tokenizer."""

__version__ = "0.1.0"
__all__ = ["PRESETS", "Gemma3", "ModelConfig", "load_model_config"]


def __getattr__(name: str):
    # Lazy, so that `tinygemma prepare` and its worker processes never import torch.
    if name in __all__:
        from tinygemma import model

        return getattr(model, name)
    raise AttributeError(f"module 'tinygemma' has no attribute {name!r}")
