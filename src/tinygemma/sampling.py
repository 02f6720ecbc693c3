"""Sampling settings for decoding, shared by generate, serve, eval and the exported generation config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tinygemma.config import UserError, check_seed


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample at most"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=50, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus: smallest set with this probability mass"})
    greedy: bool = field(default=False, metadata={"help": "always take the most likely token"})
    seed: int | None = field(default=None, metadata={"help": "random seed (reproducible samples)"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # NaN too; inf would sample uniformly
            raise UserError(f"temperature must be >= 0 and finite, got {self.temperature}")
        check_seed(self.seed)
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples <= 0:
            raise UserError(f"num_samples must be positive, got {self.num_samples}")
