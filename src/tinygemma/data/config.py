"""What `prepare` writes and the settings that choose it: the token file format and PrepareConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from tinygemma.config import UserError

FORMAT_VERSION = 1
HUB_REPO = "roneneldan/TinyStories"
DTYPE = "uint16"
SPLITS = {"train": "train.bin", "val": "val.bin"}


@dataclass
class PrepareConfig:
    source: str = field(default=HUB_REPO, metadata={
        "help": "hub dataset id, or a local folder/file (.txt with <|endoftext|> lines, .json/.jsonl, .parquet)"})
    out: str = field(default="data/tinystories", metadata={"help": "output folder"})
    max_stories: int | None = field(default=None, metadata={
        "help": "use only the first N stories of each source split (hub: streamed, not downloaded)"})
    workers: int = field(default=0, metadata={"help": "tokenising processes, this one included; 0 = all cores"})
    fix_text: bool = field(default=True, metadata={"help": "repair mojibake such as 'â€™' -> '’' (ftfy)"})
    v2: bool = field(default=False, metadata={"help": "use the GPT-4-only TinyStoriesV2-GPT4-*.txt data"})
    val_fraction: float = field(default=0.05, metadata={
        "help": "share of stories put in val when the source has a single split"})
    seed: int = field(default=1337, metadata={"help": "seed of that train/val split"})
    force: bool = field(default=False, metadata={
        "help": "redo even when up to date, and overwrite data made with another tokenizer"})

    def __post_init__(self) -> None:
        if self.max_stories is not None and self.max_stories < 1:
            raise UserError(f"max_stories must be >= 1, got {self.max_stories}")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0 (0 = all cores), got {self.workers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass
class InstructOptions:
    """prepare's flags for instruct records (built by tinygemma.instruct, which loads torch only when asked)."""

    instruct: bool = field(default=False, metadata={
        "help": "read TinyStories-Instruct (TinyStories-Instruct-train/valid.txt: records with instructions)"})
    derive_instructions: bool = field(default=False, metadata={
        "help": "make instruct records from plain TinyStories (words, a sentence, features the story shows)"})
    max_record_tokens: int = field(default=2048, metadata={
        "help": "instruct records longer than this are cut from the end (counted as truncated)"})
    headers: bool = field(default=True, metadata={
        "help": "with --derive-instructions: --no-headers leaves the instruction lines out (the same stories in "
                "the same layout: bench/instruct.py's control)"})
    instruct_share: float = field(default=1.0, metadata={
        "help": "the share of records (0 < F <= 1, chosen by a hash of --seed and the story) that keep their "
                "instruction lines; the others get --no-headers' layout (a mix for pre-training)"})

    def __post_init__(self):
        if self.instruct and self.derive_instructions:
            raise UserError("--instruct and --derive-instructions exclude each other")
        if not self.headers and not self.derive_instructions:
            raise UserError("--no-headers goes with --derive-instructions")
        if not 0 < self.instruct_share <= 1:  # NaN too
            raise UserError(f"--instruct-share must be in (0, 1], got {self.instruct_share}")
        if self.instruct_share < 1 and not (self.instruct or self.derive_instructions):
            raise UserError("--instruct-share goes with --instruct or --derive-instructions")
        if self.instruct_share < 1 and not self.headers:
            raise UserError("--instruct-share and --no-headers exclude each other")
        if self.max_record_tokens < 8:
            raise UserError(f"max_record_tokens must be >= 8, got {self.max_record_tokens}")


MASK_DTYPE = "uint8"
