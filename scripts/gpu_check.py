"""The checks a GPU owner runs once (``scripts/gpu_check.sh``): every CUDA path of the pipeline, end to end.

    bash scripts/gpu_check.sh                      # CUDA, gemma3-270m: about 10 minutes on one H100
    bash scripts/gpu_check.sh --device cpu         # the same steps on the CPU with the tiny preset (the tests)
    bash scripts/gpu_check.sh --out runs/gpu-check --only versions,parity

Steps, in order: versions and capability; the SDPA backend of each attention kind; loss parity with transformers
(fp32, bf16, fp16; eager and compiled); ``prepare`` of the sample; 40 compiled default-recipe steps with
evaluations and checkpoints; SIGTERM + ``--resume auto`` diffed against an uninterrupted run; fp16 10 steps; a
long block (1024 x 8 on CUDA); ``torchrun --nproc-per-node 1`` (NCCL on CUDA, gloo on the CPU); ``generate`` eager
and compiled; ``serve`` answering one streamed request; ``bench/train_throughput.py`` and ``bench/generate.py``.
It stops at the first failure, keeps every step's output in ``OUT/NN-step.log`` and prints a summary table (also
``OUT/summary.md``). A step that does not apply to the device (fp16 on a CPU) is "skipped", with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Sizes:
    """What each step runs: the real model on CUDA, the tiny preset on the CPU (minutes, not hours)."""

    model: str
    block: int
    micro: int
    steps: int
    long_block: int
    long_micro: int
    new_tokens: int
    compile: bool
    fp16_steps: int
    fp16_micro: int
    bench: list[list[str]] = field(default_factory=list)


def sizes(device: str) -> Sizes:
    if device == "cuda":
        return Sizes("gemma3-270m", 512, 16, 40, 1024, 8, 200, True, 10, 16, bench=[
            ["bench/train_throughput.py", "--device", "cuda", "--variants", "tinygemma+compile,hf+compile"],
            ["bench/generate.py", "--models", "gemma3-270m", "--batches", "1,32"]])
    return Sizes("tiny", 64, 4, 40, 256, 2, 16, False, 2, 1, bench=[
        ["bench/train_throughput.py", "--device", "cpu", "--model", "tiny", "--variants", "tinygemma,tutorial",
         "--steps", "1", "--warmup", "0", "--repeats", "1", "--block-sizes", "64", "--micro-batches", "2"],
        ["bench/generate.py", "--device", "cpu", "--models", "tiny", "--batches", "1", "--new-tokens", "8",
         "--no-hf", "--no-compile", "--repeat", "1"]])


class Failed(Exception):
    pass


@dataclass
class Check:
    args: argparse.Namespace
    size: Sizes
    out: Path
    rows: list[tuple[str, str, float, str]] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.out / "data"

    def log(self, name: str) -> Path:
        return self.out / f"{len(self.rows) + 1:02d}-{name}.log"

    def run(self, name: str, cmd: list[str], timeout: float = 900, env: dict | None = None) -> str:
        """Run ``cmd`` (output to the step's log); a non-zero exit fails the step."""
        with open(self.log(name), "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                  env={**os.environ, **(env or {})})
        if proc.returncode:
            raise Failed(f"exit {proc.returncode}: see {self.log(name).name}")
        return self.log(name).read_text()

    def tinygemma(self, name: str, *args: str, **kw) -> str:
        return self.run(name, [PY, "-m", "tinygemma", *args], **kw)

    def train_args(self, out: Path, steps: int, *extra: str) -> list[str]:
        s = self.size
        return ["train", "--data", str(self.data), "--out", str(out), "--model", s.model, "--device",
                self.args.device, "--block-size", str(s.block), "--micro-batch", str(s.micro), "--grad-accum", "1",
                "--max-steps", str(steps), "--eval-interval", str(max(1, steps // 2)), "--eval-batches", "2",
                "--log-interval", "5", "--no-progress", "--compile" if s.compile else "--no-compile", *extra]


def kill_at_step(cmd: list[str], metrics: Path, step: int, log: Path, timeout: float) -> None:
    """Start ``cmd``, SIGTERM it once ``metrics`` logs ``step``, wait for its clean stop."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + f"   (SIGTERM after step {step})\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    if code:
        raise Failed(f"the SIGTERM'd run exited {code}: see {log.name}")


# -- steps: each raises Failed, returns a short detail for the summary, or "skipped: why" -----------------------
def versions(c: Check) -> str:
    out = c.run("versions", [PY, __file__, "--child", "versions", "--device", c.args.device])
    return out.strip().splitlines()[-1]


def sdpa(c: Check) -> str:
    out = c.run("sdpa", [PY, __file__, "--child", "sdpa", "--device", c.args.device, "--model", c.size.model,
                         "--block", str(c.size.long_block)])
    return out.strip().splitlines()[-1]


def parity(c: Check) -> str:
    out = c.run("parity", [PY, __file__, "--child", "parity", "--device", c.args.device, "--model", c.size.model,
                           "--block", str(c.size.block)] + (["--compiled"] if c.size.compile else []))
    return out.strip().splitlines()[-1]


def prepare(c: Check) -> str:
    source = os.environ.get("TINYSTORIES_DIR", "roneneldan/TinyStories")
    c.tinygemma("prepare", "prepare", "--source", source, "--out", str(c.data), "--force")
    return json.loads((c.data / "meta.json").read_text()).get("source", source)


def train(c: Check) -> str:
    c.tinygemma("train", *c.train_args(c.out / "run", c.size.steps))
    state = json.loads((c.out / "run" / f"checkpoint-{c.size.steps}" / "trainer_state.json").read_text())
    return f"{state['step']} steps, {state['tokens']:,} tokens, best val loss {state['best_val_loss']:.4f}"


def resume(c: Check) -> str:
    steps, name = c.size.steps // 2, "resume"
    extra = ["--save-interval", str(steps // 4), "--deterministic"]
    c.tinygemma(name, *c.train_args(c.out / "straight", steps, *extra))
    cmd = [PY, "-m", "tinygemma", *c.train_args(c.out / "stopped", steps, *extra)]
    kill_at_step(cmd, c.out / "stopped" / "metrics.jsonl", steps // 2, c.log(name), timeout=900)
    c.run(name, cmd + ["--resume", "auto"])
    a, b = (c.out / d / f"checkpoint-{steps}" / "model.safetensors" for d in ("straight", "stopped"))
    return c.run(name, [PY, __file__, "--child", "diff", str(a), str(b)]).strip().splitlines()[-1]


def fp16(c: Check) -> str:
    """fp16 autocast + loss scaling, the path of GPUs without bf16 (T4, V100): 10 steps that must stay finite."""
    n = c.size.fp16_steps  # CPUs emulate fp16 matmuls slowly: a few small steps show the path works there
    c.tinygemma("fp16", *c.train_args(c.out / "fp16", n, "--precision", "fp16"), "--micro-batch",
                str(c.size.fp16_micro))
    state = json.loads((c.out / "fp16" / f"checkpoint-{n}" / "trainer_state.json").read_text())
    return f"{n} steps, best val loss {state['best_val_loss']:.4f}, {state['overflow_steps']} overflow steps skipped"


def long_block(c: Check) -> str:
    s = c.size
    c.tinygemma("long_block", *c.train_args(c.out / "long", 5), "--block-size", str(s.long_block), "--micro-batch",
                str(s.long_micro))
    return f"block {s.long_block} x {s.long_micro}, 5 steps"


def torchrun(c: Check) -> str:
    port = free_port()
    c.run("torchrun", [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                       "--master-port", str(port), "-m", "tinygemma", *c.train_args(c.out / "ddp", 10)])
    return "nccl" if c.args.device == "cuda" else "gloo"


def generate(c: Check) -> str:
    args = ["generate", str(c.out / "run"), "--prompt", "Once upon a time", "--seed", "0", "--device",
            c.args.device, "--max-new-tokens", str(c.size.new_tokens)]
    c.tinygemma("generate", *args)
    c.tinygemma("generate", *args, "--compile")
    return "eager and compiled"


def serve(c: Check) -> str:
    port, log = free_port(), c.log("serve")
    with open(log, "a") as f:
        proc = subprocess.Popen([PY, "-m", "tinygemma", "serve", str(c.out / "run"), "--port", str(port),
                                 "--device", c.args.device], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=300)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 16, "stream": True, "seed": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "data: [DONE]":
            raise Failed(f"no complete event stream: {events[-2:]}")
        return f"{len(events) - 1} streamed events"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench(c: Check) -> str:
    for cmd in c.size.bench:
        c.run("bench", [PY, *cmd], timeout=1800)
    return ", ".join(Path(cmd[0]).stem for cmd in c.size.bench)


STEPS = [versions, sdpa, parity, prepare, train, resume, fp16, long_block, torchrun, generate, serve, bench]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"serve exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise Failed("serve did not answer /health")


# -- the steps that run in a child process (their output is the step's log) ------------------------------------
def child_versions(args: argparse.Namespace) -> str:
    import torch

    if args.device != "cuda":
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        return (f"torch {torch.__version__}, CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                f"avx512_bf16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu)")
    major, minor = torch.cuda.get_device_capability()
    return (f"{torch.cuda.get_device_name()}, sm_{major}{minor}, torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, bf16 "
            f"{torch.cuda.is_bf16_supported(including_emulation=False)}, "
            f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")


def child_diff(args: argparse.Namespace) -> str:
    from safetensors.torch import load_file

    a, b = load_file(args.rest[0]), load_file(args.rest[1])
    if a.keys() != b.keys():
        raise SystemExit("different tensors")
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    if worst:
        raise SystemExit(f"resumed weights differ from the uninterrupted run's: max |diff| {worst:.3g}")
    return f"bit-identical ({len(a)} tensors)"


def child_parity(args: argparse.Namespace) -> str:
    """Our loss against transformers' on the same random-init weights and tokens: fp32 to 1e-4, and each
    low precision (autocast) against the fp32 loss to 0.02 nats, eager and (``--compiled``) compiled."""
    import tempfile
    from dataclasses import replace

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tinygemma.model import Gemma3, load_model_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    mc = load_model_config(args.model)
    # init wide enough that the logits are far from uniform (at 0.02 every loss is ln V, whatever the precision)
    ours = Gemma3(replace(mc, init_std=2 / mc.hidden_size**0.5)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").to(device)
    x = torch.randint(0, ours.config.vocab_size, (2, args.block + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def hf_loss(model):
        return F.cross_entropy(model(input_ids=inp).logits.float().flatten(0, 1), tgt.flatten())

    losses = {}
    with torch.no_grad():
        losses["fp32 ours"], losses["fp32 hf"] = ours(inp, tgt)[1].item(), hf_loss(hf).item()
        precisions = ["bf16", "fp16"] if args.device == "cuda" else ["bf16"]
        variants = [("ours", lambda: ours(inp, tgt)[1]), ("hf", lambda: hf_loss(hf))]
        if args.compiled:
            fast = torch.compile(ours)
            variants.append(("ours compiled", lambda: fast(inp, tgt)[1]))
        for prec in precisions:
            dtype = torch.bfloat16 if prec == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                for name, fn in variants:
                    losses[f"{prec} {name}"] = fn().item()
    ref = losses["fp32 hf"]
    for name, value in losses.items():
        print(f"{name:<22} {value:.6f}  ({value - ref:+.2e} vs transformers fp32)")
    bad = [n for n, v in losses.items() if abs(v - ref) > (1e-4 if n.startswith("fp32") else 0.02)]
    if bad:
        raise SystemExit(f"loss parity broken: {', '.join(bad)}")
    worst = max(abs(v - ref) for n, v in losses.items() if not n.startswith("fp32"))
    return f"fp32 {abs(losses['fp32 ours'] - ref):.1e}, low precision within {worst:.1e} nats ({', '.join(precisions)})"


def child_sdpa(args: argparse.Namespace) -> str:
    import torch

    from tinygemma.model import load_model_config
    from tinygemma.train.hardware import sdpa_backends

    mc = load_model_config(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    chosen = sdpa_backends(mc, args.block, dtype, torch.device(args.device))
    if args.device == "cuda" and torch.cuda.get_device_capability() >= (8, 0) and "math" in " ".join(chosen.values()):
        raise SystemExit(f"an attention kind falls back to the math kernel: {chosen}")
    return ", ".join(f"{kind}: {name}" for kind, name in chosen.items()) + f" (block {args.block})"


CHILDREN = {"versions": child_versions, "diff": child_diff, "parity": child_parity, "sdpa": child_sdpa}


def summary(rows: list[tuple[str, str, float, str]]) -> str:
    lines = ["| step | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {secs:.0f} | {detail} |" for name, status, secs, detail in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=None, help="folder for every output (default: runs/gpu-check-DEVICE)")
    p.add_argument("--only", default=None, help=f"comma-separated steps (default: all of "
                                                f"{','.join(s.__name__ for s in STEPS)})")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--block", type=int, help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(CHILDREN[args.child](args), flush=True)
        return 0
    steps = [s for s in STEPS if args.only is None or s.__name__ in args.only.split(",")]
    c = Check(args, sizes(args.device), Path(args.out or f"runs/gpu-check-{args.device}").resolve())
    c.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for step in steps:
        t0 = time.perf_counter()
        try:
            detail = step(c)
            status = "skipped" if detail.startswith("skipped") else "ok"
        except (Failed, subprocess.TimeoutExpired) as e:
            detail, status, failed = str(e), "FAILED", True
        c.rows.append((step.__name__, status, time.perf_counter() - t0, detail.removeprefix("skipped: ")))
        print(f"{step.__name__:<11} {status:<8} {c.rows[-1][2]:6.0f} s  {c.rows[-1][3]}", flush=True)
        if failed:
            break
    table = summary(c.rows)
    (c.out / "summary.md").write_text(table + "\n")
    print(f"\n{table}\n\noutputs: {c.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
