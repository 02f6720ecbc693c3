"""Batch-1 decode speed on the CPU: llama.cpp running the exported GGUF file (f16 and q8_0, through
llama-cpp-python, threads = cores) vs tinygemma's KV-cache decoder (fp32, ``torch.compile``), on the same
checkpoint and prompt, with the files' sizes.

    python bench/gguf.py                           # gemma3-270m with random weights
    python bench/gguf.py --checkpoint runs/x/best  # a trained checkpoint (gemma3 layer pattern)

tokens/s counts new tokens over the whole call, prefill included (as bench/generate.py counts them); both
decode greedily from the same prompt and produce exactly ``--new-tokens`` tokens (end of text is ignored, so
random weights cannot stop early). Each figure is the median of ``--repeat`` runs after a warm-up (for
tinygemma, the warm-up is the compile). Speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where its name would shadow the gguf package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import llama_cpp
import numpy as np
import torch

from tinygemma.generate import generate_ids, load_checkpoint
from tinygemma.gguf_export import export_gguf
from tinygemma.model import Gemma3, load_model_config
from tinygemma.rundir import resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer

PROMPT = "Once upon a time there was a pumpkin."


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llama_cpp_decode(path: Path, prompt: list[int], n: int, threads: int, repeat: int) -> float:
    """tokens/s of llama.cpp's greedy decoding: the prompt in one batch, then one token per call."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)

    def run() -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    run()  # warm-up
    return n / median_time(run, repeat)


def tinygemma_decode(model: Gemma3, prompt: list[int], n: int, repeat: int) -> float:
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    decode = lambda: generate_ids(model, [prompt], cfg, compile=True)
    decode()  # the compile, untimed
    return n / median_time(decode, repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint or run folder (default: gemma3-270m, random weights)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer()
    prompt = [tok.eot_id] + tok.encode(PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = resolve_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(0)
            ckpt = Gemma3(load_model_config("gemma3-270m")).save_pretrained(Path(tmp) / "gemma3-270m-random")
        model = load_checkpoint(ckpt)  # fp32
        model.config.eot_token_id = -1  # every run decodes all --new-tokens
        print(f"CPU, {args.threads} threads, torch {torch.__version__}, llama-cpp-python "
              f"{llama_cpp.__version__}, {ckpt.name} "
              f"({model.num_params() / 1e6:.1f}M parameters), prompt {len(prompt)} tokens, "
              f"{args.new_tokens} new tokens, greedy, batch 1", flush=True)
        rows = [("tinygemma KV cache, fp32, compiled", "model.safetensors (fp32)",
                 (ckpt / "model.safetensors").stat().st_size, tinygemma_decode(model, prompt, args.new_tokens,
                                                                                args.repeat))]
        print(f"{rows[0][0]}: {rows[0][3]:.1f} tokens/s", flush=True)
        for dtype in ("f16", "q8_0"):
            path = export_gguf(ckpt, Path(tmp) / f"model-{dtype}.gguf", dtype)
            rate = llama_cpp_decode(path, prompt, args.new_tokens, args.threads, args.repeat)
            rows.append((f"llama.cpp, {dtype}", path.name, path.stat().st_size, rate))
            print(f"{rows[-1][0]}: {rate:.1f} tokens/s", flush=True)
    base = rows[0][3]
    print("\n| decoder | file | size (MB) | tokens/s | vs tinygemma |\n| --- | --- | ---: | ---: | ---: |")
    for name, file, size, rate in rows:
        print(f"| {name} | {file} | {size / 1e6:,.0f} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
