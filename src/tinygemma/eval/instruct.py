"""Instruction following: does a story use the required words, features and sentence?"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

from tinygemma.config import UserError
from tinygemma.data.instruct import read_records
from tinygemma.eval.ngrams import repeated_ngram_rate
from tinygemma.files import atomic_write_text
from tinygemma.fused import IGNORE_INDEX
from tinygemma.generate import generate_rows, unwrap
from tinygemma.prompts import LETTERS_RE, Record, has_dialogue, stem
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer
from tinygemma.train.sampler import InstructDataset


def uses_word(story: str, word: str) -> bool:
    """The story uses ``word`` in some inflection (every part of a multi-word entry)."""
    stems = {stem(w) for w in LETTERS_RE.findall(story.lower())}
    return all(stem(w) in stems for w in LETTERS_RE.findall(word.lower())) and bool(LETTERS_RE.search(word.lower()))


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
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        total += loss.double().item()
        count += int((y != IGNORE_INDEX).sum())
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
    stories, ended, repeats = [], [], [0, 0]
    for b in range(0, len(records), batch_size):
        prompts = [[tokenizer.eot_id] + tokenizer.encode(r.prompt()) for r in records[b:b + batch_size]]
        rows, stopped = generate_rows(model, prompts, replace(sampling, seed=base_seed + b // batch_size))
        stories += [tokenizer.decode(ids) for ids in rows]
        ended += stopped
        for ids in rows:
            repeated, grams = repeated_ngram_rate(ids)
            repeats = [repeats[0] + repeated, repeats[1] + grams]
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
        # what word-stuffing would show, as the samples report measures them (pooled over the stories)
        "ended_with_eot": sum(ended) / len(ended),
        "repeated_4gram_rate": repeats[0] / repeats[1] if repeats[1] else 0.0,
        "samples": [{"prompt": r.prompt(), "story": s, "followed": c, "ended_with_eot": e}
                    for r, s, c, e in zip(records, stories, checks, ended, strict=True)],
    }
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


INSTRUCT_MEASURES = ("words", "sentence", "dialogue", "overall", "each word")


def rates(result: dict) -> dict[str, dict]:
    """Every measure's rate of an :func:`evaluate_instructions` result, by name, in INSTRUCT_MEASURES' order."""
    found = {**result["constraints"], "overall": result["overall"], "each word": result["words_each"]}
    return {name: found[name] for name in INSTRUCT_MEASURES}


def measure_rows(result: dict) -> list[tuple[str, dict]]:
    """(measure, rate) of the measures that applied to some record, in INSTRUCT_MEASURES' order."""
    return [(name, r) for name, r in rates(result).items() if r["n"]]


def summary_lines(result: dict) -> list[str]:
    """One line per measure: share followed, 95% interval, how many records it applies to."""
    lines = []
    for name, r in measure_rows(result):
        lo, hi = r["ci95"]
        lines.append(f"{name:<10} {r['rate']:6.1%}  [95% {lo:.1%}-{hi:.1%}]  ({r['satisfied']}/{r['n']})")
    lines.append(f"story loss {result['story_loss']:.4f}  ({result['story_tokens']:,} trained-on tokens, "
                 f"{result['records']} records)")
    if "ended_with_eot" in result:  # results written before these measures lack them
        lines.append(f"stories ending with <|endoftext|> {result['ended_with_eot']:.1%}, repeated 4-grams "
                     f"{result['repeated_4gram_rate']:.1%}")
    return lines


def instruct_blocks(result: dict) -> list[tuple]:
    """The samples report's section on instruction following (see :func:`evaluate_instructions`), as blocks."""
    blocks: list[tuple] = [
        ("h2", "Instructions"),
        ("p", f"A story for each of the first {result['records']} held-out records of {result['data']}; "
              f"{result['matching']}."),
        ("table", ["instruction", "followed", "95% interval", "records"],
         [[name, f"{r['rate']:.1%}", f"{r['ci95'][0]:.1%}–{r['ci95'][1]:.1%}", r["n"]]
          for name, r in measure_rows(result)]),
        ("p", f"Masked story loss: {result['story_loss']:.4f} over {result['story_tokens']:,} tokens.")]
    for k, s in enumerate(result["samples"]):
        followed = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in s["followed"].items())
        blocks += [("h3", f"Record {k + 1}"), ("story", s["prompt"], s["story"]),
                   ("note", followed or "nothing to check")]
    return blocks
