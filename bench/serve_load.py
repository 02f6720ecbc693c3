"""Load test for ``tinygemma serve``: many concurrent streaming clients on loopback for a bounded time.

Starts ``tinygemma serve`` in a subprocess on 127.0.0.1 (never anything else), then
  1. baseline: one client, back to back, for --baseline-s seconds;
  2. load: --clients clients at once for --duration-s seconds; a client refused with 429 waits
     (Retry-After, jittered) and tries again.
Every request must be answered (200, full SSE stream ending in [DONE]) or refused with 429; none may
exceed --request-timeout-s (hung), and /health must be ok and idle afterwards. Reports p50/p95 latency,
time to first token (TTFT) and tokens/s, with ratios to the baseline and to in-process generation.

    python bench/serve_load.py                 # tiny preset, random weights
    python bench/serve_load.py --checkpoint runs/tiny/best --clients 50 --duration-s 30
"""

import argparse
import asyncio
import json
import os
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


async def _request(client: httpx.AsyncClient, body: dict, t0: float) -> Outcome:
    ttft, tokens, done = None, 0, False
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
            elif ttft is None and any(c["text"] for c in msg["choices"]):
                ttft = time.perf_counter() - t0
    return Outcome(200 if done else "no [DONE]", time.perf_counter() - t0, ttft, tokens)


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_request(client, body, t0), timeout)
    except asyncio.TimeoutError:
        return Outcome("hung", time.perf_counter() - t0)
    except httpx.HTTPError as e:
        return Outcome(type(e).__name__, time.perf_counter() - t0)


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


def summarise(name: str, outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    s = {"name": name, "requests": len(outcomes), "answered": len(ok),
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
    print(f"\n[{s['name']}] {s['requests']} requests in {s['wall_s']:.1f} s: {s['answered']} answered, "
          f"{s['refused_429']} refused (429), {s['hung']} hung, other: {s['other'] or 'none'}")
    print(f"  latency p50 {s['latency_p50'] * 1000:.0f} ms, p95 {s['latency_p95'] * 1000:.0f} ms; "
          f"TTFT p50 {s['ttft_p50'] * 1000:.0f} ms, p95 {s['ttft_p95'] * 1000:.0f} ms")
    print(f"  {s['tokens']} tokens: {s['tokens_per_s']:.1f} tokens/s aggregate, "
          f"{s['per_request_tokens_per_s_p50']:.1f} tokens/s per request (p50, after the first token)")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run folder (default: tiny preset, random weights)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--baseline-s", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-concurrent", type=int, default=4, help="the server's --max-concurrent")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request slower than this is 'hung'")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    args = p.parse_args()

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
                                 str(port), "--max-concurrent", str(args.max_concurrent), "--device", "cpu"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, proc)
            body = lambda i, k: {"prompt": EXAMPLE_PROMPTS[(i + k) % 5], "max_tokens": args.max_tokens,
                                 "temperature": 0.8, "top_k": 50, "stream": True,
                                 "stream_options": {"include_usage": True}}
            httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=60)  # warm-up
            print(f"server: {ckpt} on {url}, --max-concurrent {args.max_concurrent}; "
                  f"requests of {args.max_tokens} tokens, streamed")
            base = summarise("baseline: 1 client", *asyncio.run(
                client_loop(url, 1, args.baseline_s, body, args.request_timeout_s)))
            print_summary(base)
            load = summarise(f"load: {args.clients} clients", *asyncio.run(
                client_loop(url, args.clients, args.duration_s, body, args.request_timeout_s)))
            print_summary(load)
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
        torch.set_num_threads(args.threads)
        direct = direct_tokens_per_s(ckpt, args.max_tokens)

    print(f"\nin-process generation (no server, one request at a time, in a thread): {direct:.1f} tokens/s")
    print("ratios:")
    ratio = load["tokens_per_s"] / base["tokens_per_s"]
    print(f"  aggregate tokens/s, {args.clients} clients / 1 client:   {ratio:.2f}")
    print(f"  1-client tokens/s through HTTP / in-process:  {base['tokens_per_s'] / direct:.2f}")
    print(f"  latency p50 under load / baseline:            {load['latency_p50'] / base['latency_p50']:.2f}")
    print(f"  TTFT p50 under load / baseline:               {load['ttft_p50'] / base['ttft_p50']:.2f}")
    bad = load["hung"] + base["hung"] + len(load["other"]) + len(base["other"])
    ok = bad == 0 and idle and load["answered"] > 0
    print("\nOK: every request answered or refused with 429, none hung, server healthy" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
