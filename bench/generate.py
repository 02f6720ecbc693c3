"""Decode speed: tinygemma's KV-cache generation vs the tutorial's method (re-run the whole sequence
for every new token) and transformers' ``generate``, at batch 1 and 32, 200 new tokens, for the
``small`` preset and gemma3-270m (random weights: speed does not depend on them).

    python bench/generate.py                 # CPU or CUDA, whichever is there
    python bench/generate.py --models small --batches 1

tokens/s counts generated tokens (batch x new tokens) over the whole call, prefill included; every
method decodes greedily from the same prompt and produces exactly ``--new-tokens`` tokens per row.
On the CPU the tutorial's method is too slow to run in full at batch 32: unless ``--full-baseline``
is given, its forward passes there are timed at ``--baseline-points`` sequence lengths spread over
the generation and the total is the trapezoid integral over all steps (marked "est."); batch 1 always
runs in full. transformers runs at batch 1 only on the CPU (``--hf-batch32-cpu`` adds batch 32).
The KV-cache decoder and transformers report the median of ``--repeat`` runs (batch 1, or any batch on
CUDA); the tutorial's method runs once. On a shared CPU, ``--threads 1`` gives steadier numbers.
At batch 1 the "bandwidth floor" is the hardware's, measured in the same run (see :func:`bandwidth_floor`):
the device's streaming-read rate (a large ``sum``) divided by the bytes of weights a decode step must read.
No batch-1 decoder can beat it where reading the weights is the limit.
The KV-cache decoder (:class:`tinygemma.decode.Decoder`) also runs compiled (unless ``--no-compile``), one
graph per decode step: CUDA graphs on a GPU; on a CPU once per inductor setting in ``--cpu-modes`` (default,
cpp_wrapper, max-autotune-no-cudagraphs), to see which is fastest. The compile is done in a warm-up call and
not timed; the compiled column times the decoder's steps (prefill included, host copies left out). Each row also
gives the ATen ops of one eager decode step (counted with a TorchDispatchMode) and the kernels of one compiled
step (the calls in inductor's generated code: fused kernels, matmuls and other ATen ops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from tinygemma.decode import GREEDY, Decoder, decode_step, kernel_calls
from tinygemma.generate import generate_ids
from tinygemma.model import Gemma3, load_model_config
from tinygemma.quant import weight_bytes
from tinygemma.sampling import SamplingConfig

PROMPT = "Once upon a time there was a pumpkin."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1) -> float:
    """Median wall time of ``repeat`` calls (a shared machine is noisy)."""
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def tutorial_generate(model: Gemma3, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The tutorial's loop: the full sequence through the model for every token, argmax of the last."""
    for _ in range(new_tokens):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.inference_mode()
def tutorial_estimate(model: Gemma3, ids: torch.Tensor, new_tokens: int, points: int, device: str) -> float:
    """Seconds for tutorial_generate, from forward passes timed at ``points`` lengths (trapezoid rule)."""
    B, P = ids.shape
    lengths = sorted({P + round(i * (new_tokens - 1) / (points - 1)) for i in range(points)})
    times = []
    for n in lengths:
        x = torch.randint(0, model.config.vocab_size, (B, n), device=device)
        model(x)[:, -1].argmax(-1)  # warm-up at this shape
        times.append(timed(lambda x=x: model(x)[:, -1].argmax(-1), device))
    total = 0.0
    for (n0, t0), (n1, t1) in zip(zip(lengths, times, strict=True), zip(lengths[1:], times[1:], strict=True),
                                  strict=False):
        total += (t0 + t1) / 2 * (n1 - n0)
    return total + times[-1]  # the integral covers steps P..P+N-2; add the last step


def stream_bandwidth(device: str, repeat: int) -> float:
    """Bytes/s of a streaming read: a ``sum`` over a buffer far larger than any cache (256 MB on a CPU, 2 GB on a
    GPU), one kernel, so launch overhead does not count."""
    n = (2 if device.startswith("cuda") else 0.25) * 2**30 // 4
    buf = torch.ones(int(n), device=device)
    buf.sum()
    return buf.numel() * 4 / timed(buf.sum, device, repeat)


def bandwidth_floor(model: Gemma3, device: str, repeat: int) -> float:
    """The most tokens/s a batch-1 decoder reaches on this device where reading the weights is the limit."""
    return stream_bandwidth(device, repeat) / weight_bytes(model)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def eager_ops_per_step(model: Gemma3, rows: int, prompt: list[int]) -> int:
    """ATen ops one eager decode step dispatches (greedy rows)."""
    decoder = Decoder(model, rows, len(prompt) + 2, compile=False)
    for _ in range(rows):
        decoder.add(prompt, SamplingConfig(max_new_tokens=2, greedy=True))
    count = OpCount()
    with count, torch.inference_mode():
        decode_step(decoder.model, decoder.state, GREEDY)
    return count.ops


def decoder_speed(model: Gemma3, prompts: list[list[int]], cfg: SamplingConfig, cpu_mode: str, device: str,
                  repeat: int) -> tuple[float, int | None]:
    """tokens/s of the compiled Decoder and the kernels of its step; the first call compiles (untimed)."""
    decoder = Decoder(model, len(prompts), len(prompts[0]) + cfg.max_new_tokens, compile=True, cpu_mode=cpu_mode)

    def call(first: bool = False) -> list[str] | None:
        slots = [decoder.add(p, cfg) for p in prompts]
        kernels = kernel_calls(run_and_get_code(decoder.step)[1][-1]) if first else None
        for _ in range(cfg.max_new_tokens - first):
            decoder.step()
        for s in slots:
            decoder.remove(s)
        return kernels

    kernels = call(first=True)
    return len(prompts) * cfg.max_new_tokens / timed(call, device, repeat), None if kernels is None else len(kernels)


def run(model_name: str, batches: list[int], args, device: str, dtype: torch.dtype, tokenizer_ids: list[int]) -> list:
    torch.manual_seed(0)
    model = Gemma3(load_model_config(model_name)).to(device=device, dtype=dtype).eval()
    n = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    rows = []
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    # random weights could draw <|endoftext|> and stop early: every method must produce all tokens
    model.config.eot_token_id = -1
    for B in batches:
        prompts = [tokenizer_ids] * B
        ids = torch.tensor(prompts, device=device)
        rep = args.repeat if B == 1 or device.startswith("cuda") else 1  # batch 32 on a CPU is long enough
        generate_ids(model, prompts, SamplingConfig(max_new_tokens=4, greedy=True))  # warm-up
        kv = timed(lambda prompts=prompts: generate_ids(model, prompts, cfg), device, rep)
        res = {"model": model_name, "batch": B, "kv_cache": B * n / kv}
        if B == 1:
            res["floor"] = bandwidth_floor(model, device, max(args.repeat, 5))
        res["eager_ops"] = eager_ops_per_step(model, B, tokenizer_ids)
        if not args.no_compile:
            modes = args.cpu_modes.split(",") if device == "cpu" else ["default"]
            speeds = {m: decoder_speed(model, prompts, cfg, m, device, rep) for m in modes}
            res["compiled_by_mode"] = {m: v for m, (v, _) in speeds.items()}
            res["kv_cache_compiled"] = max(res["compiled_by_mode"].values())
            res["kernels"] = next((k for _, k in speeds.values() if k is not None), "?")
        full = args.full_baseline or device.startswith("cuda") or B == 1
        if full:
            tutorial_generate(model, ids, 2)
            t = timed(lambda ids=ids: tutorial_generate(model, ids, n), device)
        else:
            t = tutorial_estimate(model, ids, n, args.baseline_points, device)
        res["tutorial"], res["tutorial_estimated"] = B * n / t, not full
        if hf is not None and (B == 1 or device.startswith("cuda") or args.hf_batch32_cpu):
            mask = torch.ones_like(ids)
            gen = lambda ids=ids, mask=mask, k=n: hf.generate(ids, attention_mask=mask, do_sample=False,
                                                              max_new_tokens=k, min_new_tokens=k)
            with torch.inference_mode():
                gen()  # warmed up on the timed length: its caches and kernels for every shape it meets
                res["transformers"] = B * n / timed(gen, device, rep)
        rows.append(res)
        print_row(res)
    return rows


def print_row(r: dict) -> None:
    est = " (est.)" if r["tutorial_estimated"] else ""
    parts = [f"{r['model']:<12} batch {r['batch']:>3}: KV cache {r['kv_cache']:9.1f} tok/s"]
    parts.append(f"eager step {r['eager_ops']} ATen ops")
    if "kv_cache_compiled" in r:
        modes = ", ".join(f"{m} {v:.1f}" for m, v in r["compiled_by_mode"].items())
        parts.append(f"compiled {r['kv_cache_compiled']:9.1f} tok/s ({modes}; {r['kernels']} kernels/step)")
    parts.append(f"tutorial {r['tutorial']:8.1f} tok/s{est} -> {r['kv_cache'] / r['tutorial']:6.1f}x")
    if "transformers" in r:
        parts.append(f"transformers {r['transformers']:8.1f} tok/s -> {r['kv_cache'] / r['transformers']:5.2f}x")
    if "kv_cache_compiled" in r:
        parts.append(f"best/tutorial {max(r['kv_cache'], r['kv_cache_compiled']) / r['tutorial']:6.1f}x")
    if "floor" in r:
        best = max(r["kv_cache"], r.get("kv_cache_compiled", 0.0))
        parts.append(f"bandwidth floor {r['floor']:8.1f} tok/s (best = {best / r['floor']:.0%} of it)")
    print(" | ".join(parts), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small,gemma3-270m")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--full-baseline", action="store_true", help="run the tutorial's method in full on the CPU too")
    p.add_argument("--baseline-points", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--hf-batch32-cpu", action="store_true", help="also time transformers at batch > 1 on the CPU")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-modes", default="default",
                   help="inductor settings to time the compiled decoder with on a CPU, comma-separated: default, "
                        "cpp_wrapper, max-autotune-no-cudagraphs")
    p.add_argument("--repeat", type=int, default=3, help="KV-cache and transformers runs: median of this many")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                            else torch.float32)
    from tinygemma.tokenizer import Tokenizer

    tok = Tokenizer()
    prompt = [tok.eot_id] + tok.encode(PROMPT)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy")
    for model_name in args.models.split(","):
        run(model_name, [int(b) for b in args.batches.split(",")], args, args.device, dtype, prompt)


if __name__ == "__main__":
    main()
