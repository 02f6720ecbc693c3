"""The instruction diagnosis against computations by hand: attention mass from the weights, word-token losses."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tinygemma.eval.instruct_diagnose import diagnose, diagnosis_lines, record_tokens
from tinygemma.model import FULL, SLIDING, Gemma3, load_model_config
from tinygemma.prompts import Record

STORY = ("The frog jumped over the log. It was a sunny day and the frog was happy. " * 4).strip()
RECORD = Record(story=STORY, words=["frog", "jump", "shiny"], sentence="It was a sunny day.",
                order=["words", "sentence"])


def one_layer(kind: str, window: int) -> Gemma3:
    """A 1-layer model with weights far from uniform attention (large init, non-zero norm gains)."""
    cfg = replace(load_model_config("tiny"), num_layers=1, layer_types=[kind], sliding_window=window, init_std=0.3)
    torch.manual_seed(0)
    model = Gemma3(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return model


def by_hand_mass(model: Gemma3, ids: list[int], instr: slice, story: range) -> list[float]:
    """Per story position, the heads' mean attention mass onto ``instr``: softmax(q k^T * scale) from the
    weights, with Gemma's RMSNorm (1 + gain), rotate-half RoPE, one K head shared by all query heads, and
    the causal (and, in a sliding layer, window) mask."""
    cfg, layer = model.config, model.model.layers[0]
    att = layer.self_attn

    def norm(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1 + gain)

    def rope(x, base):
        T, d = x.shape[-2], x.shape[-1]
        angle = torch.arange(T)[:, None].double() * base ** (-torch.arange(0, d, 2).double() / d)
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    T = len(ids) - 1
    h = model.model.embed_tokens.weight.double()[ids[:-1]] * math.sqrt(cfg.hidden_size)
    h = norm(h, layer.input_layernorm.weight.double())
    q = (h @ att.q_proj.weight.double().T).view(T, cfg.num_heads, cfg.head_dim).transpose(0, 1)
    k = (h @ att.k_proj.weight.double().T).view(T, 1, cfg.head_dim).transpose(0, 1)
    base = cfg.rope_local_base if layer.layer_type == SLIDING else cfg.rope_global_base
    q = rope(norm(q, att.q_norm.weight.double()), base)
    k = rope(norm(k, att.k_norm.weight.double()), base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.query_pre_attn_scalar)  # (H, T, T), K shared
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < cfg.sliding_window) if layer.layer_type == SLIDING else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return [probs[:, p, instr].sum(-1).mean().item() for p in story]


@pytest.mark.parametrize("kind", [SLIDING, FULL])
def test_attention_mass_equals_softmax_qk_by_hand(kind, tokenizer):
    model = one_layer(kind, window=24)
    rt = record_tokens(tokenizer, RECORD)
    story = range(rt.story.start, rt.story.stop)
    assert len(story) > 70 and rt.instructions.stop < rt.story.start
    per_position = by_hand_mass(model, rt.ids, rt.instructions, story)
    diag = diagnose(model, [Record(story="no instructions"), RECORD], n=5, tokenizer=tokenizer, bins=(16, 64))
    assert diag["records"] == 1 and diag["story_positions"] == len(story)
    got = diag["layers"][0]
    assert got["type"] == kind and got["window"] == (24 if kind == SLIDING else None)
    assert got["mass"] == pytest.approx(sum(per_position) / len(story), rel=1e-5, abs=1e-9)
    bins = {"0-15": per_position[:16], "16-63": per_position[16:64], "64+": per_position[64:]}
    for name, values in bins.items():
        assert got["by_position"][name] == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-9)
    if kind == SLIDING:  # beyond the window, the story cannot see the instructions in a local layer
        beyond = [m for p, m in zip(story, per_position, strict=True) if p - (rt.instructions.stop - 1) >= 24]
        assert beyond and all(m == 0 for m in beyond) and got["by_position"]["64+"] == 0
    else:
        assert got["by_position"]["64+"] > 1e-4
    assert len(diagnosis_lines(diag)) == 4  # header, the layer, the two loss lines


def test_word_and_other_story_losses_by_hand(tokenizer):
    model = one_layer(FULL, window=24)
    rt = record_tokens(tokenizer, RECORD)
    ids = torch.tensor(rt.ids)
    with torch.no_grad():
        losses = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
    text = [tokenizer.decode([t]) for t in rt.ids]
    story = range(rt.story.start, rt.story.stop)
    # GPT-2 has " frog" and " jumped" as single tokens; "jump" matches "jumped"; "shiny" is not in the story
    words = [p for p in story if text[p].strip() in ("frog", "jumped")]
    assert len(words) == 12 and sorted(rt.word_positions) == words
    other = [p for p in story if p not in words]
    diag = diagnose(model, [RECORD], n=1, tokenizer=tokenizer)
    assert diag["word_tokens"] == len(words) and diag["other_tokens"] == len(other)
    assert diag["word_loss"] == pytest.approx(losses[[p - 1 for p in words]].mean().item(), rel=1e-5)
    assert diag["other_loss"] == pytest.approx(losses[[p - 1 for p in other]].mean().item(), rel=1e-5)
    # unasked: the same story after "Story:" alone; its word tokens sit at the same offsets from the story's start
    bare = record_tokens(tokenizer, Record(story=RECORD.story))
    bare_ids = torch.tensor(bare.ids)
    with torch.no_grad():
        bare_losses = F.cross_entropy(model(bare_ids[None, :-1])[0], bare_ids[1:], reduction="none")
    at = [bare.story.start + p - rt.story.start - 1 for p in words]
    assert bare_ids[[a + 1 for a in at]].tolist() == ids[words].tolist()
    assert diag["word_loss_unasked"] == pytest.approx(bare_losses[at].mean().item(), rel=1e-5)
