"""Why a model does (not) follow instructions: how much the story attends to the instruction lines, per layer,
and whether asking for a word lowers its loss in the story.

    diag = diagnose(model, read_records("data/ts-derived"), n=100)

The attention probabilities are recomputed from each layer's own q/k (a pre-hook on its attention reads the
inputs the layer gets, mask included), so the model's forward is unchanged: a story token farther than the
sliding window from the instruction lines gets no mass from them in a local layer, which is the point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tinygemma.generate import unwrap
from tinygemma.model import FULL, Attention, Gemma3, apply_rope
from tinygemma.prompts import Record, stem
from tinygemma.tokenizer import Tokenizer

POSITION_BINS = (64, 128)  # story positions (tokens after "Story:") 0-63, 64-127, 128+
_WORD = re.compile(rb"[A-Za-z]+")  # tinygemma.prompts.LETTERS_RE's runs, on the story's bytes


@dataclass
class RecordTokens:
    """One record as the model reads it, with the spans the diagnosis looks at."""

    ids: list[int]  # <|endoftext|> + prompt + story + <|endoftext|>
    instructions: slice  # the instruction lines' tokens (before "Story:")
    story: slice  # the story's text tokens (not its final <|endoftext|>)
    word_positions: list[int] = field(default_factory=list)  # story tokens inside a required word


def record_tokens(tok: Tokenizer, record: Record) -> RecordTokens:
    """The record's tokens as training sees them (prompt and story tokenised apart) and its spans."""
    prompt = record.prompt()
    head = prompt[:prompt.rindex("Story:")]
    prompt_ids, head_ids = [tok.eot_id] + tok.encode(prompt), tok.encode(head)
    if prompt_ids[1:1 + len(head_ids)] != head_ids:
        raise ValueError("the instruction lines do not tokenise as a prefix of the prompt")
    story_ids = tok.encode(record.story)
    start = len(prompt_ids)
    stems = {stem(w) for entry in record.words for w in re.findall("[a-z]+", entry.lower())}
    spans = [m.span() for m in _WORD.finditer(record.story.encode()) if stem(m.group().decode().lower()) in stems]
    ends = np.cumsum([len(tok.decode_bytes([t])) for t in story_ids])
    begins = ends - np.array([len(tok.decode_bytes([t])) for t in story_ids])
    words = [start + k for k, (b, e) in enumerate(zip(begins, ends, strict=True))
             if any(b < hi and e > lo for lo, hi in spans)]
    return RecordTokens(prompt_ids + story_ids + [tok.eot_id], slice(1, 1 + len(head_ids)),
                        slice(start, start + len(story_ids)), words)


def attention_probs(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, T, T) attention probabilities of ``attn`` on its input ``x``, from its own q/k (QK-norm, RoPE,
    scale; K/V heads shared across their query group) and ``mask`` (bool, True = may attend; None = causal)."""
    B, T, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2))
    k = attn.k_norm(attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def _bin_names(bins: tuple[int, ...]) -> list[str]:
    edges = (0, *bins)
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges, bins, strict=False)] + [f"{edges[-1]}+"]


@torch.inference_mode()
def diagnose(model: torch.nn.Module, records: list[Record], n: int, tokenizer: Tokenizer | None = None,
             bins: tuple[int, ...] = POSITION_BINS) -> dict:
    """Over the first ``n`` of ``records`` that have instruction lines: per layer, the mean attention mass from
    story tokens onto the instruction lines' tokens (averaged over heads and story positions; also by story
    position ``bins``, tokens after "Story:"), and the mean loss (nats) on the story tokens inside a required
    word (any inflection) against the other story tokens. Records are cut to the model's context length."""
    model: Gemma3 = unwrap(model).eval()
    tok = tokenizer or Tokenizer()
    cfg, device = model.config, model.lm_head.weight.device
    chosen = [r for r in records if r.words or r.features or r.summary or r.sentence][:n]
    layers = model.model.layers
    mass = torch.zeros(len(layers), len(bins) + 1, dtype=torch.float64)  # summed over heads-averaged queries
    count = torch.zeros(len(bins) + 1, dtype=torch.float64)
    losses = {"words": [0.0, 0], "other": [0.0, 0], "unasked": [0.0, 0]}
    current: dict = {}

    def hook(index: int):
        def pre(attn: Attention, args: tuple) -> None:
            if current.get("unasked"):  # the control layout's forward: its attention is not measured
                return
            x, cos, sin, mask = args[:4]
            probs = attention_probs(attn, x, cos, sin, mask)[0]  # (H, T, T)
            onto = probs[:, current["story"], current["instructions"]].sum(-1).mean(0)  # per story position
            mass[index].index_add_(0, current["bin"], onto.double().cpu())
        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for record in chosen:
            rt = record_tokens(tok, record)
            ids = torch.tensor(rt.ids[:cfg.context_length], device=device)
            story = range(rt.story.start, min(rt.story.stop, len(ids) - 1))
            if not len(story):
                continue
            current.update(story=slice(story.start, story.stop), instructions=rt.instructions,
                           bin=torch.bucketize(torch.arange(len(story)), torch.tensor(bins), right=True))
            count += torch.bincount(current["bin"], minlength=len(bins) + 1).double()
            logits = model(ids[None, :-1])[0].float()
            # the loss of story token p (predicted at p - 1), inside a required word or not
            token_loss = F.cross_entropy(logits, ids[1:], reduction="none").cpu()[story.start - 1:story.stop - 1]
            in_word = torch.tensor([p in words for p in story]) if (words := set(rt.word_positions)) else \
                torch.zeros(len(story), dtype=torch.bool)
            for key, pick in (("words", in_word), ("other", ~in_word)):
                losses[key][0] += token_loss[pick].double().sum().item()
                losses[key][1] += int(pick.sum())
            current["unasked"] = True
            unasked = unasked_loss(model, tok, record, len(story))  # the same story, "Story:" only
            current["unasked"] = False
            losses["unasked"][0] += unasked[in_word].double().sum().item()
            losses["unasked"][1] += int(in_word.sum())
    finally:
        for h in handles:
            h.remove()
    names = _bin_names(bins)
    return {
        "records": len(chosen), "story_positions": int(count.sum()),
        "positions_by_bin": dict(zip(names, count.long().tolist(), strict=True)),
        "layers": [{"layer": i, "type": layer.layer_type,
                    "window": None if layer.layer_type == FULL else cfg.sliding_window,
                    "mass": (mass[i].sum() / count.sum()).item(),
                    "by_position": {name: (m / c).item() if c else None
                                    for name, m, c in zip(names, mass[i], count, strict=True)}}
                   for i, layer in enumerate(layers)],
        "word_loss": losses["words"][0] / max(losses["words"][1], 1), "word_tokens": losses["words"][1],
        "other_loss": losses["other"][0] / max(losses["other"][1], 1), "other_tokens": losses["other"][1],
        "word_loss_unasked": losses["unasked"][0] / max(losses["unasked"][1], 1),
    }


@torch.no_grad()
def unasked_loss(model: Gemma3, tok: Tokenizer, record: Record, n: int) -> torch.Tensor:
    """Per-token loss (n,) of the first ``n`` story tokens of ``record`` told with no instruction lines (the
    control layout): against the loss with them, it shows whether asking for a word raises its probability."""
    rt = record_tokens(tok, Record(story=record.story))
    ids = torch.tensor(rt.ids[:model.config.context_length], device=model.lm_head.weight.device)
    logits = model(ids[None, :-1])[0].float()
    return F.cross_entropy(logits, ids[1:], reduction="none").cpu()[rt.story.start - 1:rt.story.start - 1 + n]


def diagnosis_lines(diag: dict) -> list[str]:
    """The diagnosis as a few printable lines: one per layer, then the two losses."""
    names = list(diag["positions_by_bin"])
    lines = [f"attention onto the instruction lines, {diag['records']} records, {diag['story_positions']:,} story "
             f"positions (by position after 'Story:': {', '.join(names)})"]
    for layer in diag["layers"]:
        kind = f"local (window {layer['window']})" if layer["window"] else "global"
        split = "  ".join("-" if v is None else f"{v:.3f}" for v in layer["by_position"].values())
        lines.append(f"  layer {layer['layer']:>2} {kind:<20} {layer['mass']:.3f}   [{split}]")
    lines.append(f"loss on required words' tokens {diag['word_loss']:.3f} ({diag['word_tokens']:,} tokens), "
                 f"other story tokens {diag['other_loss']:.3f} ({diag['other_tokens']:,})")
    lines.append(f"the same words' tokens with no instruction lines {diag['word_loss_unasked']:.3f}: asking for a "
                 f"word lowers its loss by {diag['word_loss_unasked'] - diag['word_loss']:.3f} nats")
    return lines
