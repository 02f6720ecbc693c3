"""How good is a checkpoint? ``tinygemma eval`` (loss and perplexity) and ``tinygemma samples`` (a report).

``eval`` scores the *entire* split, every token exactly once: the split is read as one stream
preceded by ``<|endoftext|>`` (so its first token is predicted too, as the first of a story), cut
into non-overlapping windows of ``block_size`` predictions. Each window starts cold, with no context
from the previous window (like training, which samples windows without a past), and the last
window is simply shorter. The result is deterministic and independent of the batch size.

Bits per byte are the same summed loss over the bytes of the text those tokens spell:
``loss * tokens / (bytes * ln 2)``, where ``bytes`` is the length of the UTF-8 text the scored tokens
decode to, each ``<|endoftext|>`` separator counting as one byte (a one-byte story separator, as in a
text file of stories; its prediction is part of the loss). Unlike loss per token, this does not
depend on the tokenizer. ``eval`` also measures *context use*: on held-out stories, the mean loss of
each story's second half given its first half, against given only ``<|endoftext|>``.

``samples`` writes a Markdown report and an HTML twin of completions for the tutorial's prompts,
with automatic measures: share of samples ending in ``<|endoftext|>``, repeated-4-gram rate,
distinct-2, mojibake count, the mean token loss of the completion under the model itself, non-words
per 100 words (pyspellchecker's English dictionary) and the Flesch-Kincaid grade (textstat).
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import textstat
import torch
import torch.nn.functional as F
from ftfy.badness import badness
from spellchecker import SpellChecker
from tqdm import tqdm

from tinygemma import instruct
from tinygemma.config import (
    UserError,
    add_dataclass_args,
    atomic_write_text,
    check_output_file,
    dataclass_overrides,
    from_dict,
)
from tinygemma.data import TokenDataset
from tinygemma.generate import (
    TUTORIAL_PROMPTS,
    SamplingConfig,
    add_checkpoint_arg,
    add_device_arg,
    encode_prompts,
    generate_rows,
    load_checkpoint,
    parse_device,
    sampling_config_from_args,
    unwrap,
)
from tinygemma.model import Gemma3
from tinygemma.run import read_run_config, resolve_checkpoint
from tinygemma.tokenizer import Tokenizer

REPORT_SEED = 1337  # samples reports are reproducible unless a seed is given


# -- eval ----------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str | None = field(default=None, metadata={"help": "prepared data folder (from `tinygemma prepare`)"})
    split: str = field(default="val", metadata={"help": "split to score"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per window (default: the block size "
                                                                    "the checkpoint was trained with, else "
                                                                    "min(context, 512))"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    context_stories: int = field(default=200, metadata={"help": "held-out stories for the context-use measure "
                                                                "(the split's first ones; 0 skips it)"})

    def __post_init__(self):
        if self.block_size is not None and self.block_size <= 0:
            raise UserError(f"block_size must be positive, got {self.block_size}")
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.context_stories < 0:
            raise UserError(f"context_stories must be >= 0, got {self.context_stories}")


@torch.inference_mode()
def evaluate_tokens(model: Gemma3, tokens: np.ndarray, block_size: int | None = None, batch_size: int = 4,
                    progress: bool = False, tokenizer: Tokenizer | None = None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte of ``model`` over all of ``tokens`` (see the module
    doc)."""
    mc = model.config
    block_size = block_size or min(mc.context_length, 512)
    if block_size > mc.context_length:
        raise UserError(f"block size {block_size} is above the model's context length {mc.context_length}")
    n = len(tokens)
    if n == 0:
        raise UserError("no tokens to evaluate")
    device = model.lm_head.weight.device
    starts = list(range(0, n, block_size))
    total, t0 = 0.0, time.perf_counter()
    bar = tqdm(total=n, unit="tok", desc="eval", disable=not progress, file=sys.stderr)
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        x = torch.full((len(group), block_size), mc.eot_token_id, dtype=torch.long)
        y = torch.full((len(group), block_size), -100, dtype=torch.long)
        for r, s in enumerate(group):
            tgt = torch.from_numpy(np.asarray(tokens[s:s + block_size], dtype=np.int64))
            # input t-1 predicts target t; the token before the split is <|endoftext|>
            prev = torch.from_numpy(np.asarray(tokens[max(s - 1, 0):s + len(tgt) - 1], dtype=np.int64))
            inp = torch.cat([torch.tensor([mc.eot_token_id]), prev]) if s == 0 else prev
            x[r, :len(tgt)], y[r, :len(tgt)] = inp, tgt
        logits = model(x.to(device))
        # summed in float64 so that the mean does not depend on how the split is batched
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                               reduction="none")
        total += loss.double().sum().item()
        bar.update(int((y != -100).sum()))
    bar.close()
    elapsed = time.perf_counter() - t0
    mean = total / n
    n_bytes = text_bytes(tokens, tokenizer or Tokenizer())
    return {"loss": mean, "perplexity": math.exp(mean), "bits_per_byte": total / (n_bytes * math.log(2)),
            "tokens": n, "bytes": n_bytes, "windows": len(starts), "block_size": block_size,
            "tokens_per_s": n / elapsed, "elapsed_s": elapsed}


@functools.lru_cache(maxsize=2)
def _token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[tokenizer.eot_id] = 1  # a story separator is one byte, not the 13 of its spelling
    return lengths


def text_bytes(tokens: np.ndarray, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the text ``tokens`` decode to, each ``<|endoftext|>`` counting as one byte.

    Byte-level BPE tokens concatenate to the text's bytes, so this is a sum of per-token lengths."""
    return int(_token_byte_lengths(tokenizer)[np.asarray(tokens, dtype=np.int64)].sum())


@torch.inference_mode()
def tail_losses(model: Gemma3, seqs: list[list[int]], first: list[int], batch_size: int = 8) -> list[float]:
    """Per sequence, the summed loss (nats) of predicting ``seq[k]`` from ``seq[:k]`` for every ``k >= first``
    (``first >= 1``). Sequences are batched with right padding, which causal attention never sees."""
    eot, device = model.config.eot_token_id, model.lm_head.weight.device
    out: list[float] = []
    for b in range(0, len(seqs), batch_size):
        group, starts = seqs[b:b + batch_size], first[b:b + batch_size]
        width = max(map(len, group)) - 1
        x = torch.full((len(group), width), eot, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        for r, (seq, f) in enumerate(zip(group, starts, strict=True)):
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, f - 1:len(seq) - 1] = torch.tensor(seq[f:])
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        out += loss.double().sum(1).tolist()
    return out


def held_out_stories(tokens: np.ndarray, eot: int, count: int, max_len: int, min_len: int = 8) -> list[list[int]]:
    """The first ``count`` stories of a split (``<|endoftext|>``-separated) with at least ``min_len`` tokens,
    each cut to ``max_len`` tokens."""
    cuts = np.flatnonzero(np.asarray(tokens) == eot)
    stories, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end - start >= min_len:
            stories.append(np.asarray(tokens[start:end], dtype=np.int64)[:max_len].tolist())
            if len(stories) == count:
                break
        start = end + 1
    return stories


def context_use(model: Gemma3, stories: list[list[int]], batch_size: int = 8) -> dict:
    """Mean loss (nats/token) of each story's second half given its first half (``with_context``) and given
    only ``<|endoftext|>`` (``without_context``); ``gap`` = without - with: how much the model uses what the
    story has said so far."""
    if not stories:
        raise UserError("no held-out stories for the context-use measure")
    eot = model.config.eot_token_id
    halves = [len(s) // 2 for s in stories]
    with_ctx = tail_losses(model, [[eot] + s for s in stories], [1 + h for h in halves], batch_size)
    without = tail_losses(model, [[eot] + s[h:] for s, h in zip(stories, halves, strict=True)],
                          [1] * len(stories), batch_size)
    n = sum(len(s) - h for s, h in zip(stories, halves, strict=True))
    a, b = sum(with_ctx) / n, sum(without) / n
    return {"with_context": a, "without_context": b, "gap": b - a, "stories": len(stories), "tokens": n}


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: EvalConfig, device: str = "cpu",
                        progress: bool = False) -> dict:
    """``tinygemma eval``: loss, perplexity and bits per byte over ``cfg.split``, plus context use."""
    if cfg.data is None:
        raise UserError("--data is required (a folder made by `tinygemma prepare`)")
    folder = resolve_checkpoint(checkpoint)
    model = load_checkpoint(folder, device=device)
    block_size = cfg.block_size
    run_config = read_run_config(folder)
    if block_size is None and run_config is not None:  # score as the run was trained
        block_size = run_config["train"]["block_size"]
    ds = TokenDataset(cfg.data, cfg.split, vocab_size=model.config.vocab_size)
    res = evaluate_tokens(model, ds.tokens, block_size, cfg.batch_size, progress=progress)
    if cfg.context_stories:
        mc = model.config
        stories = held_out_stories(ds.tokens, mc.eot_token_id, cfg.context_stories, mc.context_length - 1)
        res["context_use"] = context_use(model, stories, cfg.batch_size)
    return {"checkpoint": str(checkpoint), "data": cfg.data, "split": cfg.split, **res}


def _eval(args: argparse.Namespace) -> int:
    if args.instruct is not None:
        return _eval_instruct(args)
    cfg = from_dict(EvalConfig, dataclass_overrides(args, EvalConfig), "eval")
    res = evaluate_checkpoint(args.checkpoint, cfg, parse_device(args.device), progress=not args.json)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{cfg.split}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
          f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']:,} tokens = {res['bytes']:,} bytes in "
          f"{res['windows']:,} windows of {res['block_size']}, {res['tokens_per_s']:,.0f} tokens/s)")
    if "context_use" in res:
        c = res["context_use"]
        print(f"context use: second halves {c['with_context']:.4f} nats/token given the first half, "
              f"{c['without_context']:.4f} without; gap {c['gap']:.4f} "
              f"({c['stories']} stories, {c['tokens']:,} tokens)")
    return 0


def _eval_instruct(args: argparse.Namespace) -> int:
    res = instruct.evaluate_from_args(load_checkpoint(args.checkpoint, device=args.device), args, args.report)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), **res}, indent=2, ensure_ascii=False))
    else:
        print("\n".join(instruct.summary_lines(res)))
    return 0


# -- samples report --------------------------------------------------------------------------------
def repeated_ngram_rate(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(repeats, total): n-grams that already occurred earlier in the same sample, out of all n-grams."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def mojibake_count(text: str) -> int:
    """Replacement characters (bytes that are not UTF-8) plus ftfy's count of mojibake sequences."""
    return text.count("\ufffd") + badness(text)


def completion_loss(model: Gemma3, prompt: list[int], completion: list[int]) -> float:
    """Summed loss (nats) of ``completion`` given ``prompt`` (which must be non-empty)."""
    return tail_losses(model, [prompt + completion], [len(prompt)])[0]


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


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|])")


def md_escape(text: str) -> str:
    """Markdown with its special characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def format_measure(key: str, value) -> str:
    if key == "ended_with_eot":
        return f"{value:.0%}" if isinstance(value, float) else ("yes" if value else "no")
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


MEASURES = [("ended_with_eot", "ends with <|endoftext|>"), ("repeated_4gram_rate", "repeated 4-grams"),
            ("distinct_2", "distinct-2"), ("mojibake", "mojibake"), ("mean_token_loss", "mean token loss"),
            ("nonwords_per_100", "non-words per 100 words"), ("reading_level", "Flesch-Kincaid grade"),
            ("tokens", "tokens")]


def render_markdown(report: dict, title: str) -> str:
    o = report["overall"]
    lines = [f"# {md_escape(title)}", "", "Sampling: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()), "",
             "| " + " | ".join(md_escape(label) for _, label in MEASURES) + " |",
             "|" + "---:|" * len(MEASURES),
             "| " + " | ".join(format_measure(k, o[k]) for k, _ in MEASURES) + " |", ""]
    for s in report["samples"]:
        suffix = f" — sample {s['sample'] + 1}" if s["sample"] else ""
        lines += [f"## {md_escape(s['prompt']) or '(empty prompt)'}{suffix}", ""]
        story = s["prompt"] + s["text"] + (" ⟨end⟩" if s["ended_with_eot"] else " ⟨cut⟩")
        lines += ["> " + md_escape(line) for line in story.split("\n")]
        measures = ", ".join(f"{md_escape(label)}: {format_measure(k, s[k])}" for k, label in MEASURES)
        lines += ["", "*" + measures + "*", ""]
    if "instructions" in report:
        lines.append(instruct.markdown_section(report["instructions"]))
    return "\n".join(lines)


def render_html(report: dict, title: str) -> str:
    o, e = report["overall"], html.escape
    head = "".join(f"<th>{e(label)}</th>" for _, label in MEASURES)
    body = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:50em;margin:auto}td,th{padding:0 .6em}"
            "blockquote{white-space:pre-wrap;border-left:3px solid #ccc;padding-left:1em}"
            ".m{color:#666;font-size:90%}</style></head><body>",
            f"<h1>{e(title)}</h1><p>Sampling: {e(', '.join(f'{k}={v}' for k, v in report['config'].items()))}</p>",
            f"<table><tr>{head}</tr><tr>" + "".join(f"<td>{e(format_measure(k, o[k]))}</td>" for k, _ in MEASURES)
            + "</tr></table>"]
    for s in report["samples"]:
        end = "⟨end⟩" if s["ended_with_eot"] else "⟨cut⟩"
        body += [f"<h2>{e(s['prompt']) or '(empty prompt)'}</h2>",
                 f"<blockquote><b>{e(s['prompt'])}</b>{e(s['text'])} {end}</blockquote>",
                 "<p class='m'>" + ", ".join(f"{e(label)}: {e(format_measure(k, s[k]))}" for k, label in MEASURES)
                 + "</p>"]
    if "instructions" in report:
        body.append(instruct.html_section(report["instructions"]))
    return "\n".join(body + ["</body></html>", ""])


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
    atomic_write_text(out_path, render_markdown(report, title))
    atomic_write_text(out_path.with_suffix(".html"), render_html(report, title))
    return report


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read prompts ({e.__class__.__name__})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _samples(args: argparse.Namespace) -> int:
    cfg = sampling_config_from_args(args)
    if cfg.seed is None:
        cfg.seed = REPORT_SEED
    out = check_output_file(args.out, "--out")
    check_output_file(out.with_suffix(".html"), "--out")
    prompts = TUTORIAL_PROMPTS + (read_prompts(args.prompts) if args.prompts else [])
    model = load_checkpoint(args.checkpoint, device=parse_device(args.device))
    instructions = instruct.evaluate_from_args(model, args) if args.instruct is not None else None
    report = write_samples_report(model, Tokenizer(), out, prompts, cfg, title=f"Samples from {args.checkpoint}",
                                  instructions=instructions)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["overall"]
    print(", ".join(f"{label}: {format_measure(k, o[k])}" for k, label in MEASURES))
    print(f"wrote {out} and {out.with_suffix('.html')}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="mean loss and perplexity of a checkpoint over a whole data split",
                       description="Score every token of a split exactly once, in non-overlapping windows "
                                   "that start without context from the previous window.")
    add_checkpoint_arg(p)
    add_dataclass_args(p, EvalConfig)
    instruct.add_eval_args(p)
    p.add_argument("--report", metavar="FILE", help="with --instruct: also write the result as JSON "
                   "(e.g. instruct_eval.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_arg(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("samples", help="a Markdown/HTML report of sampled stories with automatic measures")
    add_checkpoint_arg(p)
    p.add_argument("--prompts", help="file with more prompts, one per line (added to the tutorial's five)")
    p.add_argument("--out", default="samples.md", help="Markdown report path; the HTML twin goes beside it")
    add_dataclass_args(p, SamplingConfig)
    instruct.add_eval_args(p)
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_device_arg(p)
    p.set_defaults(func=_samples)
