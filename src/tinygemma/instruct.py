"""TinyStories-Instruct: stories written to satisfy instructions, as data, prompts and a measured rate.

A record of the dataset (``TinyStories-Instruct-train.txt`` / ``-valid.txt`` in ``roneneldan/TinyStories``)
is a few header lines in any order, each optional::

    Features: Dialogue, MoralValue
    Words: quit, oak, gloomy
    Summary: Sara and Ben were playing in the park, ...
    Random sentence: They liked to climb the big oak tree.
    Story: <- with a trailing space

    <the story>

followed by a ``<|endoftext|>`` line. ``prepare --instruct`` tokenises each record as ``<|endoftext|>`` +
prompt + story + ``<|endoftext|>`` with a mask that marks the story tokens and the final end-of-text as the
only ones trained on; ``prepare --derive-instructions`` makes records of the same layout from plain
TinyStories, from what each story itself shows. ``evaluate_instructions`` measures how often a model's
stories follow the instructions of held-out records.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import html
import json
import math
import os
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinygemma import data
from tinygemma.config import UserError, atomic_write_text, from_dict
from tinygemma.data import InstructOptions
from tinygemma.generate import SamplingConfig, generate_rows, unwrap
from tinygemma.tokenizer import Tokenizer

PROMPT_VERSION = 1  # the prompt layout below; recorded in meta.json
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
# header label -> Record field, in the order build_prompt uses by default: the dataset's first record has
# Features, Words, Summary (the order varies from record to record); the fixture shows no Random sentence.
HEADERS = {"Features": "features", "Words": "words", "Summary": "summary", "Random sentence": "sentence"}
LABELS = {f: label for label, f in HEADERS.items()}
STORY_HEADER = "Story: \n\n"
INSTRUCT_FILES = {"train": "TinyStories-Instruct-train.txt", "val": "TinyStories-Instruct-valid.txt"}
MASK_DTYPE = "uint8"
IGNORE = -100  # cross_entropy's ignore_index: targets not trained on
PAD_MULTIPLE = 64  # fine-tuning rows are padded to the batch's longest record, rounded up to this


# ---------------------------------------------------------------------------------------------
# Records and prompts


@dataclass
class Record:
    story: str
    words: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    summary: str | None = None
    sentence: str | None = None
    order: list[str] = field(default_factory=list)  # the fields present, in header order

    def prompt(self) -> str:
        return build_prompt(words=self.words, features=self.features, summary=self.summary,
                            sentence=self.sentence, order=self.order)


class Malformed(ValueError):
    """A record that does not follow the layout; ``str(e)`` is the reason, counted in meta.json."""


def split_list(value: str) -> list[str]:
    return [w.strip() for w in value.split(",") if w.strip()]


def parse_record(text: str) -> Record:
    """One record (the text between two ``<|endoftext|>`` lines); raises :class:`Malformed`."""
    text = text.replace("\r\n", "\n")
    if text.startswith("Story:"):
        head, story = "", text[len("Story:"):]
    else:
        head, sep, story = text.partition("\nStory:")
        if not sep:
            raise Malformed("no 'Story:' line")
    story = story.strip()  # the rest of the "Story: " line is its trailing space, then a blank line
    if not story:
        raise Malformed("empty story")
    fields: dict = {"order": []}
    seen = set()
    for line in head.split("\n"):
        if not line.strip():
            continue
        label, colon, value = line.partition(":")
        name = HEADERS.get(label.strip())
        if not colon or name is None:
            raise Malformed("unknown header line")
        if name in seen:
            raise Malformed(f"repeated {label.strip()}: line")
        seen.add(name)
        value = value.strip()
        if name in ("words", "features"):
            value = split_list(value)
            if name == "features" and any(f not in FEATURES for f in value):
                raise Malformed("unknown feature")
        if value:  # an empty line asks for nothing
            fields[name] = value
            fields["order"].append(name)
    return Record(story=story, **fields)


def _one_line(name: str, value: str) -> str:
    value = " ".join(value.split())
    if not value:
        raise UserError(f"{name}: empty")
    return value


def check_features(features: Iterable[str]) -> list[str]:
    """Feature names in the dataset's spelling (any case accepted); unknown ones refused."""
    known = {f.lower(): f for f in FEATURES}
    out = []
    for f in features:
        if f.strip().lower() not in known:
            raise UserError(f"unknown feature {f.strip()!r} (known: {', '.join(FEATURES)})")
        out.append(known[f.strip().lower()])
    return out


def build_prompt(*, words: Iterable[str] = (), features: Iterable[str] = (), summary: str | None = None,
                 sentence: str | None = None, order: Iterable[str] | None = None) -> str:
    """The dataset's prompt for these instructions: one ``Label: value`` line per given field, then
    ``Story: `` and a blank line; the story follows. ``order`` lists field names (default: Features,
    Words, Summary, Random sentence)."""
    values = {"words": [_one_line("words", w) for w in words], "features": check_features(features),
              "summary": summary and _one_line("summary", summary),
              "sentence": sentence and _one_line("sentence", sentence)}
    order = list(HEADERS.values()) if order is None else list(order)
    lines = []
    for name in order:
        value = values[name]
        if value:
            lines.append(f"{LABELS[name]}: {', '.join(value) if isinstance(value, list) else value}\n")
    return "".join(lines) + STORY_HEADER


def parse_words(text: str) -> list[str]:
    """``"frog, jump, shiny"`` -> three words; no words at all is refused."""
    words = split_list(text)
    if not words:
        raise UserError(f"--words {text!r}: no words (give a comma list such as 'frog, jump, shiny')")
    return words


# ---------------------------------------------------------------------------------------------
# Instructions derived from plain stories

# Function words (matched exactly): "content words" are the rest, less COMMON_WORDS.
STOP_WORDS = frozenset("""
a about above after again against all also always am an and another any are around as at away back be because
been before being below between both but by came can could day did do does doing done down each even ever every
few for from further get got had has have having he her here hers herself him himself his how if in into is it
its itself just let like little made make many may me more most much must my myself never new next no nor not now
of off on once one only or other our ours out over own put really said same saw say says see she should so some
soon still such than that the their theirs them themselves then there these they thing things this those
through time to too took under until up upon us very was way we went were what when where which while who whom
why will with would yes yet you your yours yourself
""".split())
# Content words nearly every story uses, in any inflection (a required "wanted" or "played" would be followed by
# chance): excluded by stem.
COMMON_WORDS = """
ask big come feel find friend fun give girl boy good happy help home know like look love mom dad name play sad
smile start tell thank think try turn want
""".split()
_LOWER_WORD = re.compile(r"(?<![\w'’])[a-z]+(?![\w'’])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUOTE = re.compile(r"[\"“][^\"“”\n]*\w[^\"“”\n]*[\"”]")
_MORAL = re.compile(r"\bmoral\b|\blearned (?:an? |the |(?:his|her|their|our|my) )?(?:\w+ )?lesson\b", re.I)


def has_dialogue(story: str) -> bool:
    """Quoted speech: text between straight or curly double quotes."""
    return _QUOTE.search(story) is not None


def derive_record(story: str, seed: int) -> Record:
    """Instructions the story already satisfies, chosen with a generator seeded by (seed, story): three
    content words (no stop words nor COMMON_WORDS, lower-case in the story so names are left out, distinct
    stems), one of
    its sentences without quotes (4-30 words), Dialogue / MoralValue when it shows them. No summary."""
    rng = random.Random(hashlib.blake2b(story.encode(), digest_size=8, key=seed.to_bytes(8, "little",
                                                                                      signed=True)).digest())
    common = {stem(w) for w in COMMON_WORDS}
    by_stem: dict[str, str] = {}
    for w in _LOWER_WORD.findall(story):
        if len(w) >= 3 and w not in STOP_WORDS and stem(w) not in common:
            by_stem.setdefault(stem(w), w)
    record = Record(story=story)
    if len(by_stem) >= 3:
        record.words = rng.sample(list(by_stem.values()), 3)
    sentences = [s for s in _SENTENCE_END.split(story)
                 if 4 <= len(s.split()) <= 30 and s[-1] in ".!?" and not re.search("[\"“”]", s)]
    if sentences:
        record.sentence = rng.choice(sentences)
    record.features = [f for f, shown in (("Dialogue", has_dialogue(story)), ("MoralValue", bool(_MORAL.search(story))))
                       if shown]
    record.order = [name for name in HEADERS.values() if getattr(record, name)]
    rng.shuffle(record.order)  # the dataset's header order varies too
    return record


# ---------------------------------------------------------------------------------------------
# Writing: prepare --instruct / --derive-instructions


@dataclass
class _Records(data._Result):
    """Encoded records of one task: tokens with their mask, per-record fields, what was skipped."""

    mask: np.ndarray | None = None
    records: list[dict] = field(default_factory=list)
    truncated: np.ndarray | None = None  # per record
    # malformed records as (records kept before it, why, in val): --max-stories cuts them too
    skipped: list[tuple[int, str, bool]] = field(default_factory=list)

    def head(self, n: int) -> _Records:
        cut = int(self.lengths[:n].sum())
        return replace(super().head(n), mask=self.mask[:cut], records=self.records[:n], truncated=self.truncated[:n],
                       skipped=[s for s in self.skipped if s[0] < n])

    def select(self, val: bool) -> _Records:
        keep = self.is_val if val else ~self.is_val
        return replace(super().select(val), mask=self.mask[np.repeat(keep, self.lengths)],
                       records=[r for r, k in zip(self.records, keep, strict=True) if k],
                       truncated=self.truncated[keep], skipped=[s for s in self.skipped if s[2] == val])


def encode_record(tok: Tokenizer, record: Record, max_tokens: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``<|endoftext|>`` + prompt + story + ``<|endoftext|>`` and its mask (1 = trained on: the story and the
    final end-of-text), cut to ``max_tokens``; and whether it was cut."""
    prompt = [tok.eot_id] + tok.encode(record.prompt())
    if len(prompt) >= max_tokens:
        raise Malformed("prompt longer than max_record_tokens")
    story = tok.encode(record.story) + [tok.eot_id]
    ids = np.array(prompt + story, dtype=data.DTYPE)
    mask = np.concatenate([np.zeros(len(prompt), MASK_DTYPE), np.ones(len(story), MASK_DTYPE)])
    return ids[:max_tokens], mask[:max_tokens], len(ids) > max_tokens


def _concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def encode_records(opts: InstructOptions, seed: int, task: data._Task) -> _Records:
    """The worker side of ``prepare``: parse (or derive) and encode the records of one task."""
    empty = dict(tokens=np.empty(0, data.DTYPE), lengths=np.empty(0, np.int64), is_val=None,
                 repaired=np.empty(0, bool), nbytes=task.nbytes)
    try:
        texts, repaired = data._task_texts(task)
    except UnicodeDecodeError as e:
        return _Records(**empty | {"error": data._failed(task, e).error})
    tok: Tokenizer = data._WORKER["tok"]
    ids, masks, records, truncated, is_val, fixed = [], [], [], [], [], []
    skipped = []
    for text, was_repaired in zip(texts, repaired, strict=True):
        val = task.split_val and data._is_val(text)
        try:
            record = derive_record(text, seed) if opts.derive_instructions else parse_record(text)
            if not opts.headers:
                record = Record(story=record.story)
            rec_ids, rec_mask, cut = encode_record(tok, record, opts.max_record_tokens)
        except Malformed as e:
            skipped.append((len(ids), str(e), bool(val)))
            continue
        ids.append(rec_ids)
        masks.append(rec_mask)
        records.append(asdict(record))
        truncated.append(cut)
        is_val.append(val)
        fixed.append(was_repaired)
    return _Records(**empty | dict(
        tokens=_concat(ids, data.DTYPE), lengths=np.array([len(i) for i in ids], dtype=np.int64),
        is_val=np.array(is_val, dtype=bool) if task.split_val else None, repaired=np.array(fixed, dtype=bool)),
        mask=_concat(masks, MASK_DTYPE), records=records, truncated=np.array(truncated, dtype=bool),
        skipped=skipped)


def _reasons(counts: collections.Counter) -> str:
    return ", ".join(f"{n:,} {why}" for why, n in counts.most_common())


class _RecordWriter(data._SplitWriter):
    """``SPLIT.bin`` (tokens), ``SPLIT.mask.bin`` (uint8), ``SPLIT.idx.npy`` (int64 record starts, records + 1)
    and, for val, ``val.records.jsonl`` (each record's fields, for evaluation)."""

    def __init__(self, path: Path):
        super().__init__(path)
        split = path.stem
        self.parts = {kind: path.with_name(f"{split}.{kind}") for kind in ("mask.bin", "idx.npy", "records.jsonl")}
        self.mask_f = open(self._tmp("mask.bin"), "wb")
        self.records_f = open(self._tmp("records.jsonl"), "w", encoding="utf-8") if split == "val" else None
        self.starts = [np.zeros(1, np.int64)]
        self.skipped: collections.Counter = collections.Counter()
        self.truncated = self.trained = 0

    def _tmp(self, kind: str) -> Path:
        return self.parts[kind].with_name(self.parts[kind].name + ".tmp")

    def add(self, res: _Records) -> None:
        self.starts.append(self.tokens + np.cumsum(res.lengths))
        super().add(res)
        self.mask_f.write(res.mask.tobytes())
        self.trained += int(res.mask.sum())
        self.skipped.update(why for _, why, _ in res.skipped)
        self.truncated += int(res.truncated.sum())
        if self.records_f is not None:
            self.records_f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in res.records)

    def info(self) -> dict:
        info = super().info()
        return {"file": info["file"], "records": info.pop("stories"), "skipped": sum(self.skipped.values()),
                "skipped_reasons": dict(self.skipped), "truncated": self.truncated, "tokens": self.tokens,
                "trained_tokens": self.trained, "sha256": info["sha256"],
                **{kind.replace(".", "_"): p.name for kind, p in self.parts.items() if kind != "records.jsonl"
                   or self.records_f is not None}}

    def summary(self) -> str:
        skipped = f", {sum(self.skipped.values()):,} skipped" if self.skipped else ""
        return (f"{self.stories:,} records{skipped}, {self.truncated:,} truncated, {self.tokens:,} tokens "
                f"({self.trained:,} trained on)")

    def empty_reason(self) -> str:
        return f"; {sum(self.skipped.values()):,} malformed ({_reasons(self.skipped)})" if self.skipped else ""

    def finish(self) -> None:
        super().finish()
        with open(self._tmp("idx.npy"), "wb") as f:
            np.save(f, np.concatenate(self.starts))
        for f in (self.mask_f, self.records_f):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def commit(self) -> None:
        super().commit()
        for kind, p in self.parts.items():
            if kind != "records.jsonl" or self.records_f is not None:
                os.replace(self._tmp(kind), p)

    def discard(self) -> None:
        super().discard()
        for f in (self.mask_f, self.records_f):
            if f is not None:
                f.close()
        for kind in self.parts:
            self._tmp(kind).unlink(missing_ok=True)


def _instruct_inputs(cfg: data.PrepareConfig) -> list[data._Input]:
    """TinyStories-Instruct: a folder with the hub's two files, one file (split by seeded hash), or the hub."""
    if cfg.v2:
        raise UserError("--v2 has no TinyStories-Instruct files; use --derive-instructions --v2")
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return [data._file_input(path, "split")]
    if path.is_dir():
        found = {split: path / name for split, name in INSTRUCT_FILES.items() if (path / name).is_file()}
        if len(found) < 2:
            have = f"has only {next(iter(found.values())).name}" if found else "has neither file"
            raise UserError(f"{path}: {have} of {' / '.join(INSTRUCT_FILES.values())}; pass --source FILE to "
                            f"split one file ({cfg.val_fraction:.0%} val, seed {cfg.seed})")
        return [data._file_input(p, split) for split, p in found.items()]
    return data._hub_txt_inputs(cfg, INSTRUCT_FILES)


def layout(opts: InstructOptions, seed: int) -> data.Layout:
    """``prepare``'s layout for instruct records, real (``opts.instruct``) or derived."""
    kind = "derived from stories" if opts.derive_instructions else "TinyStories-Instruct"
    return data.Layout(inputs=data._resolve if opts.derive_instructions else _instruct_inputs,
                       encode=functools.partial(encode_records, opts, seed), writer=_RecordWriter, unit="records",
                       meta={"format": "instruct", "prompt_version": PROMPT_VERSION, "instructions": kind,
                             "max_record_tokens": opts.max_record_tokens})


def prepare_instruct(cfg: data.PrepareConfig, opts: InstructOptions, command: str | None = None) -> dict:
    """``tinygemma prepare --instruct`` / ``--derive-instructions``: an instruct data folder; returns meta.json."""
    meta = data.prepare(cfg, command, layout(opts, cfg.seed))
    for split, info in meta["splits"].items():
        if info["skipped"]:
            print(f"{split}: skipped {info['skipped']:,} malformed records "
                  f"({_reasons(collections.Counter(info['skipped_reasons']))})", file=sys.stderr)
    return meta


# ---------------------------------------------------------------------------------------------
# Reading


class InstructDataset(data.TokenDataset):
    """One split of instruct records: tokens, mask and record offsets, checked against meta.json."""

    format = "instruct"

    def _wrong_format(self) -> UserError:
        return UserError(f"{self.dir}: plain token data, not instruct records; make instruct data with "
                         "`tinygemma prepare --instruct` (or --derive-instructions)")

    def __init__(self, directory: str | os.PathLike, split: str = "train", vocab_size: int | None = None):
        super().__init__(directory, split, vocab_size)
        info = self.meta["splits"][split]
        mask_path, idx_path = self.dir / info["mask_bin"], self.dir / info["idx_npy"]
        if not mask_path.is_file() or mask_path.stat().st_size != info["tokens"]:
            raise UserError(f"{mask_path}: missing or not {info['tokens']} bytes as meta.json says")
        try:
            self.starts = np.load(idx_path)
        except (OSError, ValueError):
            raise UserError(f"{idx_path}: missing or not a .npy file") from None
        if self.starts.shape != (info["records"] + 1,) or self.starts[-1] != info["tokens"]:
            raise UserError(f"{idx_path}: does not index {info['records']} records of {info['tokens']} tokens")
        self.mask = np.memmap(mask_path, dtype=MASK_DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.starts) - 1

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of record ``i``."""
        s, e = self.starts[i], self.starts[i + 1]
        return self.tokens[s:e], self.mask[s:e]

    def batch(self, indices: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y (B, T), int64: one record per row from its start, cut from the end when
        longer than block_size + 1, padded with ``<|endoftext|>`` in x when shorter; y is the next token, -100
        on padding and where that token is not trained on (its mask is 0). T is the longest row rounded up to
        a multiple of PAD_MULTIPLE, at most block_size: the full block would add padding to every row (a fifth
        more positions at 16 x 512 on TinyStories records), and the rounding keeps the shapes a compiled
        model sees few."""
        rows = [self.record(int(i)) for i in indices]
        longest = max(len(ids) for ids, _ in rows) - 1
        width = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        eot = self.meta["eot_id"]
        x = torch.full((len(indices), width), eot, dtype=torch.long)
        y = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids = torch.from_numpy(ids[:block_size + 1].astype(np.int64))
            keep = torch.from_numpy(mask[1:block_size + 1].astype(bool))
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = ids[1:].masked_fill(~keep, IGNORE)
        return x, y


def read_records(directory: str | os.PathLike, split: str = "val") -> list[Record]:
    """The fields of a split's records (``val.records.jsonl``), in order."""
    path = Path(directory) / f"{split}.records.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing (made by `tinygemma prepare --instruct` for the val split)")
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f]


# ---------------------------------------------------------------------------------------------
# Measuring: does a story follow the instructions?

# Irregular forms of TinyStories' common verbs and nouns -> the base form (suffix rules miss these).
_IRREGULAR_FORMS = {
    "run": "ran", "go": "went gone", "see": "saw seen", "eat": "ate eaten", "come": "came", "take": "took taken",
    "give": "gave given", "find": "found", "make": "made", "say": "said", "tell": "told", "think": "thought",
    "feel": "felt", "fly": "flew flown", "fall": "fell fallen", "draw": "drew drawn", "grow": "grew grown",
    "know": "knew known", "throw": "threw thrown", "swim": "swam swum", "sing": "sang sung", "ring": "rang rung",
    "drink": "drank drunk", "begin": "began begun", "sit": "sat", "stand": "stood", "hold": "held",
    "keep": "kept", "sleep": "slept", "leave": "left", "lose": "lost", "meet": "met", "bring": "brought",
    "buy": "bought", "catch": "caught", "teach": "taught", "fight": "fought", "build": "built", "send": "sent",
    "hide": "hid hidden", "ride": "rode ridden", "write": "wrote written", "break": "broke broken",
    "wake": "woke woken", "speak": "spoke spoken", "choose": "chose chosen", "freeze": "froze frozen",
    "steal": "stole stolen", "wear": "wore worn", "tear": "tore torn", "dig": "dug", "hang": "hung",
    "win": "won", "shake": "shook shaken", "forget": "forgot forgotten", "get": "got gotten", "do": "did done",
    "have": "had has", "hear": "heard", "shine": "shone", "slide": "slid", "stick": "stuck", "swing": "swung",
    "blow": "blew blown", "feed": "fed", "lead": "led", "spin": "spun", "sweep": "swept", "weep": "wept",
    "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "leaf": "leaves", "wolf": "wolves", "knife": "knives",
}
IRREGULAR = {form: base for base, forms in _IRREGULAR_FORMS.items() for form in forms.split()}
_VOWEL = re.compile("[aeiouy]")
_WORD = re.compile(r"[a-z]+")


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A small stemmer for inflections: the irregular table above, then one suffix rule (-ies/-ied -> y,
    -ing and -ed when a vowel is left, -es after s/x/z/ch/sh, -s but not -ss/-us/-is), then a doubled final
    consonant is undoubled (stopped, running) and a final e dropped (hope/hoped/hoping). Both the required
    word and the story's words go through it, so jump/jumps/jumped/jumping, cry/cried, run/ran all match."""
    w = IRREGULAR.get(word.lower(), word.lower())
    if w.endswith(("ies", "ied")) and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("ing") and _VOWEL.search(w[:-3]):
        w = w[:-3]
    elif w.endswith("ed") and not w.endswith("eed") and _VOWEL.search(w[:-2]):
        w = w[:-2]
    elif w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "aeioulsz":
        w = w[:-1]
    if len(w) > 2 and w.endswith("e"):
        w = w[:-1]
    return w


def uses_word(story: str, word: str) -> bool:
    """The story uses ``word`` in some inflection (every part of a multi-word entry)."""
    stems = {stem(w) for w in _WORD.findall(story.lower())}
    return all(stem(w) in stems for w in _WORD.findall(word.lower())) and bool(_WORD.search(word.lower()))


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def check_story(record: Record, story: str) -> dict[str, bool]:
    """Each instruction of ``record`` that can be checked, and whether ``story`` follows it."""
    out = {}
    if record.words:
        out["words"] = all(uses_word(story, w) for w in record.words)
    if record.sentence:
        out["sentence"] = _normalised(record.sentence) in _normalised(story)
    if "Dialogue" in record.features:
        out["dialogue"] = has_dialogue(story)
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small n and rates near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(flags: list[bool]) -> dict:
    k, n = sum(flags), len(flags)
    return {"n": n, "satisfied": k, "rate": k / n if n else None, "ci95": list(wilson(k, n))}


@torch.inference_mode()
def masked_loss(model: torch.nn.Module, ds: InstructDataset, indices: np.ndarray, block_size: int | None = None,
                batch_size: int = 8) -> tuple[float, int]:
    """Mean loss (nats) over the trained-on tokens (story + final end-of-text) of the given records, and
    how many there were. ``block_size`` defaults to the longest record, capped at the context length."""
    lengths = ds.starts[np.asarray(indices) + 1] - ds.starts[np.asarray(indices)]
    block_size = block_size or int(min(model.config.context_length, lengths.max() - 1))
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for b in range(0, len(indices), batch_size):
        x, y = ds.batch(indices[b:b + batch_size], block_size)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                               reduction="sum")
        total += loss.double().item()
        count += int((y != IGNORE).sum())
    return total / count, count


def evaluate_instructions(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str | os.PathLike,
                          n: int = 100, seed: int = 0, sampling: SamplingConfig | None = None, batch_size: int = 8,
                          out: str | os.PathLike | None = None) -> dict:
    """Write a story for each of the first ``n`` val records' instructions and measure, per instruction and
    overall (a story following all of its record's checkable instructions), the share followed with a 95%
    Wilson interval; plus the masked story loss of those records. ``sampling`` is a SamplingConfig
    (default: the usual sampling, 400 new tokens at most); its seed is ``seed`` unless it sets one, and batch
    ``b`` samples with seed + b. Writes the result as JSON to ``out`` when given."""
    model = unwrap(model)
    if n < 1:
        raise UserError(f"records must be >= 1, got {n}")
    ds = InstructDataset(data_dir, "val", vocab_size=model.config.vocab_size)
    records = read_records(data_dir)[:n]
    sampling = sampling or SamplingConfig(max_new_tokens=min(400, model.config.context_length // 2))
    if sampling.num_samples != 1:
        raise UserError("instruction evaluation writes one story per record (num_samples must be 1)")
    base_seed = seed if sampling.seed is None else sampling.seed
    stories = []
    for b in range(0, len(records), batch_size):
        prompts = [[tokenizer.eot_id] + tokenizer.encode(r.prompt()) for r in records[b:b + batch_size]]
        rows, _ = generate_rows(model, prompts, replace(sampling, seed=base_seed + b // batch_size))
        stories += [tokenizer.decode(ids) for ids in rows]
    checks = [check_story(r, s) for r, s in zip(records, stories, strict=True)]
    loss, trained = masked_loss(model, ds, np.arange(len(records)), batch_size=batch_size)
    result = {
        "data": str(data_dir), "records": len(records), "sampling": asdict(sampling) | {"seed": base_seed},
        "matching": "words: inflections via tinygemma.instruct.stem; sentence: contained, case and whitespace "
                    "normalised; dialogue: text in double quotes",
        "constraints": {name: _rate([c[name] for c in checks if name in c])
                        for name in ("words", "sentence", "dialogue")},
        "overall": _rate([all(c.values()) for c in checks if c]),
        "words_each": _rate([uses_word(s, w) for r, s in zip(records, stories, strict=True) for w in r.words]),
        "story_loss": loss, "story_tokens": trained,
        "samples": [{"prompt": r.prompt(), "story": s, "followed": c}
                    for r, s, c in zip(records, stories, checks, strict=True)],
    }
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


MEASURES = ("words", "sentence", "dialogue", "overall", "each word")


def rates(result: dict) -> dict[str, dict]:
    """Every measure's rate of an :func:`evaluate_instructions` result, by name, in MEASURES' order."""
    found = {**result["constraints"], "overall": result["overall"], "each word": result["words_each"]}
    return {name: found[name] for name in MEASURES}


def measure_rows(result: dict) -> list[tuple[str, dict]]:
    """(measure, rate) of the measures that applied to some record, in MEASURES' order."""
    return [(name, r) for name, r in rates(result).items() if r["n"]]


def summary_lines(result: dict) -> list[str]:
    """One line per measure: share followed, 95% interval, how many records it applies to."""
    lines = []
    for name, r in measure_rows(result):
        lo, hi = r["ci95"]
        lines.append(f"{name:<10} {r['rate']:6.1%}  [95% {lo:.1%}-{hi:.1%}]  ({r['satisfied']}/{r['n']})")
    lines.append(f"story loss {result['story_loss']:.4f}  ({result['story_tokens']:,} trained-on tokens, "
                 f"{result['records']} records)")
    return lines


# ---------------------------------------------------------------------------------------------
# CLI pieces (the flags live on prepare, generate, eval and samples)


def add_instruction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instructions (TinyStories-Instruct prompt)")
    g.add_argument("--words", help="words the story must use, comma-separated: 'frog, jump, shiny'")
    g.add_argument("--features", help=f"comma list from {', '.join(FEATURES)}")
    g.add_argument("--summary", help="what the story is about")
    g.add_argument("--sentence", help="a sentence the story must contain")


def prompt_from_args(args: argparse.Namespace) -> str | None:
    """The instruction prompt the flags ask for, or None when no instruction flag was given."""
    if all(getattr(args, k) is None for k in ("words", "features", "summary", "sentence")):
        return None
    words = parse_words(args.words) if args.words is not None else []
    features = split_list(args.features) if args.features is not None else []
    if args.features is not None and not features:
        raise UserError(f"--features {args.features!r}: no features (known: {', '.join(FEATURES)})")
    return build_prompt(words=words, features=features, summary=args.summary, sentence=args.sentence)


def prepare_from_args(cfg: data.PrepareConfig, opts: InstructOptions, given: dict, command: str) -> dict:
    """The prepare handler's instruct branch: an instruct folder of its own unless --out says otherwise."""
    if "out" not in given:
        cfg = replace(cfg, out="data/tinystories-derived" if opts.derive_instructions else "data/tinystories-instruct")
    return prepare_instruct(cfg, opts, command)


def markdown_section(result: dict) -> str:
    """The samples report's section on instruction following (see :func:`evaluate_instructions`)."""
    from tinygemma.evaluate import md_escape as _md

    lines = ["## Instructions", "", f"A story for each of the first {result['records']} held-out records of "
             f"{_md(result['data'])}; {_md(result['matching'])}.", "",
             "| instruction | followed | 95% interval | records |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['rate']:.1%} | {r['ci95'][0]:.1%}–{r['ci95'][1]:.1%} | {r['n']} |"
              for name, r in measure_rows(result)]
    lines += ["", f"Masked story loss: {result['story_loss']:.4f} over {result['story_tokens']:,} tokens.", ""]
    for k, s in enumerate(result["samples"]):
        followed = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in s["followed"].items())
        lines += [f"### Record {k + 1}", ""] + ["> " + _md(line) for line in (s["prompt"] + s["story"]).split("\n")]
        lines += ["", f"*{followed or 'nothing to check'}*", ""]
    return "\n".join(lines)


def html_section(result: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(name)}</td><td>{r['rate']:.1%}</td><td>{r['ci95'][0]:.1%}–{r['ci95'][1]:.1%}</td>"
                   f"<td>{r['n']}</td></tr>" for name, r in measure_rows(result))
    body = [f"<h2>Instructions</h2><p>A story for each of the first {result['records']} held-out records of "
            f"{e(result['data'])}; {e(result['matching'])}.</p>",
            f"<table><tr><th>instruction</th><th>followed</th><th>95% interval</th><th>records</th></tr>{rows}"
            f"</table><p>Masked story loss: {result['story_loss']:.4f} over {result['story_tokens']:,} tokens.</p>"]
    for k, s in enumerate(result["samples"]):
        followed = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in s["followed"].items())
        body += [f"<h3>Record {k + 1}</h3><blockquote><b>{e(s['prompt'])}</b>{e(s['story'])}</blockquote>",
                 f"<p class='m'>{e(followed or 'nothing to check')}</p>"]
    return "\n".join(body)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instruction following (TinyStories-Instruct)")
    g.add_argument("--instruct", metavar="DATA", help="instruct data folder: write a story for each held-out "
                   "record's instructions and report how often they are followed")
    g.add_argument("--records", type=int, default=100, help="first N val records (default: 100)")
    g.add_argument("--instruct-seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--instruct-max-new-tokens", type=int, default=None,
                   help="story length limit (default: min(400, context / 2))")


def evaluate_from_args(model: torch.nn.Module, args: argparse.Namespace, out: str | None = None) -> dict:
    """``--instruct DATA`` of eval and samples: evaluate_instructions with the flags of add_eval_args."""
    limit = args.instruct_max_new_tokens or min(400, model.config.context_length // 2)
    sampling = from_dict(SamplingConfig, {"max_new_tokens": limit, "seed": args.instruct_seed}, "instruct")
    return evaluate_instructions(model, Tokenizer(), args.instruct, args.records, args.instruct_seed, sampling,
                                 out=out)
