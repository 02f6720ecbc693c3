"""Decode speed side by side on the CPU, in one run: tinygemma (eager / compiled x fp32 / bf16 / int8) against
llama.cpp (llama-cpp-python) on the exported f32 / f16 / q8_0 GGUF files, at batch 1 and 8, on the same checkpoint
and prompt, with the hardware's memory-bandwidth floor measured in the same run.

    python bench/gguf.py                                # gemma3-270m with random weights
    python bench/gguf.py --checkpoint runs/x/best --data data/tinystories   # trained: + int8/bf16 quality
    python bench/gguf.py --model tiny --new-tokens 8 --repeat 1             # a quick check of the script

Every decoder decodes greedily from the same prompt and produces exactly ``--new-tokens`` tokens per row (end of
text is ignored, so random weights cannot stop early); speed does not depend on the weights' values. Columns:

- tokens/s: new tokens of all rows over the whole call, prefill included (as bench/generate.py counts them),
  the median of ``--repeat`` runs after a warm-up (for compiled rows the warm-up is the compile);
- ms/token: wall time per decoding step, i.e. between two tokens of one row (batch / tokens/s);
- ATen ops/step: eager rows, the ATen calls dispatched per decoding step, counted with a TorchDispatchMode as
  the difference between a full call and a prefill-only one, over the steps. Compiled rows give the kernels
  one compiled step launches instead ("N kernels": ``tinygemma.decode.kernel_calls`` on inductor's generated
  code, the count the tests bound): under a TorchDispatchMode dynamo runs the step eagerly, so the mode cannot
  count a compiled step;
- weight bytes: what one step reads: every matrix it multiplies by (the tied head once) and the norms
  (``tinygemma.quant.weight_bytes``; for GGUF files, the sum of their tensors);
- % floor: decoding steps per second against the floor, streaming-read bytes/s (a ``sum`` over 256 MB, measured
  in this run) / weight bytes: what a decoder bound by reading its weights once per step could reach.

llama-cpp-python's high-level API decodes one sequence, so its "batch 8" rows run 8 sequences one after another
(marked "8 x 1"). "compiled" is tinygemma's ``generate(..., compile=True)``; :func:`decode` is the one place
that picks the decoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where its name would shadow the gguf package: it
# goes last instead, so that `import gguf` finds the package and `generate` (bench/generate.py) still imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import gguf
import llama_cpp
import numpy as np
import torch
from generate import OpCount, stream_bandwidth, timed  # bench/generate.py: the same measures
from torch._inductor.utils import run_and_get_code

from tinygemma.data.dataset import TokenDataset
from tinygemma.decode import kernel_calls
from tinygemma.eval.quality import quality
from tinygemma.generate import generate_ids, load_checkpoint
from tinygemma.gguf_export import export_gguf
from tinygemma.model import Gemma3, load_model_config
from tinygemma.quant import for_inference, weight_bytes
from tinygemma.rundir import resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer

PROMPT = "Once upon a time there was a pumpkin."


@dataclass
class Row:
    decoder: str
    weights: str
    batch: int
    tokens_per_s: float
    weight_bytes: int
    aten_ops_per_step: float | None = None
    kernels: int | None = None
    floor_fraction: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return self.tokens_per_s / (1 if self.decoder.startswith("llama.cpp") else self.batch)


def machine_line(threads: int) -> str:
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {threads} threads, load {load}; torch {torch.__version__}, "
            f"llama-cpp-python {llama_cpp.__version__}")


# -- tinygemma ---------------------------------------------------------------------------------------------------
def decode(model: Gemma3, prompts: list[list[int]], n: int, compiled: bool) -> list[list[int]]:
    """Greedy decoding of ``n`` tokens per row: the one place that picks tinygemma's decoder."""
    return generate_ids(model, prompts, SamplingConfig(max_new_tokens=n, greedy=True), compile=compiled)


def ops_per_step(model: Gemma3, prompts: list[list[int]], n: int) -> float:
    """ATen ops an eager decoding step dispatches: a call of ``n`` tokens less a prefill-only call (1 token, which
    runs no step), over the ``n - 1`` steps."""
    counts = []
    for k in (1, n):
        with OpCount() as c:
            decode(model, prompts, k, compiled=False)
        counts.append(c.ops)
    return (counts[1] - counts[0]) / (n - 1)


def tinygemma_row(model: Gemma3, weights: str, prompts: list[list[int]], n: int, compiled: bool,
                  repeat: int) -> Row:
    torch._dynamo.reset()  # each configuration compiles afresh: no recompile limit is reached across them
    _, codes = run_and_get_code(decode, model, prompts, n, compiled)  # warm-up; for compiled rows, the compile
    calls = kernel_calls(codes[-1]) if compiled and codes else None
    kernels = None if calls is None else len(calls)
    rate = len(prompts) * n / timed(lambda: decode(model, prompts, n, compiled), "cpu", repeat)
    ops = None if compiled else ops_per_step(model, prompts, n)
    return Row("tinygemma " + ("compiled" if compiled else "eager"), weights, len(prompts), rate,
               weight_bytes(model), ops, kernels)


# -- llama.cpp ---------------------------------------------------------------------------------------------------
def gguf_weight_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def llama_cpp_row(path: Path, weights: str, prompt: list[int], n: int, sequences: int, threads: int,
                  repeat: int) -> Row:
    """llama.cpp's greedy decoding, the prompt in one batch then one token per call; ``sequences`` one after
    another."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)

    def run() -> None:
        for _ in range(sequences):
            llm.reset()
            llm.eval(prompt)
            for _ in range(n):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    run()  # warm-up
    rate = sequences * n / timed(run, "cpu", repeat)
    return Row("llama.cpp" + (f" ({sequences} x 1)" if sequences > 1 else ""), weights, sequences, rate,
               gguf_weight_bytes(path))


# -- the run -----------------------------------------------------------------------------------------------------
def quality_table(ckpt: Path, data: str, positions: int) -> dict:
    fp32 = load_checkpoint(ckpt)
    tokens = TokenDataset(data, "val", vocab_size=fp32.config.vocab_size).tokens
    return {dtype: quality(fp32, for_inference(copy.deepcopy(fp32), dtype), tokens, positions)
            for dtype in ("bf16", "int8")}


def run(args, ckpt: Path, tmp: Path) -> list[Row]:
    tok = Tokenizer()
    prompt = [tok.eot_id] + tok.encode(PROMPT)
    fp32 = load_checkpoint(ckpt)
    fp32.config.eot_token_id = -1  # every run decodes all --new-tokens
    models = {d: fp32 if d == "fp32" else for_inference(copy.deepcopy(fp32), d) for d in ("fp32", "bf16", "int8")}
    rows = []
    for batch in args.batches:
        for compiled in (False, True):
            for dtype, model in models.items():
                rows.append(tinygemma_row(model, dtype, [prompt] * batch, args.new_tokens, compiled, args.repeat))
                print_row(rows[-1])
        for dtype in ("f32", "f16", "q8_0"):
            path = tmp / f"model-{dtype}.gguf"
            if not path.exists():
                export_gguf(ckpt, path, dtype)
            rows.append(llama_cpp_row(path, dtype, prompt, args.new_tokens, batch, args.threads, args.repeat))
            print_row(rows[-1])
    return rows


def print_row(r: Row) -> None:
    print(f"{r.decoder}, {r.weights}, batch {r.batch}: {r.tokens_per_s:.1f} tokens/s", flush=True)


def table(rows: list[Row]) -> str:
    out = ["| decoder | weights | batch | tokens/s | ms/token | ATen ops/step | weight MB | % floor |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ops = "" if r.aten_ops_per_step is None else f"{r.aten_ops_per_step:,.0f}"
        if r.kernels is not None:
            ops = f"{r.kernels} kernels"
        out.append(f"| {r.decoder} | {r.weights} | {r.batch} | {r.tokens_per_s:,.1f} | {1000 / r.steps_per_s:.1f} | "
                   f"{ops or '-'} | {r.weight_bytes / 1e6:,.1f} | {r.floor_fraction:.0%} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint or run folder (default: --model with random weights)")
    p.add_argument("--model", default="gemma3-270m", help="preset for random weights (default: gemma3-270m)")
    p.add_argument("--data", help="prepared data folder: also measure bf16/int8 quality on its val split")
    p.add_argument("--positions", type=int, default=10_000, help="quality: the val split's first N positions")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", metavar="FILE", help="also write the machine, floor, rows and quality as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    print(machine, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = resolve_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(0)
            ckpt = Gemma3(load_model_config(args.model)).save_pretrained(Path(tmp) / f"{args.model}-random")
        stream = stream_bandwidth("cpu", 5)
        rows = run(args, ckpt, Path(tmp))
        qual = quality_table(ckpt, args.data, args.positions) if args.data else None
    for r in rows:
        r.floor_fraction = r.steps_per_s / (stream / r.weight_bytes)
    print(f"\n{machine}\n{ckpt.name}, prompt {PROMPT!r}, {args.new_tokens} new tokens, greedy; streaming read "
          f"{stream / 1e9:.1f} GB/s (load at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print(table(rows))
    if qual:
        print("\n| weights | top-1 agreement with fp32 | loss fp32 | loss | delta (nats) |\n"
              "| --- | ---: | ---: | ---: | ---: |")
        for dtype, q in qual.items():
            print(f"| {dtype} | {q['top1_agreement']:.2%} | {q['loss_fp32']:.4f} | {q['loss_q']:.4f} | "
                  f"{q['loss_delta']:+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "checkpoint": str(ckpt), "new_tokens": args.new_tokens, "stream_bytes_per_s": stream,
            "rows": [asdict(r) for r in rows], "quality": qual}, indent=2) + "\n")


if __name__ == "__main__":
    main()
