"""`tinygemma judge` when grading fails: nothing graded is an error, a partial failure says its share, a
non-HTTP endpoint is refused at once, a trickling answer is cut at --timeout, the counter suits a log."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tinygemma.cli import main
from tinygemma.eval.judge import JudgeConfig, grade_one
from tinygemma.model import Gemma3, load_model_config

GRADE = {"assessment": "fine", "grammar": 7, "creativity": 6, "consistency": 8, "plot": 5, "age_group": "C"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return Gemma3(load_model_config("tiny")).save_pretrained(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tom had a red ball. He\nThe cat sat\n")
    return path


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        if self.server.mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for _ in range(40):  # 12 s in all, a byte at a time
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
            return
        # "half": only Tom's story is graded; the other answer is not JSON
        content = json.dumps(GRADE) if "Tom" in text else "I cannot grade this."
        data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(mode: str):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mode = mode
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(ckpt, prompts, out, endpoint):
    return ["judge", str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "4", "--out", str(out),
            "--endpoint", endpoint, "--judge-model", "fake", "--backoff", "0", "--retries", "1", "--timeout", "2"]


def test_nothing_graded_is_an_error(ckpt, prompts, tmp_path, capsys):
    refused = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens: every connection is refused
    assert main(_args(ckpt, prompts, tmp_path / "j", refused)) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("judged")]
    assert len(err) == 1 and err[0].startswith("tinygemma judge: error:"), err
    assert "0 of 2" in err[0] and "2 failures" in err[0] and "gave up" in err[0], err


def test_some_failures_exit_0_with_their_share(ckpt, prompts, tmp_path, capsys):
    server, url = _serve("half")
    try:
        assert main([*_args(ckpt, prompts, tmp_path / "j", url), "--parse-retries", "0"]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert "1 of 2 graded" in out and "1 failures (50%)" in out, out


@pytest.mark.parametrize("endpoint", ["ftp://x/v1", "file:///etc", "x/v1"])
def test_non_http_endpoint_refused_at_once(ckpt, prompts, tmp_path, capsys, endpoint):
    t0 = time.perf_counter()
    assert main(_args(ckpt, prompts, tmp_path / "j", endpoint)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "http" in err and time.perf_counter() - t0 < 5
    assert not (tmp_path / "j").exists()


def test_a_trickling_answer_is_cut_at_the_timeout():
    server, url = _serve("trickle")
    try:
        t0 = time.perf_counter()
        grade = grade_one(JudgeConfig(endpoint=url, judge_model="fake", timeout=1.0, retries=0), "A", "b", None)
        elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
    assert "error" in grade and elapsed < 4, (grade, elapsed)


def test_judge_counter_in_a_log_has_no_carriage_returns(ckpt, tmp_path, capsys):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Tom and story {i}\n" for i in range(30)))
    server, url = _serve("half")
    try:
        assert main(_args(ckpt, prompts, tmp_path / "j", url)) == 0
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("judged")]
    assert 1 <= len(lines) <= 11, err
