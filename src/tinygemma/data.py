"""TinyStories -> GPT-2 token memmaps (``train.bin``, ``val.bin``, ``meta.json``), and the reader.

``prepare`` streams stories from the hub (through ``datasets`` / ``huggingface_hub``) or from local
files in any of the dataset's published forms, normalises them (strip, drop empty, repair mojibake),
tokenises them in ``--workers`` processes (this one included) with tiktoken's ordinary encoding and
writes the ids in order, each story followed by ``<|endoftext|>`` (50256) so the model learns where
stories end. Memory stays flat: at most ``4 x workers`` tasks of about 1 MB of text are in flight.

Everything is written to ``*.tmp`` files in the output folder and renamed at the end, ``meta.json``
last (the old one is removed before the ``.bin`` files are replaced), so an interrupted run never
leaves files that ``TokenDataset`` accepts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tinygemma.config import UserError, add_dataclass_args, cli_flag, dataclass_overrides, from_dict
from tinygemma.tokenizer import EOT_TOKEN, Tokenizer

FORMAT_VERSION = 1
DTYPE = "uint16"
SPLITS = {"train": "train.bin", "val": "val.bin"}
HUB_REPO = "roneneldan/TinyStories"
HUB_SPLITS = {"train": "train", "val": "validation"}
TXT_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
TXT_FILES_V2 = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
TEXT_FIELDS = ("text", "story")  # the hub's Parquet has "text"; the original JSON archive has "story"
SEPARATOR = EOT_TOKEN.encode()
BATCH_BYTES = 1 << 20  # text per task: large enough to amortise pickling, small enough to keep memory flat
MAX_STORY_BYTES = 64 << 20  # a "story" this long means the file is not in the separator format
READ_BYTES = 1 << 20


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


# ---------------------------------------------------------------------------------------------
# Text normalisation


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

    def __post_init__(self):
        if self.instruct and self.derive_instructions:
            raise UserError("--instruct and --derive-instructions exclude each other")
        if not self.headers and not self.derive_instructions:
            raise UserError("--no-headers goes with --derive-instructions")
        if self.max_record_tokens < 8:
            raise UserError(f"max_record_tokens must be >= 8, got {self.max_record_tokens}")


def _continuation_chars() -> str:
    """What bytes 0x80-0xBF (UTF-8 continuation bytes) look like after a wrong cp1252/latin-1 decode."""
    out = []
    for b in range(0x80, 0xC0):
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:  # undefined in cp1252 (0x81, 0x8D, 0x8F, 0x90, 0x9D): latin-1 C1 control
            out.append(chr(b))
    return "".join(out)


# "”" is E2 80 9D; 0x9D is undefined in cp1252, so TinyStories' mojibake lost it and left a bare "â€".
# ftfy cannot restore a lost byte (it guesses "†" when a space follows), so this one is fixed first.
_BARE_RDQUO = re.compile("â€(?![" + re.escape(_continuation_chars()) + "])")
# UTF-8 read as cp1252/latin-1 always shows a lead byte (0xC2-0xF4 -> "Â".."ô") before a continuation
# byte; text without that pair is left alone without calling ftfy (which costs ~1 ms per story).
_MOJIBAKE_HINT = re.compile("[\u00c2-\u00f4][" + re.escape(_continuation_chars()) + "]")
_FTFY_CONFIG: Any = None


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 read as cp1252/latin-1 (``â€™`` -> ``’``) and nothing else.

    ftfy's defaults also straighten curly quotes, NFC-normalise, widen/narrow characters and
    rewrite line breaks; those change legitimate text, so only its encoding fixes are enabled.
    """
    global _FTFY_CONFIG
    if text.isascii() or not _MOJIBAKE_HINT.search(text):
        return text
    import ftfy

    if _FTFY_CONFIG is None:
        _FTFY_CONFIG = ftfy.TextFixerConfig(
            unescape_html=False, remove_terminal_escapes=False, fix_encoding=True, restore_byte_a0=False,
            replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
            fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
            fix_surrogates=False, remove_control_chars=False, normalization=None, explain=False)
    return ftfy.fix_text(_BARE_RDQUO.sub("”", text), _FTFY_CONFIG)


# ---------------------------------------------------------------------------------------------
# Worker side: one task = about 1 MB of stories -> token ids


@dataclass
class _Task:
    name: str  # the file or dataset, for error messages
    items: bytes | list[str]  # bytes: a piece of a .txt file, whole stories (decoded and split in the worker)
    offset: int  # byte offset of that piece in the file
    nbytes: int  # input bytes this task covers, for the progress bar
    split_val: bool  # True: assign each story to train/val with the seeded hash


@dataclass
class _Result:
    tokens: np.ndarray  # all stories of the task in order, each followed by EOT
    lengths: np.ndarray  # tokens per story (EOT included)
    is_val: np.ndarray | None  # per story, when the task is split
    repaired: np.ndarray  # per story: its mojibake was repaired
    nbytes: int
    error: str | None = None

    @property
    def changed(self) -> int:
        return int(self.repaired.sum())

    def head(self, n: int) -> _Result:
        """The first ``n`` stories (for --max-stories)."""
        return dataclasses.replace(self, tokens=self.tokens[: int(self.lengths[:n].sum())], lengths=self.lengths[:n],
                                   is_val=None if self.is_val is None else self.is_val[:n], repaired=self.repaired[:n])

    def select(self, val: bool) -> _Result:
        """One side of a seeded train/val split: the val stories, or the train ones."""
        keep = self.is_val if val else ~self.is_val
        return dataclasses.replace(self, tokens=self.tokens[np.repeat(keep, self.lengths)],
                                   lengths=self.lengths[keep], is_val=None, repaired=self.repaired[keep])


_WORKER: dict[str, Any] = {}


def _init_worker(tok: Tokenizer, fix_text: bool, val_fraction: float, seed: int, ignore_sigint: bool) -> None:
    if ignore_sigint:  # Ctrl-C goes to the main process, which stops the pool and cleans up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(tok=tok, fix_text=fix_text, threshold=int(val_fraction * 2**64),
                   key=seed.to_bytes(8, "little", signed=True))


def _is_val(text: str) -> bool:
    """Seeded hash of the story's text: independent of order, batching and workers; duplicates stay together."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=_WORKER["key"]).digest()
    return int.from_bytes(h, "little") < _WORKER["threshold"]


def _task_texts(task: _Task) -> tuple[list[str], list[bool]]:
    """The task's stories (records), stripped, empty ones dropped, mojibake repaired if asked; and, per
    story, whether it was repaired. Raises UnicodeDecodeError for a .txt piece that is not UTF-8."""
    items = task.items
    if isinstance(items, bytes):
        items = items.decode("utf-8").split(EOT_TOKEN)
    texts, repaired = [], []
    for item in items:
        text = item.strip()
        if not text:
            continue
        fixed = repair_mojibake(text) if _WORKER["fix_text"] else text
        texts.append(fixed)
        repaired.append(fixed != text)
    return texts, repaired


def _failed(task: _Task, e: UnicodeDecodeError) -> _Result:
    return _Result(np.empty(0, DTYPE), np.empty(0, np.int64), None, np.empty(0, bool), 0,
                   f"{task.name}: invalid UTF-8 at byte {task.offset + e.start} ({e.reason})")


def _encode_task(task: _Task) -> _Result:
    tok: Tokenizer = _WORKER["tok"]
    try:
        texts, repaired = _task_texts(task)
    except UnicodeDecodeError as e:
        return _failed(task, e)
    # encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary, minus the Python
    # list per story: the ids stay in tiktoken's buffer and are joined as bytes (~25% less CPU per token).
    # Not encode_ordinary_batch: with one thread its ThreadPoolExecutor makes it ~2x slower than a loop;
    # the parallelism comes from the worker processes.
    encode = tok.enc.encode_to_numpy
    ids = [encode(t, disallowed_special=()) for t in texts]
    eot = np.array([tok.eot_id], dtype=np.uint32).tobytes()
    joined = b"".join([part for story in ids for part in (story, eot)])
    tokens = np.frombuffer(joined, dtype=np.uint32).astype(DTYPE)
    lengths = np.fromiter((len(s) + 1 for s in ids), dtype=np.int64, count=len(ids))
    is_val = np.fromiter((_is_val(t) for t in texts), dtype=bool, count=len(texts)) if task.split_val else None
    return _Result(tokens, lengths, is_val, np.array(repaired, dtype=bool), task.nbytes)


# ---------------------------------------------------------------------------------------------
# Readers: each yields _Tasks for one source split, streaming


@dataclass
class _Input:
    name: str
    split: str  # "train", "val" or "split" (seeded train/val split of a single source)
    tasks: Callable[[], Iterator[_Task]]
    size: int | None  # bytes, when known (progress bar total)
    fingerprint: dict


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _txt_tasks(f: BinaryIO, name: str, split_val: bool) -> Iterator[_Task]:
    """Stories separated by ``<|endoftext|>``: about BATCH_BYTES of the file per task, cut just after a
    separator. The workers decode and split the chunk, so the main process only reads and looks for one
    separator per task (the separator is ASCII, so a cut never splits a character)."""
    buf, start, seen_sep = b"", 0, False  # buf: bytes not yet sent, from file offset `start`
    searched = 0  # buf[:searched] holds no separator
    while True:
        chunk = f.read(READ_BYTES)
        buf += chunk
        if chunk and len(buf) < BATCH_BYTES:
            continue
        if not chunk:  # end of file: the rest is the last story
            if not seen_sep and SEPARATOR not in buf:
                raise UserError(f"{name}: no {EOT_TOKEN} separator "
                                f"(expected stories separated by lines {EOT_TOKEN})")
            if buf:
                yield _Task(name, buf, start, len(buf), split_val)
            return
        cut = buf.rfind(SEPARATOR, searched)
        if cut < 0:  # buf is all one story so far
            searched = max(0, len(buf) - len(SEPARATOR) + 1)
            if len(buf) > MAX_STORY_BYTES:
                what = "a story with no" if seen_sep else "no"
                raise UserError(f"{name}: {what} {EOT_TOKEN} separator within {MAX_STORY_BYTES:,} bytes "
                                f"from byte {start}; not the TinyStories .txt format")
            continue
        seen_sep, end = True, cut + len(SEPARATOR)
        yield _Task(name, buf[:end], start, end, split_val)
        buf, start, searched = buf[end:], start + end, 0


def _record_text(record: Any, name: str, where: str) -> str:
    if isinstance(record, dict):
        for key in TEXT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
        keys = ", ".join(map(str, record)) or "none"
        raise UserError(f"{name}: {where} has no 'text' or 'story' string field (keys: {keys})")
    raise UserError(f"{name}: {where} is a JSON {type(record).__name__}, expected an object with a 'text' field")


def _text_column(columns: list[str], name: str) -> str:
    """The story column of a table (Parquet file or hub dataset)."""
    column = next((c for c in TEXT_FIELDS if c in columns), None)
    if column is None:
        raise UserError(f"{name}: no 'text' or 'story' column (columns: {', '.join(columns) or 'none'})")
    return column


def _text_batches(records: Iterator[str], name: str, split_val: bool,
                  sized: Callable[[str], int] = len) -> Iterator[_Task]:
    items: list[str] = []
    size = 0
    for text in records:
        items.append(text)
        size += sized(text)
        if size >= BATCH_BYTES:
            yield _Task(name, items, 0, size, split_val)
            items, size = [], 0
    if items:
        yield _Task(name, items, 0, size, split_val)


def _jsonl_records(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: invalid UTF-8 at byte {start + e.start} ({e.reason})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
            yield _record_text(record, str(path), f"line {lineno}")


def _json_records(path: Path) -> Iterator[str]:
    """A JSON array (the original data*.json archive files): loaded one file at a time, else JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(path)
        return
    data = path.read_bytes()
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    del data
    for i, record in enumerate(records):
        yield _record_text(record, str(path), f"record {i}")


def _parquet_records(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        column = _text_column(pf.schema_arrow.names, str(path))
        for batch in pf.iter_batches(batch_size=1024, columns=[column]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None


def _file_input(path: Path, split: str) -> _Input:
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    suffix = path.suffix.lower()
    split_val = split == "split"
    if suffix == ".parquet":
        def tasks() -> Iterator[_Task]:
            yield from _text_batches(_parquet_records(path), str(path), split_val)
        size = None
    elif suffix in (".json", ".jsonl"):
        reader = _jsonl_records if suffix == ".jsonl" else _json_records

        def tasks() -> Iterator[_Task]:
            yield from _text_batches(reader(path), str(path), split_val, lambda t: len(t.encode()))
        size = path.stat().st_size
    else:
        def tasks() -> Iterator[_Task]:
            with open(path, "rb") as f:
                yield from _txt_tasks(f, str(path), split_val)
        size = path.stat().st_size
    return _Input(str(path), split, tasks, size, _file_fingerprint(path))


def _split_of(filename: str) -> str | None:
    stem = filename.lower()
    if stem.startswith("train") or "-train" in stem or "_train" in stem:
        return "train"
    if any(stem.startswith(p) or f"-{p}" in stem or f"_{p}" in stem for p in ("valid", "val")):
        return "val"
    return None


def _hub_inputs(source: str, cfg: PrepareConfig, local: bool) -> list[_Input]:
    """The hub dataset through ``datasets``; a local folder in the hub's layout goes through the same code."""
    import datasets

    streaming = local or cfg.max_stories is not None
    try:
        dsd = datasets.load_dataset(source, streaming=streaming)
    except Exception as e:  # offline, unknown repo, bad files: datasets raises many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "" if local else f"; and no local folder ./{source} exists (offline? pass --source FOLDER)"
        raise UserError(f"{source}: cannot load the dataset ({msg}){hint}") from None
    splits = {ours: hf for ours, hf in HUB_SPLITS.items() if hf in dsd}
    if "train" not in splits:
        raise UserError(f"{source}: no 'train' split (have {', '.join(dsd) or 'none'})")
    single = "val" not in splits
    if single and local:  # like a folder with a train file but no valid file
        raise UserError(f"{source}: has a train split but no validation split; refusing to guess. Add "
                        f"data/validation-*.parquet, or pass --source with one Parquet file to split it "
                        f"({cfg.val_fraction:.0%} val, seed {cfg.seed})")
    if single:
        print(f"{source}: no validation split; {cfg.val_fraction:.0%} of train goes to val (seed {cfg.seed})",
              file=sys.stderr)
    inputs = []
    for ours, hf in splits.items():
        ds = dsd[hf]

        def tasks(ds=ds, name=f"{source} [{hf}]") -> Iterator[_Task]:
            def records() -> Iterator[str]:
                column = None
                for batch in ds.iter(batch_size=1000):
                    column = column or _text_column(list(batch), name)
                    yield from (text for text in batch[column] if text is not None)
            yield from _text_batches(records(), name, single)

        fp = {"dataset": source} if not local else {"dataset": str(Path(source).resolve()), "files": [
            _file_fingerprint(p) for p in sorted(Path(source).rglob("*.parquet"))]}
        inputs.append(_Input(f"{source} [{hf}]", "split" if single else ours, tasks, None, fp))
    return inputs


def _hub_txt_inputs(cfg: PrepareConfig, files: dict[str, str] = TXT_FILES_V2) -> list[_Input]:
    """``.txt`` files of the hub dataset (TinyStoriesV2-GPT4-*.txt by default): streamed over HTTP when
    --max-stories, else downloaded (cached)."""
    import huggingface_hub as hf

    inputs = []
    for split, filename in files.items():
        name = f"{cfg.source}/{filename}"
        if cfg.max_stories is not None:
            def tasks(filename=filename, name=name) -> Iterator[_Task]:
                try:
                    f = hf.HfFileSystem().open(f"datasets/{cfg.source}/{filename}", "rb")
                except Exception as e:
                    raise UserError(f"{name}: cannot open on the hub ({type(e).__name__}: {e})") from None
                with f:
                    yield from _txt_tasks(f, name, False)
            inputs.append(_Input(name, split, tasks, None, {"dataset": cfg.source, "file": filename}))
            continue
        try:
            path = Path(hf.hf_hub_download(cfg.source, filename, repo_type="dataset"))
        except Exception as e:
            raise UserError(f"{name}: cannot download ({type(e).__name__}); and no local folder ./{cfg.source} "
                            "exists (offline? pass --source FOLDER)") from None
        inputs.append(_file_input(path, split))
    return inputs


def _resolve(cfg: PrepareConfig) -> list[_Input]:
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return [_file_input(path, "split")]
    if path.is_dir():
        return _folder_inputs(path, cfg)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.source) and not cfg.source.startswith("."):
        return _hub_txt_inputs(cfg) if cfg.v2 else _hub_inputs(cfg.source, cfg, local=False)
    raise UserError(f"{cfg.source}: no such file or folder")


def _folder_inputs(path: Path, cfg: PrepareConfig) -> list[_Input]:
    variants = [TXT_FILES_V2] if cfg.v2 else [TXT_FILES, TXT_FILES_V2]
    for names in variants:
        found = {split: path / n for split, n in names.items() if (path / n).is_file()}
        if len(found) == 2:
            return [_file_input(p, split) for split, p in found.items()]
        if len(found) == 1:
            (have, p), = found.items()
            missing = names["val" if have == "train" else "train"]
            raise UserError(f"{path}: has {p.name} but no {missing}; refusing to guess. Add it, or pass "
                            f"--source {p} to split that file ({cfg.val_fraction:.0%} val, seed {cfg.seed})")
    if (path / "data").is_dir() and any((path / "data").glob("*.parquet")):
        return _hub_inputs(str(path), cfg, local=True)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".parquet", ".json", ".jsonl"))
    by_split = collections.defaultdict(list)
    for p in files:
        if (split := _split_of(p.name)) is not None:
            by_split[split].append(p)
    if not by_split:
        raise UserError(f"{path}: no TinyStories files ({TXT_FILES['train']}/{TXT_FILES['val']}, "
                        f"data/*.parquet, or train/valid .parquet/.json/.jsonl files)")
    if len(by_split) == 1:
        (have, ps), = by_split.items()
        raise UserError(f"{path}: has {have} files ({ps[0].name}) but no {'valid' if have == 'train' else 'train'} "
                        f"files; refusing to guess. Pass --source with one file to split it "
                        f"({cfg.val_fraction:.0%} val, seed {cfg.seed})")
    return [_file_input(p, split) for split in ("train", "val") for p in by_split[split]]


# ---------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _SplitWriter:
    """Appends token ids to ``NAME.tmp``, hashing as it goes."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = self.stories = 0

    def write(self, tokens: np.ndarray, stories: int) -> None:
        data = tokens.tobytes()
        try:
            self.f.write(data)
        except OSError as e:  # name the file: write errors on file objects carry no filename
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None
        self.sha.update(data)
        self.tokens += len(tokens)
        self.stories += stories

    def add(self, res: _Result) -> None:
        self.write(res.tokens, len(res.lengths))

    def info(self) -> dict:
        """This split's entry in meta.json."""
        return {"file": self.path.name, "stories": self.stories, "tokens": self.tokens, "sha256": self.sha.hexdigest()}

    def summary(self) -> str:
        return f"{self.stories:,} stories {self.tokens:,} tokens ({self.tokens / self.stories:.1f}/story)"

    def empty_reason(self) -> str:
        return ""

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def finish(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None
        self.f.close()

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _options(cfg: PrepareConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("max_stories", "fix_text", "v2", "val_fraction", "seed")}


def _tokenizer_info(tok: Tokenizer) -> dict:
    return {"tokenizer": tok.name, "bpe_sha256": tok.bpe_sha256, "vocab_size": tok.vocab_size}


def _check_out(out: Path, cfg: PrepareConfig, tok: Tokenizer, fingerprint: dict) -> dict | None:
    """The existing meta.json when it already holds this exact data; refuse another tokenizer's data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path is a file, not a folder")
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        made_with = {k: meta[k] for k in ("tokenizer", "bpe_sha256", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError):
        if cfg.force:
            return None
        raise UserError(f"{meta_path}: not a tinygemma meta.json; refusing to overwrite without --force") from None
    if made_with != _tokenizer_info(tok):
        if cfg.force:
            return None
        raise UserError(f"{meta_path}: data made with tokenizer {made_with['tokenizer']!r} "
                        f"({str(made_with['bpe_sha256'])[:12]}…), not GPT-2's; use --force to overwrite")
    if cfg.force or meta.get("fingerprint") != fingerprint:
        return None
    for info in meta.get("splits", {}).values():
        p = out / info["file"]
        if not p.is_file() or p.stat().st_size != info["tokens"] * np.dtype(DTYPE).itemsize:
            return None
    return meta


def _num_workers(n: int) -> int:
    """``--workers``, 0 meaning every core; far more than the cores (each a process holding the tokenizer)
    gains nothing and may exhaust memory, so it is capped at 4 per core, with a warning."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if n > 4 * cores:
        print(f"tinygemma prepare: warning: --workers {n} is far above the {cores} cores; using {4 * cores}",
              file=sys.stderr)
        return 4 * cores
    return n or cores


@dataclass(frozen=True)
class Layout:
    """What ``prepare`` makes of the source: plain story streams (``PLAIN``), or instruct records with a loss
    mask (``tinygemma.instruct``): how inputs are found, how a task is encoded, how a split is written."""

    inputs: Callable[[PrepareConfig], list[_Input]] = _resolve
    encode: Callable[[_Task], _Result] = _encode_task
    writer: Callable[[Path], _SplitWriter] = _SplitWriter
    unit: str = "stories"
    meta: dict = field(default_factory=dict)  # extra meta.json fields (fingerprinted too)


PLAIN = Layout()


def prepare(cfg: PrepareConfig, command: str | None = None, layout: Layout = PLAIN) -> dict:
    """Tokenise ``cfg.source`` into ``cfg.out`` (train.bin, val.bin, meta.json); returns the meta dict.

    ``command`` is the command line recorded in meta.json (the CLI passes it).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    tok = Tokenizer()
    inputs = layout.inputs(cfg)
    fingerprint = {"format_version": FORMAT_VERSION, **_tokenizer_info(tok), "source": cfg.source,
                   "inputs": [i.fingerprint | {"split": i.split} for i in inputs], "options": _options(cfg),
                   **layout.meta}
    if (meta := _check_out(out, cfg, tok, fingerprint)) is not None:
        print(f"{out}: up to date (same source, options and tokenizer); nothing to do (use --force to redo)",
              file=sys.stderr)
        return meta
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None
    for name in (*SPLITS.values(), "meta.json"):  # our own temp files, left by a killed run (only ours)
        (out / f"{name}.tmp").unlink(missing_ok=True)
    workers = _num_workers(cfg.workers)
    try:
        writers = {split: layout.writer(out / name) for split, name in SPLITS.items()}
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror})") from None
    try:
        changed, nbytes = _run(inputs, writers, cfg, tok, workers, layout.encode)
        for split, w in writers.items():
            if w.stories == 0:
                why = f" (too few {layout.unit} for val_fraction?)" if split == "val" else ""
                raise UserError(f"{', '.join(i.name for i in inputs)}: no {split} {layout.unit}{why}"
                                f"{w.empty_reason()}")
            w.finish()
        meta = {
            **layout.meta, "format_version": FORMAT_VERSION, **_tokenizer_info(tok), "eot_id": tok.eot_id,
            "dtype": DTYPE,
            "source": cfg.source, "inputs": [i.name for i in inputs],
            "normalisation": {"strip": True, "drop_empty": True, "fix_text": cfg.fix_text,
                              "fix_text_method": "ftfy encoding fixes only (+ bare 'â€' -> '”')" if cfg.fix_text
                              else None, "stories_changed": changed},
            "split": ({"method": "blake2b(story, key=seed) < val_fraction", "val_fraction": cfg.val_fraction,
                       "seed": cfg.seed} if any(i.split == "split" for i in inputs) else "source splits"),
            "max_stories": cfg.max_stories,
            "splits": {split: w.info() for split, w in writers.items()},
            "command": command,
            "config": asdict(cfg), "fingerprint": fingerprint,
        }
        tmp_meta = out / "meta.json.tmp"
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _discard(writers, out, created)
        name = e.filename or out
        if e.filename is None or str(name).endswith(".tmp"):
            raise UserError(f"{name}: write failed ({e.strerror or e}); the existing data was left as it was") from None
        raise UserError(f"{name}: cannot read ({e.strerror or e})") from None
    except BaseException:
        _discard(writers, out, created)
        raise
    # Everything is on disk. Drop the old meta.json first so a kill between the renames leaves no valid set.
    (out / "meta.json").unlink(missing_ok=True)
    for w in writers.values():
        w.commit()
    os.replace(tmp_meta, out / "meta.json")
    _fsync_dir(out)
    secs = time.perf_counter() - t0
    parts = [f"{s} {w.summary()}" for s, w in writers.items()]
    print(f"prepared {out}: {'; '.join(parts)}; {changed:,} {layout.unit} repaired; {secs:.1f}s "
          f"({nbytes / 1e6 / secs:.1f} MB/s, {sum(w.tokens for w in writers.values()) / secs:,.0f} tokens/s, "
          f"{workers} workers)", file=sys.stderr)
    return meta


def _discard(writers: dict[str, _SplitWriter], out: Path, created: bool) -> None:
    for w in writers.values():
        w.discard()
    (out / "meta.json.tmp").unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:  # not empty: someone else put files there meanwhile
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Written:
    """What _run has written so far: stories kept per input (for --max-stories), stories repaired, bytes read."""

    inputs: list[_Input]
    writers: dict[str, _SplitWriter]
    max_stories: int | None
    bar: Any  # tqdm
    taken: list[int] = field(init=False)  # stories kept per input
    changed: int = 0
    nbytes: int = 0

    def __post_init__(self):
        self.taken = [0] * len(self.inputs)

    def tasks(self) -> Iterator[tuple[int, _Task]]:
        """One stream over all inputs, so the workers do not drain and refill between train and val."""
        for k, inp in enumerate(self.inputs):
            for task in inp.tasks():
                if self.max_stories is not None and self.taken[k] >= self.max_stories:
                    break  # stop reading (or streaming from the hub) an input that has enough
                yield k, task

    def write(self, k: int, res: _Result) -> None:
        limit = None if self.max_stories is None else self.max_stories - self.taken[k]
        if limit is not None and limit <= 0:
            return  # in flight when its input reached --max-stories
        if res.error:
            raise UserError(res.error)
        if limit is not None and len(res.lengths) >= limit:  # at the limit too: it drops what follows the last
            res = res.head(limit)  # kept story (malformed instruct records, which were never read)
        self.taken[k] += len(res.lengths)
        if res.is_val is not None:
            self.writers["train"].add(res.select(val=False))
            self.writers["val"].add(res.select(val=True))
        else:
            self.writers[self.inputs[k].split].add(res)
        self.changed += res.changed
        self.nbytes += res.nbytes
        self.bar.update(res.nbytes)
        stories, tokens = (sum(getattr(w, a) for w in self.writers.values()) for a in ("stories", "tokens"))
        self.bar.set_postfix_str(f"{stories:,} stories, {tokens:,} tokens", refresh=False)


def _start_workers(cfg: PrepareConfig, tok: Tokenizer, workers: int) -> mp.pool.Pool | None:
    """The pool of ``workers - 1`` processes (None for one worker), and this process made a worker too."""
    init = (tok, cfg.fix_text, cfg.val_fraction, cfg.seed)
    pool = None
    if workers > 1:
        # fork (Linux): workers start at once with the tokenizer loaded; spawn would re-import torch in each.
        # Elsewhere fork is unsafe with some system libraries, so the platform default is kept.
        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
        pool = ctx.Pool(workers - 1, initializer=_init_worker, initargs=(*init, True))
    _init_worker(*init, False)  # after the fork: the pool's workers ignore SIGINT, this process does not
    return pool


def _ready(job: _Result | mp.pool.AsyncResult) -> bool:
    return isinstance(job, _Result) or job.ready()


def _run(inputs: list[_Input], writers: dict[str, _SplitWriter], cfg: PrepareConfig, tok: Tokenizer,
         workers: int, encode: Callable[[_Task], _Result] = _encode_task) -> tuple[int, int]:
    """Tokenise the tasks in ``workers`` processes and write the results in order; returns (stories
    repaired, bytes read).

    This process is one of them: it keeps the pool (``workers - 1`` processes) fed with two tasks per
    worker and encodes the next task itself whenever it would otherwise wait, so that with one worker
    per core no core is left to a process that only dispatches; the split of the work adapts to how
    much time reading and writing leave it."""
    from tqdm import tqdm

    pool = _start_workers(cfg, tok, workers)
    total = None if any(i.size is None for i in inputs) else sum(i.size for i in inputs)
    out = _Written(inputs, writers, cfg.max_stories, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                                                          desc="prepare", dynamic_ncols=True, mininterval=0.5))
    tasks = out.tasks()
    pending: collections.deque = collections.deque()  # (input, _Result or the pool's AsyncResult), in order
    try:
        item = next(tasks, None)
        while item is not None or pending:
            in_pool = sum(1 for _, job in pending if not _ready(job))
            while pool and item is not None and len(pending) < 4 * workers and in_pool < 2 * (workers - 1):
                pending.append((item[0], pool.apply_async(encode, (item[1],))))
                item, in_pool = next(tasks, None), in_pool + 1
            if pending and _ready(pending[0][1]):
                k, job = pending.popleft()
                out.write(k, job if isinstance(job, _Result) else job.get())
            elif item is not None and len(pending) < 4 * workers:
                pending.append((item[0], encode(item[1])))  # rather than wait: this process's share
                item = next(tasks, None)
            else:
                k, job = pending.popleft()
                out.write(k, job.get())
    finally:
        out.bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return out.changed, out.nbytes


# ---------------------------------------------------------------------------------------------
# Checking and reading


def verify(directory: str | os.PathLike) -> dict:
    """Recompute the sha256 of each split's file and compare with meta.json; returns the meta dict."""
    ds = TokenDataset(directory, "train")  # checks format, tokenizer and sizes
    for split, info in ds.meta["splits"].items():
        path = ds.dir / info["file"]
        if not path.is_file():
            raise UserError(f"{path}: missing")
        digest = _sha256(path)
        if digest != info["sha256"]:
            raise UserError(f"{path}: sha256 {digest[:12]}… does not match meta.json ({info['sha256'][:12]}…)")
        TokenDataset(directory, split)
        print(f"{path}: OK ({info['stories']:,} stories, {info['tokens']:,} tokens)")
    return ds.meta


class TokenDataset:
    """One split of prepared data, memory-mapped; checks meta.json before trusting the bytes."""

    format: str | None = None  # meta.json's "format": absent for plain story streams

    def _wrong_format(self) -> UserError:
        return UserError(f"{self.dir}: instruct data (records with a loss mask), not plain token data; "
                         "fine-tune on it with `tinygemma finetune`")

    def __init__(self, directory: str | os.PathLike, split: str = "train", vocab_size: int | None = None):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path}: missing (run `tinygemma prepare` first)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path}: not valid JSON") from None
        m = self.meta
        if m.get("format") != self.format:  # e.g. instruct records: their loss mask must not be ignored
            raise self._wrong_format()
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{meta_path}: format version {m.get('format_version')}, expected {FORMAT_VERSION}")
        if m.get("dtype") != DTYPE:
            raise UserError(f"{meta_path}: dtype {m.get('dtype')!r}, expected {DTYPE!r}")
        if m.get("tokenizer") != Tokenizer.name or m.get("bpe_sha256") != Tokenizer.bpe_sha256:
            raise UserError(f"{meta_path}: made with tokenizer {m.get('tokenizer')!r} "
                            f"({str(m.get('bpe_sha256'))[:12]}…), not GPT-2's")
        if vocab_size is not None and m.get("vocab_size") != vocab_size:
            raise UserError(f"{meta_path}: vocab size {m.get('vocab_size')} does not match the model's {vocab_size}")
        if split not in m.get("splits", {}):
            raise UserError(f"{meta_path}: no split {split!r} (have {', '.join(m.get('splits', {}))})")
        info = m["splits"][split]
        path = self.dir / info["file"]
        itemsize = np.dtype(DTYPE).itemsize
        if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
            size = path.stat().st_size if path.is_file() else "missing"
            raise UserError(f"{path}: size {size} does not match {info['tokens']} tokens in meta.json")
        self.split = split
        self.path = path
        self.tokens = np.memmap(path, dtype=DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------
# CLI


def _cmd_prepare(args: argparse.Namespace) -> int:
    if args.verify:
        verify(args.verify)
        return 0
    given = dataclass_overrides(args, PrepareConfig)
    instruct_given = dataclass_overrides(args, InstructOptions)
    cfg = from_dict(PrepareConfig, given, "prepare")
    flags = []
    for key, value in (given | instruct_given).items():
        flag = cli_flag(key)
        flags += [flag if value is True else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    command = shlex.join(["tinygemma", "prepare", *flags])
    opts = from_dict(InstructOptions, instruct_given, "prepare")
    if opts.instruct or opts.derive_instructions:  # records with a loss mask (tinygemma.instruct)
        from tinygemma import instruct

        instruct.prepare_from_args(cfg, opts, given, command)
    else:
        prepare(cfg, command)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenise TinyStories into train.bin/val.bin/meta.json",
        description="Tokenise TinyStories (hub or local .txt/.json/.jsonl/.parquet) with GPT-2's BPE into "
                    "uint16 memmaps, every story followed by <|endoftext|>.")
    add_dataclass_args(p, PrepareConfig)
    add_dataclass_args(p, InstructOptions)
    p.add_argument("--verify", metavar="DIR", help="check the sha256 of prepared data in DIR and exit")
    p.set_defaults(func=_cmd_prepare)
