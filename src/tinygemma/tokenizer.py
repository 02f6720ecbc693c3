"""GPT-2 BPE through tiktoken, loadable offline from a local ranks file.

The model's vocabulary is GPT-2's 50,257 tokens; ``<|endoftext|>`` (50256) ends every story.
With ``TINYGEMMA_GPT2_BPE`` pointing at a tiktoken-format ranks file (``gpt2.tiktoken``),
the file is read and checked against the sha256 tiktoken itself expects for r50k_base
(GPT-2's encoding). Without it, tiktoken downloads and caches its own copy.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from tinygemma.config import UserError

ENV_BPE = "TINYGEMMA_GPT2_BPE"
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
NAME = "gpt2"


def _ranks_from_file(path: Path) -> dict[bytes, int]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read GPT-2 BPE file ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_BPE_SHA256:
        raise UserError(f"{path}: sha256 {digest[:12]}… is not GPT-2's BPE ranks ({GPT2_BPE_SHA256[:12]}…)")
    # a2b_base64 is what b64decode calls, without its per-call checks (this runs before any worker starts)
    return {binascii.a2b_base64(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}


@functools.lru_cache(maxsize=4)
def get_encoding(bpe_path: str | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding, from ``bpe_path`` / ``$TINYGEMMA_GPT2_BPE`` or tiktoken's cache."""
    bpe_path = bpe_path or os.environ.get(ENV_BPE)
    if bpe_path:
        ranks = _ranks_from_file(Path(bpe_path))
        return tiktoken.Encoding(name=NAME, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)
    try:
        return tiktoken.get_encoding("r50k_base")  # GPT-2's ranks in tiktoken's own file format
    except Exception as e:  # network errors come from requests/urllib3 and vary by version
        raise UserError(f"cannot load the GPT-2 BPE from tiktoken ({type(e).__name__}); offline, set "
                        f"{ENV_BPE} to a gpt2.tiktoken ranks file") from None


class Tokenizer:
    """Encode stories to GPT-2 ids and back; ordinary text never produces special tokens."""

    eot_id = EOT_ID
    vocab_size = VOCAB_SIZE
    name = NAME
    bpe_sha256 = GPT2_BPE_SHA256

    def __init__(self, bpe_path: str | None = None):
        self.bpe_path = bpe_path
        self.enc = get_encoding(bpe_path)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes, for streaming: a token may end in the middle of a UTF-8 character."""
        return self.enc.decode_bytes(ids)

    def __reduce__(self):  # worker processes rebuild the encoding from the same file
        return (Tokenizer, (self.bpe_path,))
