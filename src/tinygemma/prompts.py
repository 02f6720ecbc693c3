"""The instruct record format (TinyStories-Instruct headers), the prompt builder and the tutorial's prompts."""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from tinygemma.config import UserError

PROMPT_VERSION = 1  # the prompt layout below; recorded in meta.json
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")


# header label -> Record field, in the order build_prompt uses by default: the dataset's first record has
# Features, Words, Summary (the order varies from record to record); the fixture shows no Random sentence.
HEADERS = {"Features": "features", "Words": "words", "Summary": "summary", "Random sentence": "sentence"}
LABELS = {f: label for label, f in HEADERS.items()}
STORY_HEADER = "Story: \n\n"


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


def instruction_header(*, words: str | Iterable[str] | None = None, features: str | Iterable[str] | None = None,
                       summary: str | None = None, sentence: str | None = None, flag: str = "") -> str | None:
    """The instruct prompt for the instructions given, or None when none is; ``words`` and ``features`` are a
    comma list (``"frog, jump, shiny"``) or a sequence. Shared by ``generate``'s flags and the API's fields
    (``flag`` is the prefix that names them in errors, e.g. ``--``)."""
    if all(v is None for v in (words, features, summary, sentence)):
        return None

    def listed(name: str, value: str | Iterable[str] | None) -> list[str]:
        if value is None:
            return []
        items = split_list(value) if isinstance(value, str) else list(value)
        if not items:
            shown = f" {value!r}" if isinstance(value, str) and flag else ""
            hint = "give a comma list such as 'frog, jump, shiny'" if name == "words" else \
                f"known: {', '.join(FEATURES)}"
            raise UserError(f"{flag}{name}{shown}: no {name} ({hint})")
        return items

    return build_prompt(words=listed("words", words), features=listed("features", features), summary=summary,
                        sentence=sentence)


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


# The tutorial's five story openings: the samples report's prompts and the studio's examples.
TUTORIAL_PROMPTS = [
    "Once upon a time there was a pumpkin.",
    "A little girl went to the woods",
    "A boy told his sister a bedtime story about a flying cat",
    "The kids sat in a circle while Uncle narrated a story about a brave knight",
    "Dad was telling the kids an adventure tale about a pirate ship",
]


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
LETTERS_RE = re.compile(r"[a-z]+")


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
