"""Where stories come from: local files (txt, jsonl, json, parquet), folders and the Hugging Face hub; mojibake
repair."""

from __future__ import annotations

import collections
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tinygemma.config import UserError
from tinygemma.data.config import PrepareConfig
from tinygemma.tokenizer import EOT_TOKEN

HUB_SPLITS = {"train": "train", "val": "validation"}
TXT_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
TXT_FILES_V2 = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
TEXT_FIELDS = ("text", "story")  # the hub's Parquet has "text"; the original JSON archive has "story"
SEPARATOR = EOT_TOKEN.encode()
BATCH_BYTES = 1 << 20  # text per task: large enough to amortise pickling, small enough to keep memory flat
MAX_STORY_BYTES = 64 << 20  # a "story" this long means the file is not in the separator format
READ_BYTES = 1 << 20


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


@dataclass
class Task:
    name: str  # the file or dataset, for error messages
    items: bytes | list[str]  # bytes: a piece of a .txt file, whole stories (decoded and split in the worker)
    offset: int  # byte offset of that piece in the file
    nbytes: int  # input bytes this task covers, for the progress bar
    split_val: bool  # True: assign each story to train/val with the seeded hash


@dataclass
class Input:
    name: str
    split: str  # "train", "val" or "split" (seeded train/val split of a single source)
    tasks: Callable[[], Iterator[Task]]
    size: int | None  # bytes, when known (progress bar total)
    fingerprint: dict


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _txt_tasks(f: BinaryIO, name: str, split_val: bool) -> Iterator[Task]:
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
                yield Task(name, buf, start, len(buf), split_val)
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
        yield Task(name, buf[:end], start, end, split_val)
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
                  sized: Callable[[str], int] = len) -> Iterator[Task]:
    items: list[str] = []
    size = 0
    for text in records:
        items.append(text)
        size += sized(text)
        if size >= BATCH_BYTES:
            yield Task(name, items, 0, size, split_val)
            items, size = [], 0
    if items:
        yield Task(name, items, 0, size, split_val)


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


def file_input(path: Path, split: str) -> Input:
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    suffix = path.suffix.lower()
    split_val = split == "split"
    if suffix == ".parquet":
        def tasks() -> Iterator[Task]:
            yield from _text_batches(_parquet_records(path), str(path), split_val)
        size = None
    elif suffix in (".json", ".jsonl"):
        reader = _jsonl_records if suffix == ".jsonl" else _json_records

        def tasks() -> Iterator[Task]:
            yield from _text_batches(reader(path), str(path), split_val, lambda t: len(t.encode()))
        size = path.stat().st_size
    else:
        def tasks() -> Iterator[Task]:
            with open(path, "rb") as f:
                yield from _txt_tasks(f, str(path), split_val)
        size = path.stat().st_size
    return Input(str(path), split, tasks, size, _file_fingerprint(path))


def _split_of(filename: str) -> str | None:
    stem = filename.lower()
    if stem.startswith("train") or "-train" in stem or "_train" in stem:
        return "train"
    if any(stem.startswith(p) or f"-{p}" in stem or f"_{p}" in stem for p in ("valid", "val")):
        return "val"
    return None


def _hub_inputs(source: str, cfg: PrepareConfig, local: bool) -> list[Input]:
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

        def tasks(ds=ds, name=f"{source} [{hf}]") -> Iterator[Task]:
            def records() -> Iterator[str]:
                column = None
                for batch in ds.iter(batch_size=1000):
                    column = column or _text_column(list(batch), name)
                    yield from (text for text in batch[column] if text is not None)
            yield from _text_batches(records(), name, single)

        fp = {"dataset": source} if not local else {"dataset": str(Path(source).resolve()), "files": [
            _file_fingerprint(p) for p in sorted(Path(source).rglob("*.parquet"))]}
        inputs.append(Input(f"{source} [{hf}]", "split" if single else ours, tasks, None, fp))
    return inputs


def hub_txt_inputs(cfg: PrepareConfig, files: dict[str, str] = TXT_FILES_V2) -> list[Input]:
    """``.txt`` files of the hub dataset (TinyStoriesV2-GPT4-*.txt by default): streamed over HTTP when
    --max-stories, else downloaded (cached)."""
    import huggingface_hub as hf

    inputs = []
    for split, filename in files.items():
        name = f"{cfg.source}/{filename}"
        if cfg.max_stories is not None:
            def tasks(filename=filename, name=name) -> Iterator[Task]:
                try:
                    f = hf.HfFileSystem().open(f"datasets/{cfg.source}/{filename}", "rb")
                except Exception as e:
                    raise UserError(f"{name}: cannot open on the hub ({type(e).__name__}: {e})") from None
                with f:
                    yield from _txt_tasks(f, name, False)
            inputs.append(Input(name, split, tasks, None, {"dataset": cfg.source, "file": filename}))
            continue
        try:
            path = Path(hf.hf_hub_download(cfg.source, filename, repo_type="dataset"))
        except Exception as e:
            raise UserError(f"{name}: cannot download ({type(e).__name__}); and no local folder ./{cfg.source} "
                            "exists (offline? pass --source FOLDER)") from None
        inputs.append(file_input(path, split))
    return inputs


def resolve_source(cfg: PrepareConfig) -> list[Input]:
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return [file_input(path, "split")]
    if path.is_dir():
        return _folder_inputs(path, cfg)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.source) and not cfg.source.startswith("."):
        return hub_txt_inputs(cfg) if cfg.v2 else _hub_inputs(cfg.source, cfg, local=False)
    raise UserError(f"{cfg.source}: no such file or folder")


def _folder_inputs(path: Path, cfg: PrepareConfig) -> list[Input]:
    variants = [TXT_FILES_V2] if cfg.v2 else [TXT_FILES, TXT_FILES_V2]
    for names in variants:
        found = {split: path / n for split, n in names.items() if (path / n).is_file()}
        if len(found) == 2:
            return [file_input(p, split) for split, p in found.items()]
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
    return [file_input(p, split) for split in ("train", "val") for p in by_split[split]]
