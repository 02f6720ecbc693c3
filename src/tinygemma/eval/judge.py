"""Grade stories with an LLM judge: ``tinygemma judge``, the TinyStories paper's rubric.

The model completes a set of story beginnings (the tutorial's five and ``eval/judge_prompts.txt``,
seeded per prompt, so adding prompts never changes the others' completions). A judge model behind
any OpenAI-compatible chat endpoint (``POST {endpoint}/chat/completions``: OpenAI, vLLM, llama.cpp's
server, ollama) sees each beginning, the marker ``***`` and the continuation, and grades grammar,
creativity, consistency and plot from 1 to 10 and guesses the writer's age group, as in Eldan & Li
(2023), "TinyStories", section 3.1 -- here in one turn that answers in JSON.

Requests run ``concurrency`` at a time. Timeouts, connection errors, HTTP 429 and 5xx are retried
with exponential backoff (``Retry-After`` honoured); an answer that does not parse is asked again,
then counted as a failure, never a crash. Every grade is appended to a JSONL cache as it arrives,
keyed by (beginning, completion, judge model, rubric version), so an interrupted or repeated run
never pays twice for the same grade. Grades say what the judge model thinks: the tests here only
exercise the protocol against a local fake endpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from tinygemma.config import UserError, check_seed, load_json
from tinygemma.files import atomic_write_text
from tinygemma.log import progress as progress_bar

RUBRIC_VERSION = "tinystories-paper-v1"  # part of the cache key: change it whenever RUBRIC changes
CRITERIA = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
MARKER = "***"


OUTPUT_FILES = ("grades.jsonl", "judge_summary.json")


def is_judge_folder(folder: Path) -> bool:
    """A folder an earlier ``tinygemma judge`` wrote (a re-run there reuses its cache and replaces its files)."""
    try:
        summary = load_json(Path(folder) / "judge_summary.json")
    except UserError:
        return False
    return isinstance(summary, dict) and "rubric_version" in summary
RUBRIC = """In the following exercise, the student is given the beginning of a story and has to complete it \
into a full story. The exercise tests the student's language abilities and creativity. The symbol *** marks \
where the given beginning ends and the student's completion starts:

{story}

First assess the part written by the student (after ***): Is it grammatically correct? Is it consistent \
with the beginning of the story? Pay special attention to whether the student completes the sentence that \
*** splits in the middle. Then grade the student's completion from 1 to 10 for grammar, creativity, \
consistency with the story's beginning, and whether the plot makes sense. Finally, give your best guess of \
the student's age group, as reflected by the completion: A: 3 or under, B: 4-5, C: 6-7, D: 8-9, E: 10-12, \
F: 13-16.

Answer with one JSON object and nothing else:
{{"assessment": "<two or three sentences>", "grammar": <1-10>, "creativity": <1-10>, "consistency": <1-10>, \
"plot": <1-10>, "age_group": "<A-F>"}}"""


@dataclass
class JudgeConfig:
    endpoint: str | None = field(default=None, metadata={"help": "base URL of an OpenAI-compatible API, e.g. "
                                                                  "https://api.openai.com/v1 or http://127.0.0.1:8080/v1"})
    judge_model: str | None = field(default=None, metadata={"help": "the judge's model name at that endpoint"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key "
                                                                         "(unset: no Authorization header)"})
    concurrency: int = field(default=4, metadata={"help": "requests in flight at most"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})
    retries: int = field(default=5, metadata={"help": "retries of a request after a timeout, 429 or 5xx"})
    backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry; doubles each time"})
    parse_retries: int = field(default=2, metadata={"help": "new requests after an answer that does not parse"})
    judge_max_tokens: int = field(default=400, metadata={"help": "max_tokens of the judge's answer"})
    judge_temperature: float = field(default=0.0, metadata={"help": "temperature of the judge"})
    samples_per_prompt: int = field(default=1, metadata={"help": "completions per beginning"})
    seed: int = field(default=1337, metadata={"help": "prompt i is completed with seed + i"})

    def __post_init__(self):
        scheme = urllib.parse.urlsplit(self.endpoint or "").scheme
        if self.endpoint is not None and scheme not in ("http", "https"):
            raise UserError(f"endpoint {self.endpoint!r}: expected an http:// or https:// URL")
        check_seed(self.seed)
        if not math.isfinite(self.timeout):
            raise UserError(f"timeout must be finite, got {self.timeout}")
        for name in ("concurrency", "samples_per_prompt", "judge_max_tokens", "timeout"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("retries", "parse_retries", "backoff"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")


def default_prompts() -> list[str]:
    """The tutorial's five beginnings, then the project's own (``eval/judge_prompts.txt``)."""
    from tinygemma.prompts import TUTORIAL_PROMPTS

    text = resources.files("tinygemma.eval").joinpath("judge_prompts.txt").read_text(encoding="utf-8")
    return TUTORIAL_PROMPTS + [line.strip() for line in text.splitlines() if line.strip()]


# -- one grade -----------------------------------------------------------------------------------
class _Retry(Exception):
    """A transient failure: timeout, connection error, HTTP 429 or 5xx."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Unparsed(Exception):
    """An answer that is not a grade."""


def judge_messages(beginning: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": RUBRIC.format(story=beginning + MARKER + completion)}]


def parse_grade(text: str) -> dict:
    """The grade in a judge's answer: the first JSON object in it (code fences allowed), checked."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        obj = json.loads(match.group()) if match else None
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise _Unparsed("no JSON object in the answer")
    grade = {}
    for name in CRITERIA:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise _Unparsed(f"{name}: expected a number from 1 to 10, got {value!r}")
        grade[name] = float(value)
    age = str(obj.get("age_group", "")).strip()[:1].upper()
    if age not in AGE_GROUPS:
        raise _Unparsed(f"age_group: expected A-F, got {obj.get('age_group')!r}")
    return {**grade, "age_group": age, "assessment": str(obj.get("assessment", ""))}


def _post(cfg: JudgeConfig, messages: list[dict], api_key: str | None) -> str:
    """One chat completion request; the answer's text, or _Retry / _Unparsed / UserError."""
    body = {"model": cfg.judge_model, "messages": messages, "temperature": cfg.judge_temperature,
            "max_tokens": cfg.judge_max_tokens}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(cfg.endpoint.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        raw = _read_within(req, cfg.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            after = e.headers.get("Retry-After", "")
            raise _Retry(f"HTTP {e.code}", float(after) if after.replace(".", "", 1).isdigit() else None) from None
        raise UserError(f"{cfg.endpoint}: HTTP {e.code} {e.reason} (check --endpoint, --judge-model and the "
                        f"API key in ${cfg.api_key_env})") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    try:
        return json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Unparsed("not a chat completion response") from None


def _read_within(req: urllib.request.Request, timeout: float) -> bytes:
    """The response body, all of it within ``timeout`` seconds (urlopen's own timeout bounds each socket
    operation, so a server that trickles bytes could hold a request forever)."""
    deadline = time.monotonic() + timeout
    chunks = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        while chunk := resp.read1(65536):  # what has arrived: read() would wait for all 64 KiB
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
    return b"".join(chunks)


def grade_one(cfg: JudgeConfig, beginning: str, completion: str, api_key: str | None) -> dict:
    """A grade ({criteria..., age_group, assessment, requests}), or {"error", "requests"} once transient faults
    or unparseable answers have used up their retries; an HTTP error that retrying cannot fix (401, 404, ...)
    raises UserError."""
    messages, requests, transient, unparsed = judge_messages(beginning, completion), 0, 0, 0
    while True:
        requests += 1
        try:
            return {**parse_grade(_post(cfg, messages, api_key)), "requests": requests}
        except _Unparsed as e:
            unparsed += 1
            if unparsed > cfg.parse_retries:
                return {"error": f"unparseable answer: {e}", "requests": requests}
        except _Retry as e:
            transient += 1
            if transient > cfg.retries:
                return {"error": f"gave up after {transient} tries: {e}", "requests": requests}
            # Retry-After honoured, but no wait longer than one request may take
            time.sleep(min(e.wait if e.wait is not None else cfg.backoff * 2 ** (transient - 1), 60.0,
                           cfg.timeout))


# -- many grades, cached ---------------------------------------------------------------------------
def cache_key(beginning: str, completion: str, judge_model: str, rubric_version: str = RUBRIC_VERSION) -> str:
    return hashlib.sha256(json.dumps([beginning, completion, judge_model, rubric_version]).encode()).hexdigest()


def read_cache(path: Path) -> dict[str, dict]:
    """key -> grade; a line cut short by a killed run is ignored."""
    cached = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cached[row["key"]] = row["grade"]
            except (ValueError, KeyError, TypeError):
                continue
    return cached


def grade_all(items: list[dict], cfg: JudgeConfig, cache_path: str | os.PathLike, progress: bool = False,
              ) -> list[dict]:
    """Grade every item ({"prompt", "completion", ...}); returns the items with "grade" or "error" and "cached".

    Successful grades are appended to ``cache_path`` (JSONL) as they arrive; cached ones cost nothing."""
    if not cfg.endpoint or not cfg.judge_model:
        raise UserError("--endpoint and --judge-model are required")
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cached = read_cache(cache_path)
    if cache_path.is_file() and cache_path.stat().st_size:
        with cache_path.open("rb+") as f:  # end a line cut short by a killed run, so that appends start afresh
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    api_key = os.environ.get(cfg.api_key_env)
    keys = [cache_key(it["prompt"], it["completion"], cfg.judge_model) for it in items]
    todo = {k: it for k, it in zip(keys, items, strict=True) if k not in cached}  # a duplicate is asked once
    results: dict[str, dict] = {}
    lock = threading.Lock()
    bar = progress_bar(len(todo), desc="judged", unit="grade", disable=not (progress and todo))

    def work(key: str) -> None:
        grade = grade_one(cfg, todo[key]["prompt"], todo[key]["completion"], api_key)
        with lock:
            results[key] = grade
            if "error" not in grade:
                with cache_path.open("a", encoding="utf-8") as f:  # flushed on close: survives a kill
                    f.write(json.dumps({"key": key, "judge_model": cfg.judge_model,
                                        "rubric_version": RUBRIC_VERSION, "grade": grade}) + "\n")
            bar.update(1)

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        try:
            for future in [pool.submit(work, k) for k in todo]:
                future.result()  # re-raises a UserError (e.g. HTTP 401) from a worker
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    out = []
    for it, key in zip(items, keys, strict=True):
        grade = cached.get(key) or results[key]
        out.append({**it, "cached": key in cached,
                    **({"error": grade["error"]} if "error" in grade else {"grade": grade})})
    return out


def summarize(results: list[dict]) -> dict:
    """Per criterion: mean, 95% interval (mean +- 1.96 s/sqrt(n), s the sample standard deviation) and n;
    age groups counted; failures counted with their reasons."""
    graded = [r["grade"] for r in results if "grade" in r]
    criteria = {}
    for name in CRITERIA:
        xs = [g[name] for g in graded]
        mean = sum(xs) / len(xs) if xs else float("nan")
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
        half = 1.96 * sd / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
        criteria[name] = {"mean": mean, "ci95": [mean - half, mean + half], "n": len(xs)}
    errors = [r["error"] for r in results if "error" in r]
    return {"completions": len(results), "graded": len(graded), "failures": len(errors),
            "failure_reasons": sorted(set(errors)), "cached": sum(r["cached"] for r in results),
            "criteria": criteria,
            "age_groups": {g: sum(x["age_group"] == g for x in graded) for g in AGE_GROUPS}}


# -- the command ---------------------------------------------------------------------------------------
def complete_prompts(model, tokenizer, prompts: list[str], cfg: JudgeConfig, sampling) -> list[dict]:
    """``cfg.samples_per_prompt`` completions of each prompt; prompt i is sampled with seed ``cfg.seed + i``."""
    from tinygemma.generate import encode_prompts, generate_rows

    items = []
    for i, prompt in enumerate(prompts):
        scfg = replace(sampling, seed=cfg.seed + i, num_samples=cfg.samples_per_prompt)
        rows, ended = generate_rows(model, encode_prompts(tokenizer, [prompt]), scfg)
        items += [{"prompt": prompt, "sample": s, "completion": tokenizer.decode(ids), "ended_with_eot": e}
                  for s, (ids, e) in enumerate(zip(rows, ended, strict=True))]
    return items


def judge_checkpoint(checkpoint: str | os.PathLike, cfg: JudgeConfig, sampling=None,
                     out: str | os.PathLike | None = None, prompts: list[str] | None = None,
                     cache: str | os.PathLike | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Complete ``prompts`` (default: :func:`default_prompts`) with the checkpoint, grade them, write
    ``OUT/grades.jsonl`` and ``OUT/judge_summary.json`` (OUT defaults to ``CHECKPOINT/judge``); the summary."""
    from tinygemma.generate import load_checkpoint
    from tinygemma.sampling import SamplingConfig
    from tinygemma.tokenizer import Tokenizer

    if not cfg.endpoint or not cfg.judge_model:
        raise UserError("--endpoint and --judge-model are required")
    out = Path(out) if out else Path(checkpoint) / "judge"
    model = load_checkpoint(checkpoint, device=device)
    items = complete_prompts(model, Tokenizer(), prompts or default_prompts(), cfg, sampling or SamplingConfig())
    results = grade_all(items, cfg, cache or out / "cache.jsonl", progress)
    summary = {"checkpoint": str(checkpoint), "judge_model": cfg.judge_model, "endpoint": cfg.endpoint,
               "rubric_version": RUBRIC_VERSION, **summarize(results)}
    atomic_write_text(out / "grades.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_text(out / "judge_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
