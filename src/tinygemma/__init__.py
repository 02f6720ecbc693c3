"""tinygemma: Gemma 3 270M from scratch, pre-trained on TinyStories with the GPT-2 tokenizer."""

from tinygemma.model import PRESETS, Gemma3, ModelConfig, load_model_config

__all__ = ["PRESETS", "Gemma3", "ModelConfig", "load_model_config"]
__version__ = "0.1.0"
