"""Load test for ``tinygemma serve``: concurrent streaming clients on loopback, at several client counts.

Starts ``tinygemma serve`` in a subprocess on 127.0.0.1 (never anything else), then for each count in
--clients (default 1, 8, 16, 50) runs that many clients at once for --duration-s seconds; a client refused
with 429 waits (Retry-After, jittered) and tries again. Every request must be answered (200, full SSE stream
ending in [DONE]) or refused with 429; none may exceed --request-timeout-s (hung), and /health must be ok and
idle afterwards. Each prompt is always sent with the same seed, so every answer to it must be the same text
whatever else was in the batch ("texts differ" counts the ones that are not). Reports aggregate tokens/s (and
its ratio to one client's), p50/p95 time to first token (TTFT) and latency, refused and hung per count, the
machine and its load, and in-process generation for comparison; ``--json FILE`` writes it all.

    python bench/serve_load.py                 # tiny preset, random weights
    python bench/serve_load.py --checkpoint runs/demo --clients 1,8,16,50 --duration-s 20 --json serve.json
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from tinygemma.generate import encode_prompts, load_checkpoint, stream
from tinygemma.model import Gemma3, load_model_config
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.openai import EXAMPLE_PROMPTS
from tinygemma.tokenizer import Tokenizer

HOST = "127.0.0.1"


@dataclass
class Outcome:
    status: int | str  # HTTP status, "hung" or an error name
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    prompt: int = -1  # which of EXAMPLE_PROMPTS
    text: str = ""


async def _request(client: httpx.AsyncClient, body: dict, t0: float) -> Outcome:
    ttft, tokens, done, pieces = None, 0, False, []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, time.perf_counter() - t0)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            msg = json.loads(data)
            if "error" in msg:
                return Outcome("stream error", time.perf_counter() - t0)
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            elif msg["choices"]:
                pieces.append(msg["choices"][0]["text"])
                if ttft is None and pieces[-1]:
                    ttft = time.perf_counter() - t0
    return Outcome(200 if done else "no [DONE]", time.perf_counter() - t0, ttft, tokens, text="".join(pieces))


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    try:
        out = await asyncio.wait_for(_request(client, body, t0), timeout)
    except asyncio.TimeoutError:
        out = Outcome("hung", time.perf_counter() - t0)
    except httpx.HTTPError as e:
        out = Outcome(type(e).__name__, time.perf_counter() - t0)
    out.prompt = EXAMPLE_PROMPTS.index(body["prompt"])
    return out


async def client_loop(url: str, clients: int, duration: float, body_for, timeout: float) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker(i: int) -> None:
            rng = random.Random(i)
            k = 0
            while time.perf_counter() < deadline:
                out = await one_request(client, body_for(i, k), timeout)
                outcomes.append(out)
                k += 1
                if out.status == 429:  # Retry-After is 1 s; jitter so that retries do not arrive in lockstep
                    await asyncio.sleep(rng.uniform(0.5, 1.5))

        await asyncio.gather(*(worker(i) for i in range(clients)))
        return outcomes, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarise(clients: int, outcomes: list[Outcome], wall: float, texts: dict[int, str]) -> dict:
    """The figures of one client count; ``texts`` holds each prompt's first answer (filled here), which every
    later answer to the same prompt (same seed) must repeat."""
    ok = [o for o in outcomes if o.status == 200]
    for o in ok:
        texts.setdefault(o.prompt, o.text)
    s = {"clients": clients, "requests": len(outcomes), "answered": len(ok),
         "texts_differ": sum(o.text != texts[o.prompt] for o in ok),
         "refused_429": sum(o.status == 429 for o in outcomes), "hung": sum(o.status == "hung" for o in outcomes),
         "other": sorted({str(o.status) for o in outcomes} - {"200", "429"}),
         "latency_p50": pct([o.latency for o in ok], 50), "latency_p95": pct([o.latency for o in ok], 95),
         "ttft_p50": pct([o.ttft for o in ok if o.ttft is not None], 50),
         "ttft_p95": pct([o.ttft for o in ok if o.ttft is not None], 95),
         "tokens": sum(o.tokens for o in ok), "wall_s": wall}
    s["tokens_per_s"] = s["tokens"] / wall
    decode = [o.tokens / (o.latency - o.ttft) for o in ok if o.ttft is not None and o.latency > o.ttft and o.tokens > 1]
    s["per_request_tokens_per_s_p50"] = pct(decode, 50)
    return s


def print_summary(s: dict) -> None:
    print(f"\n[{s['clients']} clients] {s['requests']} requests in {s['wall_s']:.1f} s: {s['answered']} answered, "
          f"{s['refused_429']} refused (429), {s['hung']} hung, {s['texts_differ']} texts differ, "
          f"other: {s['other'] or 'none'}", flush=True)
    print(f"  latency p50 {s['latency_p50'] * 1000:.0f} ms, p95 {s['latency_p95'] * 1000:.0f} ms; "
          f"TTFT p50 {s['ttft_p50'] * 1000:.0f} ms, p95 {s['ttft_p95'] * 1000:.0f} ms")
    print(f"  {s['tokens']} tokens: {s['tokens_per_s']:.1f} tokens/s aggregate, "
          f"{s['per_request_tokens_per_s_p50']:.1f} tokens/s per request (p50, after the first token)", flush=True)


def print_table(levels: list[dict]) -> None:
    one = next((s["tokens_per_s"] for s in levels if s["clients"] == 1), None)
    print("\n| clients | requests | answered | refused (429) | hung | texts differ | tokens/s | × 1 client "
          "| TTFT p50 / p95 ms | latency p50 / p95 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in levels:
        ratio = f"{s['tokens_per_s'] / one:.2f}" if one else "–"
        print(f"| {s['clients']} | {s['requests']} | {s['answered']} | {s['refused_429']} | {s['hung']} "
              f"| {s['texts_differ']} | {s['tokens_per_s']:.1f} | {ratio} "
              f"| {s['ttft_p50'] * 1000:.0f} / {s['ttft_p95'] * 1000:.0f} "
              f"| {s['latency_p50'] * 1000:.0f} / {s['latency_p95'] * 1000:.0f} |")


def machine() -> str:
    """The CPU's name and cores, and torch's version."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def direct_tokens_per_s(checkpoint: Path, max_tokens: int, seconds: float = 5.0) -> float:
    """In-process generation of the same requests, no HTTP: what the server could at best give one client.

    It runs in a worker thread, as in the server: on a busy CPU, torch in the main thread (whose OpenMP
    team spins on every op) was several times slower here than in a thread.
    """
    model, tok = load_checkpoint(checkpoint), Tokenizer()
    result = []

    def work() -> None:
        for _ in stream(model, encode_prompts(tok, ["x"]), SamplingConfig(max_new_tokens=8)):  # warm-up
            pass
        n, k, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ids = encode_prompts(tok, [EXAMPLE_PROMPTS[k % 5]])
            for _ in stream(model, ids, SamplingConfig(max_new_tokens=max_tokens, temperature=0.8, top_k=50)):
                n += 1
            k += 1
        result.append(n / (time.perf_counter() - t0))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not answer /health")


def client_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of client counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be positive, got {text!r}")
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run folder (default: tiny preset, random weights)")
    p.add_argument("--clients", type=client_counts, default=[1, 8, 16, 50], help="client counts, e.g. 1,8,16,50")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of load per client count")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-rows", type=int, default=16, help="the server's --batch-rows")
    p.add_argument("--queue", type=int, default=64, help="the server's --queue")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request slower than this is 'hung'")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else None
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = Gemma3(load_model_config("tiny")).save_pretrained(Path(tmp) / "tiny")
        port = free_port()
        url = f"http://{HOST}:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "tinygemma", "serve", str(ckpt), "--host", HOST, "--port",
                                 str(port), "--batch-rows", str(args.batch_rows), "--queue", str(args.queue),
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, proc)
            # each prompt always with the same seed: its text must not depend on what else is in the batch
            body = lambda i, k: {"prompt": EXAMPLE_PROMPTS[(i + k) % 5], "max_tokens": args.max_tokens,
                                 "temperature": 0.8, "top_k": 50, "seed": (i + k) % 5, "stream": True,
                                 "stream_options": {"include_usage": True}}
            httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=60)  # warm-up
            print(f"server: {ckpt} on {url}, --batch-rows {args.batch_rows} --queue {args.queue}; "
                  f"requests of {args.max_tokens} tokens, streamed")
            print(f"machine: {machine()}; load average before: {load_before[0]:.2f}", flush=True)
            levels, texts = [], {}
            for n in args.clients:
                outcomes, wall = asyncio.run(client_loop(url, n, args.duration_s, body, args.request_timeout_s))
                levels.append(summarise(n, outcomes, wall, texts))
                print_summary(levels[-1])
            time.sleep(0.5)
            health = wait_healthy(url, proc, timeout=10)
            idle = health["status"] == "ok" and health["active"] == 0
            print(f"\nserver after the load: status {health['status']}, active {health['active']}, "
                  f"stats {health['stats']}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        load_after = os.getloadavg()
        torch.set_num_threads(args.threads)
        direct = direct_tokens_per_s(ckpt, args.max_tokens)

    print_table(levels)
    print(f"\nmachine: {machine()}; load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"in-process generation (no server, one request at a time, in a thread): {direct:.1f} tokens/s")
    bad = sum(s["hung"] + len(s["other"]) + s["texts_differ"] for s in levels)
    ok = bad == 0 and idle and all(s["answered"] > 0 for s in levels)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine(), "load_before": load_before, "load_after": load_after,
            "server": {"checkpoint": str(args.checkpoint or "tiny preset, random weights"),
                       "batch_rows": args.batch_rows, "queue": args.queue, "threads": args.threads},
            "max_tokens": args.max_tokens, "duration_s": args.duration_s, "levels": levels,
            "in_process_tokens_per_s": direct, "server_after": health, "ok": ok}, indent=2) + "\n")
    print("\nOK: every request answered or refused with 429, none hung, same texts, server healthy" if ok
          else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
