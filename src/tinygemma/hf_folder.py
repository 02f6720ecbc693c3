"""The Hugging Face files of a model folder: tokenizer, generation config and model card."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiktoken_ext.openai_public import r50k_pat_str

from tinygemma.config import from_dict
from tinygemma.files import atomic_write_text
from tinygemma.model import FULL, ModelConfig
from tinygemma.prompts import build_prompt
from tinygemma.rundir import MODEL_FILES, display_name
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import EOT_ID, EOT_TOKEN, get_encoding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_FILES = (*MODEL_FILES, *TOKENIZER_FILES, "generation_config.json", "README.md")


@dataclass
class CardInfo:
    """What the model card says beyond config.json; every field is optional."""

    name: str | None = None  # title; default: the folder's name
    step: int | None = None
    tokens_seen: int | None = None
    val_loss: float | None = None  # mean cross-entropy (nats/token) on TinyStories validation
    val_tokens: int | None = None  # how many validation tokens val_loss averages over
    recipe: str | None = None
    hardware: str | None = None
    training_time_s: float | None = None
    samples: list[str] = field(default_factory=list)
    train_config: dict[str, Any] | None = None
    instruct: bool = False  # trained on instruct records (`train` on an instruct folder; `finetune` says so itself)
    license: str = "apache-2.0"


# -- files ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tokenizer_texts() -> dict[str, str]:
    """The tokenizer files' text, built once per process (about a second) from the project's ranks."""
    from transformers import PreTrainedTokenizerFast  # transformers is slow to import: only when needed
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = get_encoding()
    # decode_single_token_bytes is tiktoken's public view of the ranks; the id of each token is its rank.
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}

    class _Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, _path: str) -> dict[bytes, int]:  # ranks come from memory, not a URL
            return ranks

    backend = _Converter(vocab_file="", pattern=r50k_pat_str, extra_special_tokens=[EOT_TOKEN]).converted()
    if backend.token_to_id(EOT_TOKEN) != EOT_ID or backend.get_vocab_size() != EOT_ID + 1:
        raise RuntimeError("tokenizer conversion did not reproduce GPT-2's vocabulary")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                                  unk_token=EOT_TOKEN, pad_token=EOT_TOKEN, clean_up_tokenization_spaces=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        texts = {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.name in TOKENIZER_FILES}
    # saved pretty-printed it is 6.3 MB, and every checkpoint carries it; compact it is 2.4 MB
    texts["tokenizer.json"] = json.dumps(json.loads(texts["tokenizer.json"]), ensure_ascii=False,
                                         separators=(",", ":"))
    config = json.loads(texts["tokenizer_config.json"])
    # The generic fast class loads tokenizer.json verbatim in transformers 4.x and 5.x; GPT2Tokenizer(Fast)
    # in 5.x rebuilds its own pipeline from vocab + merges and would drop the converter's settings.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    texts["tokenizer_config.json"] = json.dumps(config, indent=2)
    # transformers 5 keeps special tokens in tokenizer_config.json; older tools still read this file.
    texts["special_tokens_map.json"] = json.dumps(
        {k: EOT_TOKEN for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    return texts


def write_tokenizer_files(folder: Path, context_length: int) -> None:
    for name, text in _tokenizer_texts().items():
        if name == "tokenizer_config.json":
            text = json.dumps({**json.loads(text), "model_max_length": context_length}, indent=2)
        atomic_write_text(folder / name, text + "\n")


def sampling_defaults() -> dict[str, Any]:
    """`tinygemma generate`'s defaults, so transformers samples the same way by default."""

    cfg = SamplingConfig()
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
            "top_p": cfg.top_p}


def generation_config(eot_id: int = EOT_ID) -> dict[str, Any]:
    return {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id, "do_sample": True,
            **sampling_defaults()}


def write_hf_files(folder: str | os.PathLike, info: dict[str, Any] | None = None, *, card: bool = True) -> Path:
    """Add tokenizer files, generation_config.json and (if ``card``) a README.md model card to a
    model folder written by ``Gemma3.save_pretrained``. ``info`` holds CardInfo's fields."""
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    card_info = from_dict(CardInfo, info or {}, "model card info")
    write_tokenizer_files(folder, cfg.context_length)
    atomic_write_text(folder / "generation_config.json",
                      json.dumps(generation_config(cfg.eot_token_id), indent=2) + "\n")
    if card:
        atomic_write_text(folder / "README.md", model_card(cfg, card_info, card_info.name or display_name(folder)))
    return folder


# -- the model card ------------------------------------------------------------------------------
GEMMA3_BIBTEX = """@article{gemma3_2025,
  title   = {Gemma 3 Technical Report},
  author  = {{Gemma Team, Google DeepMind}},
  journal = {arXiv preprint arXiv:2503.19786},
  year    = {2025}
}"""


TINYSTORIES_BIBTEX = """@article{eldan2023tinystories,
  title   = {TinyStories: How Small Can Language Models Be and Still Speak Coherent English?},
  author  = {Eldan, Ronen and Li, Yuanzhi},
  journal = {arXiv preprint arXiv:2305.07759},
  year    = {2023}
}"""


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def human_duration(seconds: float) -> str:
    """``1 h 6 min`` / ``4 min 10 s``: the one way durations are written (model card, report)."""
    h, rest = divmod(round(seconds), 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def model_card(cfg: ModelConfig, info: CardInfo, name: str) -> str:
    """README.md of an exported folder: Hub metadata, then the model, its data, training, evaluation,
    samples, usage, limitations and citations."""
    front = "\n".join([
        "---", f"license: {info.license}", "library_name: transformers", "pipeline_tag: text-generation",
        "language:", "- en", "datasets:", "- roneneldan/TinyStories",
        "tags:", "- gemma3", "- gemma3_text", "- tinystories", "- tinygemma", "- from-scratch", "---", ""])
    sections = [_card_model(cfg, name), _card_data(info), _card_training(info), _card_evaluation(info),
                _card_samples(info), _card_usage(info)]
    return front + "\n".join(line for section in sections for line in section)


def _card_model(cfg: ModelConfig, name: str) -> list[str]:
    sizes = cfg.param_breakdown()
    n_full = cfg.layer_types.count(FULL)
    lines = [
        f"# {name}", "",
        f"A {human_count(sizes['total'])}-parameter language model with Google DeepMind's **Gemma 3** architecture, "
        "trained **from scratch** (no Gemma weights) on **TinyStories**, short English stories for young "
        "children, with the **GPT-2 tokenizer** (50,257 tokens). It was made with tinygemma and loads in "
        "🤗 transformers as `Gemma3ForCausalLM`.", "",
        "## Model details", "",
        "| | |", "| --- | --- |",
        "| architecture | Gemma 3 text decoder (`Gemma3ForCausalLM`, `model_type: gemma3_text`) |",
        f"| layers | {cfg.num_layers} ({cfg.num_layers - n_full} sliding-window, {n_full} global attention) |",
        f"| hidden size | {cfg.hidden_size} |",
        f"| attention | {cfg.num_heads} query heads, {cfg.num_kv_heads} key/value heads (grouped-query), "
        f"head dim {cfg.head_dim}, QK-norm |",
        f"| sliding window | {cfg.sliding_window} tokens |",
        f"| RoPE base | {cfg.rope_local_base:,.0f} (local), {cfg.rope_global_base:,.0f} (global) |",
        f"| MLP | GeGLU (tanh GELU), intermediate size {cfg.intermediate_size} |",
        "| normalisation | RMSNorm with (1 + w) scale, before and after attention and MLP |",
        f"| embeddings | {'tied input/output' if cfg.tie_embeddings else 'separate output head'}, "
        "scaled by sqrt(hidden size) |",
        f"| context length | {cfg.context_length:,} positions |",
        # no `<|endoftext|>` here: a "|" splits a table cell even inside backticks
        f"| vocabulary | {cfg.vocab_size:,} (GPT-2 BPE; end of text, id {cfg.eot_token_id}, is bos, eos and pad) |",
        "",
        "| parameters | count |", "| --- | ---: |",
        f"| embedding | {sizes['embedding']:,} |",
        f"| transformer blocks ({cfg.num_layers} x {sizes['per_block']:,}) | {sizes['blocks']:,} |",
        f"| final norm | {sizes['final_norm']:,} |",
    ]
    if sizes["lm_head"]:
        lines.append(f"| output head | {sizes['lm_head']:,} |")
    return lines + [f"| **total** | **{sizes['total']:,}** |", "",
                    "The full configuration is in `config.json`; `tinygemma info PATH` prints it with the FLOPs "
                    "per token.", ""]


def _card_data(info: CardInfo) -> list[str]:
    lines = ["## Training data", "",
             "[TinyStories](https://huggingface.co/datasets/roneneldan/TinyStories) (Eldan & Li, 2023): "
             "synthetic short stories written by GPT-3.5 and GPT-4 using only words a 3-4 year old "
             "understands. Licence: Community Data License Agreement – Sharing 1.0 (CDLA-Sharing-1.0). "
             "Each story is followed by `<|endoftext|>` during training."]
    if info.tokens_seen is not None:
        short = f" ({human_count(info.tokens_seen)})" if info.tokens_seen >= 1e6 else ""
        lines.append(f"\nTokens seen in training: **{info.tokens_seen:,}**{short}.")
    return lines + [""]


def _card_training(info: CardInfo) -> list[str]:
    facts = []
    if info.recipe:
        facts.append(f"- recipe: {info.recipe}")
    if info.step is not None:
        facts.append(f"- optimizer steps: {info.step:,}")
    if info.hardware:
        facts.append(f"- hardware: {info.hardware}")
    if info.training_time_s is not None:
        facts.append(f"- training time: {human_duration(info.training_time_s)}")
    lines = ["## Training", "", *(facts or ["Pre-training with next-token cross-entropy; this checkpoint did not "
                                            "record its recipe."])]
    if info.train_config:
        lines += ["", "<details><summary>training configuration</summary>", "", "```json",
                  json.dumps(info.train_config, indent=2, sort_keys=True, default=str), "```", "", "</details>"]
    return lines + [""]


def _card_evaluation(info: CardInfo) -> list[str]:
    if info.val_loss is None:
        return ["## Evaluation", "", "Not evaluated yet: `tinygemma eval PATH` measures validation loss and "
                "perplexity.", ""]
    over = f" over {info.val_tokens:,} tokens" if info.val_tokens else ""
    return ["## Evaluation", "", "| metric (TinyStories validation) | value |", "| --- | ---: |",
            f"| cross-entropy loss (nats/token){over} | {info.val_loss:.4f} |",
            f"| perplexity | {math.exp(info.val_loss):.2f} |", ""]


def _card_samples(info: CardInfo) -> list[str]:
    if not info.samples:
        return ["## Sample stories", "", "None recorded with this checkpoint; generate some with the snippet below."]
    lines = ["## Sample stories", ""]
    for i, text in enumerate(info.samples, 1):
        lines += [f"**Sample {i}**", "", *(f"> {row}" if row else ">" for row in text.strip().split("\n")), ""]
    return lines


def _card_usage(info: CardInfo) -> list[str]:
    # a model trained on instruct records takes TinyStories-Instruct's header lines before its story
    instruct = info.instruct or bool(info.train_config and info.train_config.get("finetune_from"))
    prompt = []
    if instruct:
        example = build_prompt(words=["frog", "jump", "shiny"], features=["Dialogue"])
        prompt = [f"This checkpoint was trained on TinyStories-Instruct records: begin the prompt with their "
                  f"header lines, e.g. `{example!r}` (`tinygemma generate --words ... --features ...` builds it).",
                  ""]
    follows = ("follows the instruction lines it was trained on only part of the time (`tinygemma eval "
               "--instruct` measures how often)" if instruct else "cannot follow instructions")
    return [
        "", "## How to use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        'path = "path/to/this/folder"  # or a Hub repo id',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "out = model.generate(ids)  # sampling settings come from generation_config.json",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "",
        '# or: pipeline("text-generation", model=path)("Once upon a time")[0]["generated_text"]',
        "```", "",
        "With tinygemma installed, `tinygemma generate` samples from this folder too.", "", *prompt,
        "Stories end with `<|endoftext|>` (the eos token), so generation stops by itself. Do not add a "
        "bos token: the model was trained on plain story text.", "",
        "## Intended use and limitations", "",
        "- For learning, research and demos about small language models: how architecture, data and "
        "training budget shape what a model can write.",
        "- It writes simple English children's stories; it is not an assistant, knows little about the "
        f"world, {follows}, and will produce incoherent or wrong text, especially far "
        "from the TinyStories style or in other languages.",
        "- TinyStories was generated by GPT-3.5/GPT-4; the model may repeat that data's biases and "
        "stereotypes. Review outputs before showing them to children or anyone else.",
        "- Not evaluated for safety; do not use it for decisions about people.", "",
        "## Citation", "",
        "```bibtex", GEMMA3_BIBTEX, "", TINYSTORIES_BIBTEX, "```", ""]
