"""The studio's settings: where it listens and the limits it puts on requests."""


import logging
from dataclasses import dataclass, field

from tinygemma.config import UserError

log = logging.getLogger("tinygemma.serve")  # a child of tinygemma.log's logger: the same handler


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (anything but loopback is "
                                                                "reachable by others: there is no authentication)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)"})
    batch_rows: int = field(default=16, metadata={"help": "rows decoded together, one per prompt x sample of the "
                                                          "running requests (continuous batching)"})
    queue: int = field(default=64, metadata={"help": "requests that may wait for a free row; more get HTTP 429 "
                                                     "(--max-concurrent is its old name)"})
    max_context: int = field(default=1024, metadata={"help": "most tokens a request's prompt and completion span "
                                                             "(the model's context if shorter): each batch row's "
                                                             "KV cache is this long"})
    max_tokens_limit: int = field(default=500, metadata={"help": "largest max_tokens a request may ask for"})
    max_prompt_chars: int = field(default=4000, metadata={"help": "longest prompt accepted, in characters"})
    max_n: int = field(default=4, metadata={"help": "largest n (completions per prompt)"})
    max_rows: int = field(default=16, metadata={"help": "largest prompts x n in one request"})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        for name in ("batch_rows", "max_tokens_limit", "max_prompt_chars", "max_n", "max_rows"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.queue < 0:
            raise UserError(f"queue must be >= 0, got {self.queue}")
        if self.max_context < 2:
            raise UserError(f"max_context must hold a prompt token and a new one (>= 2), got {self.max_context}")

    def context(self, model_context: int) -> int:
        """The tokens a request may span here: the model's context, or less by ``max_context``."""
        return min(model_context, self.max_context)

    def max_tokens_cap(self, context_length: int) -> int:
        """The largest max_tokens this server grants: its limit, and at least one prompt token in context."""
        return min(self.max_tokens_limit, context_length - 1)
