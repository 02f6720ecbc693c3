"""The judge client against a fake OpenAI-compatible chat endpoint on 127.0.0.1.

This tests the protocol (retries, timeouts, parsing, caching, resuming), not judgement: the fake
judge's grades are a function of the text it is shown.
"""

import http.server
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import tinygemma
from tinygemma.cli import main
from tinygemma.eval.judge import (
    CRITERIA,
    MARKER,
    RUBRIC_VERSION,
    JudgeConfig,
    cache_key,
    default_prompts,
    grade_all,
    parse_grade,
    read_cache,
    summarize,
)
from tinygemma.model import Gemma3, load_model_config
from tinygemma.prompts import TUTORIAL_PROMPTS


def grade_for(story: str) -> dict:
    """The fake judge's grade: derived from the story, so a test can tell which story it belongs to."""
    n = len(story)
    return {"assessment": "fine", "grammar": n % 10 + 1, "creativity": (n // 10) % 10 + 1, "consistency": 7,
            "plot": 5, "age_group": "ABCDEF"[n % 6]}


def chat(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def default_behaviour(attempt: int, story: str) -> tuple[int, object, float]:
    """(status, body, delay) of the reply to the attempt-th request (0-based) about ``story``."""
    ok = (200, chat(json.dumps(grade_for(story))), 0.0)
    tag = re.search(r"(\S+) story number", story)  # items_of() names the reply kind; a model's story gets "ok"
    kind = tag.group(1) if tag else "ok"
    if kind == "down":
        return 500, {"error": "down"}, 0.0
    if kind == "garbage":
        return 200, chat("A lovely story, I would give it a nine."), 0.0
    if attempt:
        return ok
    return {"429": (429, {"error": "slow down"}, 0.0), "500": (500, "oops", 0.0), "503": (503, "busy", 0.0),
            "slow": (*ok[:2], 1.0), "malformed": (200, chat('{"grammar": "good"'), 0.0),
            "html": (200, "<html>bad gateway</html>", 0.0),
            "fenced": (200, chat("Here you go:\n```json\n" + json.dumps(grade_for(story)) + "\n```"), 0.0),
            }.get(kind, ok)


class FakeJudge(http.server.ThreadingHTTPServer):
    def __init__(self, behaviour=default_behaviour, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour, self.delay = behaviour, delay
        self.bodies, self.headers_seen, self.attempts = [], [], {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        story = body["messages"][0]["content"]
        with s.lock:
            s.bodies.append(body)
            s.headers_seen.append(dict(self.headers))
            attempt = s.attempts.get(story, 0)
            s.attempts[story] = attempt + 1
        status, payload, delay = s.behaviour(attempt, story)
        time.sleep(delay + s.delay)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if status == 503:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@contextmanager
def fake_judge(**kwargs):
    server = FakeJudge(**kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def fast_config(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"endpoint": url, "judge_model": "fake-judge", "timeout": 0.5, "backoff": 0.01,
                          "retries": 2, "parse_retries": 1, "concurrency": 3, **kw})


def items_of(kinds: list[str]) -> list[dict]:
    return [{"prompt": f"Beginning {i}", "completion": f" {kind} story number {i}."} for i, kind in enumerate(kinds)]


def test_each_reply_kind(tmp_path, monkeypatch):
    kinds = ["ok", "429", "500", "503", "slow", "malformed", "html", "fenced", "garbage", "down"]
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with fake_judge() as server:
        results = grade_all(items_of(kinds), fast_config(server.url, api_key_env="FAKE_KEY"), tmp_path / "c.jsonl")
    by_kind = dict(zip(kinds, results, strict=True))
    for kind in kinds[:8]:  # transient faults and malformed answers are retried until a grade comes
        story = f"Beginning {kinds.index(kind)}{MARKER} {kind} story number {kinds.index(kind)}."
        expected = {k: v for k, v in grade_for(_prompt_text(story)).items() if k != "assessment"}
        got = by_kind[kind]["grade"]
        assert {k: got[k] for k in expected} == expected, kind
        assert got["requests"] == (1 if kind in ("ok", "fenced") else 2), kind
    assert "unparseable answer" in by_kind["garbage"]["error"]
    assert server.attempts[_prompt_text(f"Beginning 8{MARKER} garbage story number 8.")] == 2  # 1 + parse_retries
    assert "gave up after 3 tries: HTTP 500" == by_kind["down"]["error"]
    assert server.attempts[_prompt_text(f"Beginning 9{MARKER} down story number 9.")] == 3  # 1 + retries
    body = server.bodies[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "user"
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers_seen)
    s = summarize(results)
    assert (s["completions"], s["graded"], s["failures"], s["cached"]) == (10, 8, 2, 0)
    assert len(s["failure_reasons"]) == 2
    # only grades are cached: the failures are asked again next time
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 8


def _prompt_text(story: str) -> str:
    from tinygemma.eval.judge import RUBRIC

    return RUBRIC.format(story=story)


def test_cache_hit_on_rerun(tmp_path):
    items = items_of(["ok"] * 6) + items_of(["ok"])[:1]  # the last one repeats the first: asked once
    with fake_judge() as server:
        cfg = fast_config(server.url)
        first = grade_all(items, cfg, tmp_path / "c.jsonl")
        assert len(server.bodies) == 6 and not any(r["cached"] for r in first)
        again = grade_all(items, cfg, tmp_path / "c.jsonl")
        assert len(server.bodies) == 6 and all(r["cached"] for r in again)
        assert [r["grade"] for r in again] == [r["grade"] for r in first]
        # another judge model is another key
        grade_all(items[:2], fast_config(server.url, judge_model="other"), tmp_path / "c.jsonl")
        assert len(server.bodies) == 8
    assert cache_key("a", "b", "m") != cache_key("a", "b", "m", RUBRIC_VERSION + "x") != cache_key("a", "c", "m")


CHILD = """
import json, sys
from tinygemma.eval.judge import JudgeConfig, grade_all
items = json.loads(sys.argv[3])
grade_all(items, JudgeConfig(endpoint=sys.argv[1], judge_model="fake-judge", concurrency=1), sys.argv[2])
"""


def test_resume_after_kill(tmp_path):
    items = items_of(["ok"] * 12)
    cache = tmp_path / "c.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(tinygemma.__file__).resolve().parents[1])}
    with fake_judge(delay=0.15) as server:
        child = subprocess.Popen([sys.executable, "-c", CHILD, server.url, str(cache), json.dumps(items)], env=env)
        deadline = time.monotonic() + 60
        while len(server.bodies) < 5 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        paid = len(server.bodies)
        kept = len(cache.read_text().splitlines())
        assert 3 <= kept < 12, kept
        with cache.open("a") as f:
            f.write('{"key": "a line cut short by the kill')
        results = grade_all(items, fast_config(server.url), cache)
        # the re-run pays only for what the killed run had not cached
        assert len(server.bodies) - paid == 12 - kept
        assert sum(r["cached"] for r in results) == kept and all("grade" in r for r in results)
        assert len(read_cache(cache)) == 12  # the grades appended after the cut line are all readable


def test_parse_grade():
    g = parse_grade('Sure! {"assessment": "ok", "grammar": 8, "creativity": 6.5, "consistency": 9, "plot": 7, '
                    '"age_group": "b: 4-5"}')
    assert [g[c] for c in CRITERIA] == [8, 6.5, 9, 7] and g["age_group"] == "B"
    for bad in ('{"grammar": 11, "creativity": 6, "consistency": 9, "plot": 7, "age_group": "B"}',
                '{"grammar": 5, "creativity": 6, "consistency": 9, "plot": 7, "age_group": "G"}',
                '{"grammar": true, "creativity": 6, "consistency": 9, "plot": 7, "age_group": "B"}', "no json", "{"):
        with pytest.raises(Exception, match="expected|JSON"):
            parse_grade(bad)


def test_summary_intervals():
    grades = [8, 6, 7, 9, 5]
    results = [{"cached": False, "grade": {**{c: float(x) for c in CRITERIA}, "age_group": "B"}} for x in grades]
    results.append({"cached": False, "error": "gave up"})
    s = summarize(results)
    sd = math.sqrt(sum((x - 7) ** 2 for x in grades) / 4)
    assert s["criteria"]["plot"]["mean"] == 7 and s["criteria"]["plot"]["n"] == 5
    assert s["criteria"]["plot"]["ci95"] == pytest.approx([7 - 1.96 * sd / math.sqrt(5), 7 + 1.96 * sd / math.sqrt(5)])
    assert s["age_groups"]["B"] == 5 and s["failures"] == 1


def test_default_prompts():
    prompts = default_prompts()
    assert prompts[:5] == TUTORIAL_PROMPTS and len(prompts) >= 55 and len(set(prompts)) == len(prompts)
    assert sum(not p.rstrip().endswith((".", "!", "?", '"')) for p in prompts[5:]) >= 10  # cut mid-sentence


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return Gemma3(load_model_config("tiny")).save_pretrained(tmp_path_factory.mktemp("ckpt"))


def test_judge_cli(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom had a red ball. He\nThe cat sat\n")
    out = tmp_path / "judged"
    args = ["judge", str(ckpt), "--prompts", str(prompts), "--samples-per-prompt", "2", "--max-new-tokens", "6",
            "--out", str(out), "--backoff", "0.01", "--timeout", "5"]
    with fake_judge() as server:
        assert main([*args, "--endpoint", server.url, "--judge-model", "fake-judge"]) == 0
        assert "4 of 4 graded (0 from the cache), 0 failures" in capsys.readouterr().out
        rows = [json.loads(line) for line in (out / "grades.jsonl").read_text().splitlines()]
        tom, cat = "Tom had a red ball. He", "The cat sat"
        assert [(r["prompt"], r["sample"]) for r in rows] == [(tom, 0), (tom, 1), (cat, 0), (cat, 1)]
        for r in rows:  # the judge saw the beginning, the marker, and the model's continuation
            assert _prompt_text(r["prompt"] + MARKER + r["completion"]) in server.attempts
        summary = json.loads((out / "judge_summary.json").read_text())
        assert summary["graded"] == 4 and summary["rubric_version"] == RUBRIC_VERSION
        # seeded completions: a second run finds them all in the cache
        assert main([*args, "--endpoint", server.url, "--judge-model", "fake-judge"]) == 0
        assert "4 of 4 graded (4 from the cache)" in capsys.readouterr().out and len(server.bodies) == 4

    def refuse(attempt, story):
        return 401, {"error": "bad key"}, 0.0

    with fake_judge(behaviour=refuse) as server:
        assert main([*args, "--endpoint", server.url, "--judge-model", "x", "--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "HTTP 401" in err
    assert main(["judge", str(ckpt)]) == 2
    assert "--endpoint and --judge-model are required" in capsys.readouterr().err
