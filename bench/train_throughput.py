"""Training throughput: this trainer's step vs transformers' Gemma3ForCausalLM vs a tutorial-style step.

    python bench/train_throughput.py                  # CPU: small preset, block 128, micro 2 and 4
    python bench/train_throughput.py --device cuda    # GPU: gemma3-270m, blocks 128/512/1024, micro 32..256,
                                                      # compiled too

Variants (same model config, same micro-batch, one optimizer step per micro-batch):
  tinygemma          Trainer.train_step itself, the step `tinygemma train` runs (batches drawn from the prepared
                     sample, fp32 master weights, bf16 autocast on CUDA, fused AdamW, no decay on norms/embeddings,
                     the loss/grad-norm host sync, the LR schedule)
  tinygemma+compile  the same, torch.compile'd (the trainer's default on CUDA)
  hf                 transformers' Gemma3ForCausalLM, attn_implementation="sdpa", bf16 autocast on CUDA, fused AdamW
  hf+compile         the same, torch.compile'd
  tutorial           the tutorial's style: the whole model in bf16, masked-matmul attention, plain AdamW
Each (variant, micro-batch) runs in its own process, so its peak memory is its own (CUDA: max allocated;
CPU: max RSS). The trainer reads the first 2,000 stories of each split of TinyStories (TINYSTORIES_DIR, or the
hub), prepared once; the baselines get random tokens: throughput does not depend on them. MFU uses the trainer's
FLOPs per token and peak table (CPU: only with --peak-tflops). A block longer than the model's sliding window
takes the masked attention path (a window mask on the sliding layers), which the GPU defaults include (block 1024
with gemma3-270m's window of 512); the table marks those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

from tinygemma.data.config import PrepareConfig
from tinygemma.data.prepare import prepare
from tinygemma.model import Gemma3, apply_rope, load_model_config
from tinygemma.train.config import TrainConfig
from tinygemma.train.hardware import peak_flops, peak_memory_mb
from tinygemma.train.optim import Precision
from tinygemma.train.trainer import Trainer

VARIANTS = ("tinygemma", "tinygemma+compile", "hf", "hf+compile", "tutorial")


def tutorial_attention(self, x, cos, sin, mask=None, cache=None):
    """The tutorial's attention: explicit scores, masked_fill, softmax, matmul (K/V heads repeated)."""
    B, T, _ = x.shape
    q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
    k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
    v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * self.scale
    allowed = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return self.o_proj((weights @ v).transpose(1, 2).reshape(B, T, -1))


def time_trainer(spec: dict, model_cfg) -> dict:
    """Time ``Trainer.train_step``, the step users run, on the prepared sample."""
    steps, warmup = spec["steps"], spec["warmup"]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer({"data": spec["data"], "out": out, "model": spec["model"], "device": spec["device"],
                           "precision": spec["precision"], "compile": spec["variant"].endswith("+compile"),
                           "block_size": spec["block"], "micro_batch": spec["micro"], "grad_accum": 1,
                           "max_steps": warmup + steps, "max_tokens": None, "eval_batches": 1, "progress": False,
                           "peak_tflops": spec["peak_tflops"]}, recipe="adamw")  # as the baselines
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for _ in range(warmup):  # compilation, allocator and kernel warm-up
            trainer.train_step()
        sync()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        tokens_per_s = steps * spec["micro"] * spec["block"] / (time.perf_counter() - start)
        trainer.close()
    peak = trainer.peak_total
    mfu = tokens_per_s * model_cfg.flops_per_token(spec["block"]) / peak if peak else None
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_mb": peak_memory_mb(trainer.device)}


def child(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg = TrainConfig(device=spec["device"], max_steps=1, max_tokens=None, peak_tflops=spec["peak_tflops"],
                      precision=spec["precision"])
    model_cfg = load_model_config(spec["model"])
    variant, micro, block = spec["variant"], spec["micro"], spec["block"]
    autocast = Precision(cfg.precision, device).autocast
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if variant.startswith("tinygemma"):
        return time_trainer(spec, model_cfg)
    model = Gemma3(model_cfg)
    if variant.startswith("hf"):
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
        hf.to(device).train()
        optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        runner = torch.compile(hf) if variant.endswith("+compile") else hf

        def step(x, y):
            with autocast():
                loss = runner(input_ids=x, labels=x).loss  # transformers shifts the labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        for layer in model.model.layers:
            layer.self_attn.forward = types.MethodType(tutorial_attention, layer.self_attn)
        model.to(device=device, dtype=torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def step(x, y):
            with autocast():
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    data = torch.randint(0, model_cfg.vocab_size, (spec["warmup"] + spec["steps"], micro, block + 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(spec["warmup"]):  # compilation, allocator and kernel warm-up
        step(data[i, :, :-1], data[i, :, 1:])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        step(data[i, :, :-1], data[i, :, 1:])
    sync()
    tokens_per_s = spec["steps"] * micro * block / (time.perf_counter() - start)
    peak = peak_flops(cfg, device)
    mfu = tokens_per_s * model_cfg.flops_per_token(block) / peak if peak else None
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_mb": peak_memory_mb(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="preset (default: gemma3-270m on CUDA, small on CPU)")
    p.add_argument("--block-sizes", default=None, help="comma-separated (default: 128,512,1024 on CUDA; 128 CPU)")
    p.add_argument("--micro-batches", default=None, help="comma-separated (default: 32,64,128,256 on CUDA at "
                                                         "block 128, fewer rows per step at longer blocks; 2,4 CPU)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)} "
                                                    "(default: all on CUDA; no compiled ones on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 CUDA, 1 CPU)")
    p.add_argument("--precision", default="auto", help="tinygemma and hf variants: auto (bf16 autocast on CUDA, "
                                                       "fp32 on CPU) | bf16 (autocast) | fp32")
    p.add_argument("--repeats", type=int, default=None, help="rounds over all variants, best kept (default: 1 CUDA, "
                                                             "2 CPU: a shared CPU is noisy)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: trainer's table)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    cuda = args.device == "cuda"
    model = args.model or ("gemma3-270m" if cuda else "small")
    variants = (args.variants or ",".join(v for v in VARIANTS if cuda or "compile" not in v)).split(",")
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup if args.warmup is not None else (5 if cuda else 1)
    window = load_model_config(model).sliding_window
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else f", {os.cpu_count()} CPUs")
          + f"; model {model} (window {window}); precision {args.precision}; {steps} timed steps after "
          f"{warmup}; torch {torch.__version__}")
    data = tempfile.mkdtemp(prefix="tinygemma-bench-data-")
    prepare(PrepareConfig(source=os.environ.get("TINYSTORIES_DIR", "roneneldan/TinyStories"), out=data,
                          max_stories=2000))
    base = {"device": args.device, "model": model, "steps": steps, "warmup": warmup, "peak_tflops": args.peak_tflops,
            "precision": args.precision, "data": data}
    results = measure(base, shapes(args, cuda), variants, args.repeats or (1 if cuda else 2))
    print_table(results, window)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def shapes(args: argparse.Namespace, cuda: bool) -> list[tuple[int, int]]:
    """(block, micro-batch) pairs: the given micro-batches at every block, or by default the same tokens per
    micro-step at every block (CUDA: 4K-32K; CPU: 256-512)."""
    blocks = [int(b) for b in (args.block_sizes or ("128,512,1024" if cuda else "128")).split(",")]
    if args.micro_batches:
        return [(b, int(m)) for b in blocks for m in args.micro_batches.split(",")]
    tokens = (4096, 8192, 16384, 32768) if cuda else (256, 512)
    return [(b, t // b) for b in blocks for t in tokens if t >= b]


def measure(base: dict, pairs: list[tuple[int, int]], variants: list[str], repeats: int) -> list[dict]:
    """Every (variant, block, micro) in its own process, ``repeats`` interleaved rounds, the best kept."""
    best: dict[tuple[str, int, int], dict] = {}
    for round_ in range(repeats):  # interleaved rounds, so that a burst of outside load hits every variant
        for block, micro in pairs:
            for variant in variants:
                spec = {**base, "variant": variant, "block": block, "micro": micro}
                key, where = (variant, block, micro), f"round {round_ + 1} {variant:<18} {block:>5} x {micro:>4}"
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
                    best.setdefault(key, {**spec, "error": error})
                    print(f"  {where}: failed ({error})", flush=True)
                    continue
                r = {**spec, **json.loads(lines[-1][7:])}
                if best.get(key, {}).get("tokens_per_s", 0) < r["tokens_per_s"]:
                    best[key] = r
                print(f"  {where}: {r['tokens_per_s']:>12,.0f} tok/s", flush=True)
    return list(best.values())


def print_table(results: list[dict], window: int) -> None:
    print(f"\n{'variant':<18}{'block':>6}{'micro':>6}{'masked':>7}{'tokens/s':>14}{'MFU':>8}{'peak MB':>10}"
          f"{'vs hf':>8}{'vs tutorial':>13}")
    for r in results:
        masked = "yes" if r["block"] > window else "no"
        if "error" in r:
            print(f"{r['variant']:<18}{r['block']:>6}{r['micro']:>6}{masked:>7}  failed: {r['error']}")
            continue
        same = {x["variant"]: x["tokens_per_s"] for x in results
                if (x["block"], x["micro"]) == (r["block"], r["micro"]) and "error" not in x}
        ratio = {base: f"{r['tokens_per_s'] / same[base]:.2f}x" if base in same else "-" for base in ("hf", "tutorial")}
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<18}{r['block']:>6}{r['micro']:>6}{masked:>7}{r['tokens_per_s']:>14,.0f}{mfu:>8}"
              f"{r['peak_mem_mb']:>10,.0f}{ratio['hf']:>8}{ratio['tutorial']:>13}")


if __name__ == "__main__":
    main()
