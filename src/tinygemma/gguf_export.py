"""A checkpoint as one GGUF file that llama.cpp (and ollama, LM Studio) runs: ``tinygemma export CKPT OUT.gguf
--format gguf [--dtype f32|f16|q8_0]``.

The file is written with the ``gguf`` package (ggml's own writer) the way llama.cpp's converter writes a Gemma 3
text model: architecture ``gemma3``, tensors under llama.cpp's names (the package's own name map), RMSNorm
weights stored as ``1 + w`` (llama.cpp multiplies by the stored weight), and the GPT-2 tokenizer: model ``gpt2``,
pre-tokenizer ``gpt-2``, 50,257 tokens, 50,000 merges, ``<|endoftext|>`` as bos/eos/padding and no automatic bos,
so llama.cpp encodes text exactly as tinygemma does (``tokenizer.encode``, no special tokens). The merges are
recovered from tiktoken's ranks (:func:`gpt2_vocab`), as GPT-2's merges.txt lists them.

llama.cpp does not read every Gemma 3 choice from the file. It scales queries by ``1/sqrt(head_dim)``
(``query_pre_attn_scalar`` is not read), and builds before ``attention.sliding_window_pattern`` and
``rope.freq_base_swa`` were read for ``gemma3`` (as bundled by tools such as ollama) fix five sliding layers then
one full layer and a local RoPE base of 10,000. Both keys are written, and a config those readers would run
differently is refused (:func:`check_llama_cpp`), so the file means the same model to every reader.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tinygemma.config import UserError
from tinygemma.files import check_output_file
from tinygemma.hf_folder import human_count
from tinygemma.model import FULL, SLIDING, Gemma3, ModelConfig
from tinygemma.rundir import resolve_checkpoint
from tinygemma.tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE, get_encoding

ARCH = "gemma3"
GGUF_DTYPES = ("f32", "f16", "q8_0")


SWA_PERIOD, LOCAL_BASE = 6, 10_000.0  # what llama.cpp assumes for gemma3 where it does not read the file


Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values


def llama_cpp_layer_types(num_layers: int) -> list[str]:
    return [FULL if (i + 1) % SWA_PERIOD == 0 else SLIDING for i in range(num_layers)]


def check_llama_cpp(cfg: ModelConfig, dtype: str) -> None:
    """Refuse, in one line naming the difference, a model llama.cpp would run differently or cannot store."""
    if (cfg.vocab_size, cfg.eot_token_id) != (VOCAB_SIZE, EOT_ID):
        raise UserError(f"vocabulary of {cfg.vocab_size} tokens with end of text {cfg.eot_token_id} is not GPT-2's "
                        f"({VOCAB_SIZE}, end of text {EOT_ID}): the GGUF file carries GPT-2's tokenizer")
    expected = llama_cpp_layer_types(cfg.num_layers)
    if cfg.layer_types != expected:
        short = lambda types: "".join("F" if t == FULL else "S" for t in types)
        raise UserError(f"layer pattern {short(cfg.layer_types)} differs from llama.cpp's gemma3 pattern "
                        f"{short(expected)} (five sliding, then one full)")
    if cfg.rope_local_base != LOCAL_BASE:
        raise UserError(f"local RoPE base {cfg.rope_local_base:g} differs from llama.cpp's gemma3 {LOCAL_BASE:g}")
    # llama.cpp's gemma3 scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for its 62-layer (27B) model
    scalar = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
    if cfg.query_pre_attn_scalar != scalar:
        raise UserError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {scalar} "
                        "llama.cpp uses for this gemma3 shape")
    rows = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_heads * head_dim": cfg.num_heads * cfg.head_dim}
    if dtype == "q8_0" and (bad := [k for k, v in rows.items() if v % Q8_BLOCK]):
        raise UserError(f"q8_0 needs rows of a multiple of {Q8_BLOCK} values; {bad[0]} is {rows[bad[0]]}")


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) for chr(256 + n) in byte order; GGUF stores tokens and merges in this alphabet."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _bpe_split(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """The two parts byte-level BPE joins into ``token``: merge the lowest-ranked adjacent pair, using only
    tokens ranked below ``token`` itself, until two parts remain."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def gpt2_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's 50,257 tokens (by id) and 50,000 merges ("a b", by rank) in the byte-level alphabet, recovered
    from the project's tiktoken ranks: token n is the merge of the two parts BPE makes of it from lower ranks."""
    enc = get_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
    chars = _byte_chars()
    text = lambda b: "".join(chars[x] for x in b)
    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            parts = _bpe_split(token, rank, ranks)
            if len(parts) != 2:
                raise RuntimeError(f"GPT-2 token {rank} is not one merge of lower-ranked tokens")
            merges.append((rank, f"{text(parts[0])} {text(parts[1])}"))
    tokens = [text(enc.decode_single_token_bytes(i)) for i in range(EOT_ID)] + [EOT_TOKEN]
    return tokens, [m for _, m in sorted(merges)]


def _add_metadata(w, cfg: ModelConfig, name: str, dtype: str) -> None:
    import gguf

    w.add_name(name)
    w.add_description(f"A {human_count(cfg.param_breakdown()['total'])}-parameter Gemma 3 text model trained from "
                      "scratch (no Gemma weights) on TinyStories, short English stories for young children, "
                      "with the GPT-2 tokenizer; made with tinygemma.")
    w.add_license("apache-2.0")
    w.add_dataset_count(1)
    w.add_dataset_name(0, "TinyStories")
    w.add_dataset_repo_url(0, "https://huggingface.co/datasets/roneneldan/TinyStories")
    w.add_tags(["gemma3", "tinystories", "tinygemma", "from-scratch"])
    w.add_languages(["en"])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # every hyper-parameter llama.cpp reads for gemma3
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
    w.add_rope_freq_base(cfg.rope_global_base)
    w.add_rope_freq_base_swa(cfg.rope_local_base)


def _add_tokenizer(w) -> None:
    import gguf

    tokens, merges = gpt2_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == EOT_ID else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_pad_token_id(EOT_ID)
    w.add_add_bos_token(False)  # prompts are encoded as tinygemma encodes them; write <|endoftext|> to start
    w.add_add_eos_token(False)


def gguf_tensors(model: Gemma3, dtype: str) -> Iterator[tuple[str, np.ndarray, object]]:
    """(llama.cpp name, data, ggml type or None to infer it from the array) for every stored tensor."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_layers)
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reuses token_embd when there is no output tensor
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise RuntimeError(f"no llama.cpp name for {hf_name}")
        data = tensor.detach().to(torch.float32).numpy()
        if "norm" in hf_name:  # Gemma's RMSNorm scales by 1 + w; llama.cpp by the stored weight
            data = data + np.float32(1.0)
        if data.ndim == 1 or dtype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
            yield name, data, None
        elif dtype == "f16":
            yield name, data.astype(np.float16), None
        else:
            yield name, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_gguf(model: Gemma3, path: str | os.PathLike, dtype: str = "f16", name: str = "tinygemma") -> None:
    """Write ``model`` as a GGUF file at ``path`` (not atomic: :func:`export_gguf` writes a temp name)."""
    import gguf

    check_llama_cpp(model.config, dtype)
    w = gguf.GGUFWriter(path, ARCH)
    try:
        _add_metadata(w, model.config, name, dtype)
        _add_tokenizer(w)
        for tensor_name, data, raw_dtype in gguf_tensors(model, dtype):
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16", force: bool = False) -> Path:
    """Checkpoint (or run folder) ``source`` as the GGUF file ``out``; nothing is left at ``out`` unless it
    is complete (written under a temp name, then renamed)."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose {', '.join(GGUF_DTYPES)} for GGUF")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; name the .gguf file to write")
    if out.exists() and not force:
        raise UserError(f"{out}: exists (use --force to replace it)")
    try:
        check_output_file(out, "OUT")
    except UserError as e:
        raise UserError(f"{e}: cannot write there") from None
    src = resolve_checkpoint(source)
    if out.exists() and out.resolve().parent == src.resolve():
        raise UserError(f"{out}: would replace a file of the checkpoint {src}; choose another path")
    check_llama_cpp(ModelConfig.from_folder(src), dtype)  # before loading the weights
    model = Gemma3.from_pretrained(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # the writer creates it, with the usual permissions
    try:
        write_gguf(model, tmp, dtype, name=out.stem)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
