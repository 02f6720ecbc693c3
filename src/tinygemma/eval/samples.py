"""The samples report: stories from fixed prompts with automatic measures."""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import textstat
from ftfy.badness import badness
from spellchecker import SpellChecker

from tinygemma.config import UserError
from tinygemma.eval.instruct import instruct_blocks
from tinygemma.eval.loss import completion_loss
from tinygemma.eval.ngrams import repeated_ngram_rate
from tinygemma.eval.render import format_measure, to_html, to_markdown
from tinygemma.files import atomic_write_text
from tinygemma.generate import encode_prompts, generate_rows, unwrap
from tinygemma.model import Gemma3
from tinygemma.prompts import TUTORIAL_PROMPTS
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer

REPORT_SEED = 1337  # samples reports are reproducible unless a seed is given


# -- samples report --------------------------------------------------------------------------------
def mojibake_count(text: str) -> int:
    """Replacement characters (bytes that are not UTF-8) plus ftfy's count of mojibake sequences."""
    return text.count("\ufffd") + badness(text)


WORD_RE = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")


@functools.lru_cache(maxsize=1)
def _speller() -> SpellChecker:
    return SpellChecker(language="en")  # ~0.4 s to load its word list


def _names(text: str) -> set[str]:
    """Words capitalised in mid-sentence (not after . ! ? or at the start, quotes skipped): the story's names."""
    names = set()
    for m in WORD_RE.finditer(text):
        before = text[:m.start()].rstrip(" \t\n\"'“”‘’")
        if m.group()[0].isupper() and before and before[-1] not in ".!?":
            names.add(m.group().lower())
    return names


def nonwords(text: str, context: str | None = None) -> tuple[int, int]:
    """(non-words, words) of ``text``: words not in pyspellchecker's English dictionary (case-insensitive),
    except the names of ``context`` (default: ``text``; see :func:`_names`)."""
    words = [w.lower().replace("’", "'") for w in WORD_RE.findall(text)]
    unknown = _speller().unknown(words) - _names(context if context is not None else text)
    return sum(w in unknown for w in words), len(words)


def reading_level(text: str) -> float:
    """Flesch-Kincaid grade (textstat): 0.39 words/sentence + 11.8 syllables/word - 15.59; NaN with no words."""
    return float(textstat.flesch_kincaid_grade(text)) if WORD_RE.search(text) else float("nan")


def _bigrams(tokens: list[int]) -> list[tuple[int, int]]:
    return list(zip(tokens, tokens[1:], strict=False))  # consecutive pairs


def _distinct(ngrams: list) -> float:
    """distinct-n: unique n-grams over all n-grams (0 for a sample too short to have any)."""
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def _measures(rows: list[dict]) -> dict:
    rep = sum(r["_rep"][0] for r in rows), sum(r["_rep"][1] for r in rows)
    bigrams = [b for r in rows for b in _bigrams(r["token_ids"])]
    n_tok = sum(r["_scored"] for r in rows)
    bad, words = sum(r["_spell"][0] for r in rows), sum(r["_spell"][1] for r in rows)
    levels = [r["reading_level"] for r in rows if not math.isnan(r["reading_level"])]
    return {
        "samples": len(rows),
        "ended_with_eot": sum(r["ended_with_eot"] for r in rows) / len(rows),
        "repeated_4gram_rate": rep[0] / rep[1] if rep[1] else 0.0,
        "distinct_2": _distinct(bigrams),
        "mojibake": sum(r["mojibake"] for r in rows),
        "mean_token_loss": sum(r["_loss_sum"] for r in rows) / n_tok if n_tok else float("nan"),
        "nonwords_per_100": 100 * bad / words if words else float("nan"),
        "reading_level": sum(levels) / len(levels) if levels else float("nan"),  # mean over samples
        "tokens": sum(r["tokens"] for r in rows),
    }


def sample_report(model: Gemma3, tokenizer: Tokenizer, prompts: list[str] | None = None,
                  cfg: SamplingConfig | None = None) -> dict:
    """Generate completions for ``prompts`` (default: the tutorial's five) and measure them.

    Returns {"config", "overall", "samples": [{prompt, sample, text, tokens, ended_with_eot, measures...}]}.
    """
    prompts = list(TUTORIAL_PROMPTS if prompts is None else prompts)
    cfg = cfg or SamplingConfig(seed=REPORT_SEED)
    model = unwrap(model)  # a compiled/DDP training model would recompile for every generation shape
    was_training = model.training
    model.eval()
    eot = model.config.eot_token_id
    prompt_ids = encode_prompts(tokenizer, prompts)
    rows_ids = [ids for ids in prompt_ids for _ in range(cfg.num_samples)]
    out, ended = generate_rows(model, prompt_ids, cfg)
    rows = []
    for r, (ids, toks) in enumerate(zip(rows_ids, out, strict=True)):
        text = tokenizer.decode(toks)
        scored = toks + [eot] * ended[r]  # the end of the story is a prediction too
        loss = completion_loss(model, ids[-(model.config.context_length - len(scored)):], scored) if scored else 0.0
        rep = repeated_ngram_rate(toks)
        spell = nonwords(text, context=prompts[r // cfg.num_samples] + text)  # names may come from the prompt
        rows.append({
            "prompt": prompts[r // cfg.num_samples], "sample": r % cfg.num_samples, "text": text,
            "tokens": len(toks), "token_ids": toks, "ended_with_eot": ended[r],
            "repeated_4gram_rate": rep[0] / rep[1] if rep[1] else 0.0,
            "distinct_2": _distinct(_bigrams(toks)),
            "mojibake": mojibake_count(text),
            "mean_token_loss": loss / len(scored) if scored else float("nan"),
            "nonwords_per_100": 100 * spell[0] / spell[1] if spell[1] else float("nan"),
            "reading_level": reading_level(text),
            "_rep": rep, "_scored": len(scored), "_loss_sum": loss, "_spell": spell,
        })
    model.train(was_training)
    overall = _measures(rows)
    return {"config": asdict(cfg), "overall": overall,
            "samples": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}


SAMPLE_MEASURES = [("ended_with_eot", "ends with <|endoftext|>"), ("repeated_4gram_rate", "repeated 4-grams"),
                   ("distinct_2", "distinct-2"), ("mojibake", "mojibake"), ("mean_token_loss", "mean token loss"),
                   ("nonwords_per_100", "non-words per 100 words"), ("reading_level", "Flesch-Kincaid grade"),
                   ("tokens", "tokens")]


def sample_blocks(report: dict) -> list[tuple]:
    """The samples report as :mod:`tinygemma.eval.render` blocks: the sampling settings, the overall measures,
    each story with its own, and the instruction-following section when the report has one."""
    o = report["overall"]
    blocks: list[tuple] = [("p", "Sampling: " + ", ".join(f"{k}={v}" for k, v in report["config"].items())),
                           ("table", [label for _, label in SAMPLE_MEASURES],
                            [[format_measure(k, o[k]) for k, _ in SAMPLE_MEASURES]])]
    for s in report["samples"]:
        suffix = f" — sample {s['sample'] + 1}" if s["sample"] else ""
        end = " ⟨end⟩" if s["ended_with_eot"] else " ⟨cut⟩"
        blocks += [("h2", (s["prompt"] or "(empty prompt)") + suffix), ("story", s["prompt"], s["text"] + end),
                   ("note", ", ".join(f"{label}: {format_measure(k, s[k])}" for k, label in SAMPLE_MEASURES))]
    if "instructions" in report:
        blocks += instruct_blocks(report["instructions"])
    return blocks


def write_samples_report(model: Gemma3, tokenizer: Tokenizer, out_path: str | os.PathLike,
                         prompts: list[str] | None = None, cfg: SamplingConfig | None = None,
                         title: str = "tinygemma samples", instructions: dict | None = None) -> dict:
    """Write ``out_path`` (Markdown) and its ``.html`` twin; returns the report (see :func:`sample_report`).
    ``instructions`` (from :func:`tinygemma.instruct.evaluate_instructions`) adds a section.

    Training calls this at each evaluation; the model's train/eval mode is restored afterwards.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = sample_report(model, tokenizer, prompts, cfg)
    if instructions is not None:
        report["instructions"] = instructions
    blocks = sample_blocks(report)
    atomic_write_text(out_path, to_markdown(title, blocks))
    atomic_write_text(out_path.with_suffix(".html"), to_html(title, blocks))
    return report


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read prompts ({e.__class__.__name__})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_samples(model: Gemma3, out: Path, step: int, seed: int) -> list[str]:
    """The samples report of the tutorial's prompts (``OUT/samples.md`` + ``.html``); returns the stories."""
    report = write_samples_report(model, Tokenizer(), out / "samples.md", cfg=SamplingConfig(max_new_tokens=150,
                                  seed=seed), title=f"{out.name}: samples at step {step}")
    return [f"{r['prompt']}{r['text']}" for r in report["samples"]]
