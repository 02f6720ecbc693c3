"""tinygemma serve: the OpenAI-style API against a real uvicorn server on loopback, and the run-folder pages."""

import json
import socket
import threading
import time

import httpx
import pytest

from tests.helpers import tiny_model
from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.generate import encode_prompts, generate_ids
from tinygemma.prompts import build_prompt
from tinygemma.rundir import latest_report, read_metrics, resolve_checkpoint
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.app import STATIC, create_app, is_loopback, serve_in_thread
from tinygemma.serve.config import ServeConfig
from tinygemma.serve.engine import _Row


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serve_in_thread(create_app(model, tokenizer=tokenizer, model_id="tiny-test")) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def sse_events(response: httpx.Response) -> list:
    """The data of each event; ``[DONE]`` stays a string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def reference(model, tokenizer, prompts, **kw) -> list[str]:
    """What the generation API itself writes for these settings (the server must agree)."""
    ids = generate_ids(model, encode_prompts(tokenizer, prompts), SamplingConfig(**kw))
    return [tokenizer.decode(row) for row in ids]


def wait_idle(client: httpx.Client, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = client.get("/health").json()
        if health["active"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


# -- API -------------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-test"]
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-test"
    assert health["batch_rows"] == 16 and health["queue"] == 64 and health["active"] == health["queued"] == 0


def test_completion_matches_generation_api(server, model, tokenizer):
    body = {"model": "tiny-test", "prompt": ["Once upon a time", "A little girl"], "max_tokens": 12, "n": 2,
            "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "tiny-test" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    want = reference(model, tokenizer, body["prompt"], max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40,
                     seed=7, num_samples=2)
    assert [c["text"] for c in out["choices"]] == want
    for c in out["choices"]:
        assert c["logprobs"] is None and c["finish_reason"] in ("stop", "length")
    n_prompt = sum(len(p) for p in encode_prompts(tokenizer, body["prompt"]))
    n_new = sum(len(tokenizer.encode(t)) for t in want)  # no <|endoftext|> here: random weights rarely pick it
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": out["usage"]["completion_tokens"],
                            "total_tokens": n_prompt + out["usage"]["completion_tokens"]}
    assert abs(out["usage"]["completion_tokens"] - n_new) <= 4  # re-encoding decoded text may merge tokens
    # the same seed gives the same stories; temperature 0 is greedy
    assert server.post("/v1/completions", json=body).json()["choices"] == out["choices"]
    greedy = server.post("/v1/completions", json={"prompt": "The dog", "max_tokens": 8, "temperature": 0}).json()
    assert greedy["choices"][0]["text"] == reference(model, tokenizer, ["The dog"], max_new_tokens=8, greedy=True)[0]


def test_instruction_fields(server, model, tokenizer):
    """The extension fields put the dataset's instruction header before the prompt, as `generate --words` does."""
    body = {"prompt": "Once", "max_tokens": 6, "temperature": 0, "words": "frog, jump", "features": ["dialogue"],
            "sentence": "It was fun."}
    out = server.post("/v1/completions", json=body).json()
    header = build_prompt(words=["frog", "jump"], features=["Dialogue"], sentence="It was fun.")
    assert out["choices"][0]["text"] == reference(model, tokenizer, [header + "Once"], max_new_tokens=6, greedy=True)[0]
    assert out["usage"]["prompt_tokens"] == 1 + len(tokenizer.encode(header + "Once"))


def test_token_id_prompts(server, model, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    a = server.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "seed": 3}).json()
    b = server.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6, "seed": 3}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    c = server.post("/v1/completions", json={"prompt": [ids, ids[:2]], "max_tokens": 4, "seed": 3}).json()
    assert len(c["choices"]) == 2


def test_streaming_matches_non_streaming(server):
    body = {"prompt": "Once upon a time", "max_tokens": 15, "seed": 11, "n": 2}
    full = server.post("/v1/completions", json=body).json()
    with server.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    texts, finish = ["", ""], [None, None]
    for ev in chunks:
        assert ev["object"] == "text_completion" and ev["id"] == chunks[0]["id"] and ev["model"] == "tiny-test"
        (choice,) = ev["choices"]
        assert finish[choice["index"]] is None, "no chunk after a choice has finished"
        texts[choice["index"]] += choice["text"]
        finish[choice["index"]] = choice["finish_reason"]
    assert len(chunks) > 10, "one chunk per token, not one at the end"
    assert texts == [c["text"] for c in full["choices"]]
    assert finish == [c["finish_reason"] for c in full["choices"]]
    # without stream_options there is no usage chunk
    with server.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all("usage" not in ev for ev in events[:-1])


def test_stop_sequences(server):
    base = {"prompt": "Once upon a time", "max_tokens": 20, "seed": 5}
    text = server.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a piece from the middle, likely spanning two tokens
    cut = text[:text.index(stop)]
    out = server.post("/v1/completions", json={**base, "stop": [stop, "§never§"]}).json()["choices"][0]
    assert out == {"text": cut, "index": 0, "logprobs": None, "finish_reason": "stop"}
    with server.stream("POST", "/v1/completions", json={**base, "stop": stop, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(ev["choices"][0]["text"] for ev in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_row_stop_and_eot(tokenizer):
    row = _Row(tokenizer, ["cat!"])
    pieces = [row.push(t, tokenizer.eot_id) for t in tokenizer.encode("The cat sat. The cat! Never seen")]
    assert "".join(pieces) == "The cat sat. The " and row.finish == "stop"
    row = _Row(tokenizer, ["zzz"])
    out = "".join(row.push(t, tokenizer.eot_id) for t in tokenizer.encode("Hi zz"))
    assert out == "Hi " and row.end("length") == "zz" and row.text == "Hi zz"  # held text comes out at the end
    row = _Row(tokenizer, [])
    ids = tokenizer.encode("Hello é")
    assert "".join(row.push(t, tokenizer.eot_id) for t in ids) == "Hello é"
    assert row.push(tokenizer.eot_id, tokenizer.eot_id) == "" and row.finish == "stop" and row.tokens == len(ids)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "max_tokens": 100000}, 422, "max_tokens: Input should be less than or equal to 500"),
    ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "x" * 4001}, 422, "too long: 4001 characters (the limit is 4000)"),
    ({"prompt": "x", "n": 5}, 422, "n: Input should be less than or equal to 4"),
    ({"prompt": ["x"] * 5, "n": 4}, 422, "prompts x n is 20; the limit is 16"),
    ({"prompt": 42}, 422, "prompt: must be a string"),
    ({"prompt": []}, 422, "prompt: must be a string"),
    ({"prompt": [[1, 2], [50257]]}, 422, "token ids must lie in [0, 50257)"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "n": "2"}, 422, "n: Input should be a valid integer"),
    ({"prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"prompt": "x", "max_token": 5}, 422, "max_token: unknown field (did you mean 'max_tokens'?)"),
    ({"prompt": "x", "checkpoint": "/etc/passwd"}, 422, "checkpoint: unknown field"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "at most 4 stop sequences"),
    ({"prompt": "x", "echo": True, "logprobs": 3}, 422, "not supported by this server: echo, logprobs"),
    ({"prompt": "x " * 400, "max_tokens": 200}, 422, "does not fit the model's context of 512 tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ({"prompt": "x", "words": " , "}, 422, "words: no words"),
    ({"prompt": "x", "features": ["Funny"]}, 422, "unknown feature 'Funny'"),
    ({"prompt": [1, 2], "words": "frog"}, 422, "need a text prompt, not token ids"),
])
def test_bad_requests_get_clear_errors(server, body, status, words):
    r = server.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "\n" not in err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_and_neutral_openai_fields(server):
    r = server.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    # what some OpenAI clients always send, at its neutral values, is accepted
    neutral = {"prompt": "x", "max_tokens": 2, "user": "me", "echo": False, "best_of": 1, "logprobs": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": None}
    assert server.post("/v1/completions", json=neutral).status_code == 200
    assert server.get("/v1/completions").status_code == 405
    r = server.get("/no/such/page")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # bound to loopback, the server answers only to loopback names (no DNS rebinding from a web page)
    assert server.get("/health", headers={"Host": "evil.example:8000"}).status_code == 400
    assert server.get("/health", headers={"Host": "localhost:8000"}).status_code == 200


def test_errors_do_not_leak(tokenizer):
    with serve_in_thread(create_app(tiny_model(fail=True), tokenizer=tokenizer), log_level="critical") as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "stream": True}, timeout=30) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]" and events[0]["error"]["type"] == "server_error"
        assert "secret" not in json.dumps(events)
        health = httpx.get(f"{url}/health").json()
        assert health["active"] == 0 and health["stats"]["errors"] == 2


# -- concurrency -----------------------------------------------------------------------------------
def test_queue_bound_429_and_disconnect_frees_the_row(model, tokenizer):
    app = create_app(tiny_model(delay=0.01), ServeConfig(batch_rows=1, queue=1), tokenizer=tokenizer)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(client.post(
            "/v1/completions", json={"prompt": "The dog", "max_tokens": 8, "temperature": 0})))
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the generation is running in the one row
            waiter.start()
            deadline = time.monotonic() + 5
            while client.get("/health").json()["queued"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = client.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            message = busy.json()["error"]["message"]
            assert "busy" in message and "--batch-rows 1, --queue 1" in message and "1 requests queued" in message
            assert busy.json()["error"]["type"] == "rate_limit_error"
            assert not queued, "the queued request waits while the row is taken"
        # leaving the `with` closed the connection mid-story: its row is freed and the queued request gets it
        waiter.join(30)
        assert queued[0].status_code == 200
        assert queued[0].json()["choices"][0]["text"] == reference(model, tokenizer, ["The dog"], max_new_tokens=8,
                                                                   greedy=True)[0]
        health = wait_idle(client)
        assert health["active"] == 0 and health["stats"]["cancelled"] == 1 and health["stats"]["refused"] == 1
        assert health["stats"]["completed"] == 1 and health["stats"]["completion_tokens"] < 100
        assert client.post("/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200

        # a non-streaming client that goes away stops its generation too
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "x", "max_tokens": 400}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 5
            while client.get("/health").json()["active"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
        health = wait_idle(client)
        assert health["active"] == 0 and health["stats"]["cancelled"] == 2
        assert health["stats"]["completion_tokens"] < 200


def test_concurrent_requests_batch_and_give_their_texts_alone(model, tokenizer):
    """Requests running at once share decoding steps, and each gets exactly what it gets alone: greedy ones the
    generation API's text, sampled ones (seeded) the text of the same request sent by itself."""
    served = tiny_model(delay=0.01)
    batch_sizes = []
    served.lm_head.register_forward_hook(lambda module, args, out: batch_sizes.append(out.shape[0]))
    greedy = [("Once upon a time", 20, True), ("The dog", 7, False), ("A little girl went to the woods", 15, True),
              ("Tom", 11, False)]
    sampled = {"prompt": "Lily saw a bird", "max_tokens": 12, "temperature": 0.9, "top_k": 40, "seed": 5, "n": 2}
    app = create_app(served, ServeConfig(batch_rows=8), tokenizer=tokenizer)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        results: dict[int, list[str]] = {}

        def ask(i: int, body: dict) -> None:
            if not body.get("stream"):
                results[i] = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
                return
            with client.stream("POST", "/v1/completions", json=body) as r:
                texts = [""] * body.get("n", 1)
                for ev in sse_events(r)[:-1]:
                    texts[ev["choices"][0]["index"]] += ev["choices"][0]["text"]
                results[i] = texts

        bodies = [{"prompt": p, "max_tokens": m, "temperature": 0, "stream": st} for p, m, st in greedy] + [sampled]
        threads = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
            time.sleep(0.02)  # later requests join the running batch
        for t in threads:
            t.join(60)
        steps_together = len(batch_sizes)
        for i, (prompt, max_tokens, _) in enumerate(greedy):
            assert results[i] == reference(model, tokenizer, [prompt], max_new_tokens=max_tokens, greedy=True)
        alone = [c["text"] for c in client.post("/v1/completions", json=sampled).json()["choices"]]
        assert results[len(greedy)] == alone and alone[0] != alone[1]
        stats = wait_idle(client)["stats"]
    assert stats["completed"] == len(bodies) + 1 and stats["refused"] == 0
    tokens = sum(m for _, m, _ in greedy) + 2 * sampled["max_tokens"]
    assert steps_together < tokens / 2, f"{steps_together} forward passes for {tokens} tokens: not batched"


def test_max_context_bounds_requests(model, tokenizer):
    """--max-context shortens what a request may span (each batch row's cache) below the model's context."""
    app = create_app(model, ServeConfig(max_context=64), tokenizer=tokenizer)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/api/info").json()
        assert info["context_length"] == 512 and info["max_context"] == 64 and info["max_tokens"] == 63
        r = client.post("/v1/completions", json={"prompt": "x " * 40, "max_tokens": 30})
        assert r.status_code == 422 and "does not fit the server's --max-context of 64 tokens" in r.text
        r = client.post("/v1/completions", json={"prompt": "The dog", "max_tokens": 40, "temperature": 0})
        want = reference(model, tokenizer, ["The dog"], max_new_tokens=40, greedy=True)
        assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == want


# -- run folder, page, CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "best")
    (run / "best" / "README.md").write_text("# model card\n")
    lines = [{"step": s, "tokens": s * 1024, "train_loss": 10.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_s": 5000.0, "mfu": 0.1, "elapsed_s": s / 10} for s in range(1, 11)]
    lines[4]["val_loss"] = 9.6
    lines[9]["val_loss"] = float("nan")  # a diverged value must not break the JSON
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n" + '{"step": 11, "train_lo'
    (run / "metrics.jsonl").write_text(text)
    (run / "samples").mkdir()
    (run / "samples" / "step-5.md").write_text("old")
    (run / "samples" / "step-10.md").write_text("# Samples\n<b>story</b>")
    (run / "samples" / "step-10.html").write_text("<h1>Samples at step 10</h1><script>alert(1)</script>")
    return run


def test_read_metrics_and_latest_report(run_dir, tmp_path):
    records, cursor, restarted = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11)) and not restarted
    assert records[4]["val_loss"] == 9.6 and records[9]["val_loss"] is None
    more, cursor2, _ = read_metrics(run_dir / "metrics.jsonl", cursor)
    assert more == [] and cursor2 == cursor  # the half-written line waits
    # training rewrites the file when it resumes (a new file): read it again from the start
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    _, cursor, _ = read_metrics(path)
    (tmp_path / "new").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (tmp_path / "new").replace(path)
    records, _, restarted = read_metrics(path, cursor)
    assert restarted and [r["step"] for r in records] == [1, 2, 3]
    assert read_metrics(tmp_path / "missing.jsonl") == ([], "", False)
    assert latest_report(run_dir) == run_dir / "samples" / "step-10.html"


def test_run_folder_pages(run_dir, tokenizer):
    with serve_in_thread(create_app(run_dir, tokenizer=tokenizer)) as url, httpx.Client(base_url=url) as client:
        info = client.get("/api/info").json()
        assert info["run"] == run_dir.name and info["model"] == run_dir.name and len(info["examples"]) == 5
        data = client.get("/api/metrics").json()
        assert len(data["records"]) == 10 and data["report"]["name"] == "samples/step-10.html"
        with open(run_dir / "metrics.jsonl", "a") as f:  # the run goes on: the page only fetches what is new
            f.write('ss": 8.9}\n{"step": 12, "train_loss": 8.8}\n')
        new = client.get(f"/api/metrics?since={data['next']}").json()
        assert [r["step"] for r in new["records"]] == [11, 12] and new["records"][0]["train_loss"] == 8.9
        report = client.get("/api/report")
        assert "Samples at step 10" in report.text
        assert report.headers["content-security-policy"].startswith("sandbox")  # its script cannot run
        page = client.get("/")
        assert page.status_code == 200 and "Tell a story" in page.text
        for name in ("app.js", "style.css"):
            assert client.get(f"/static/{name}").status_code == 200
        assert client.get("/static/../serve.py").status_code == 404
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_page_is_self_contained():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path


def test_checkpoint_without_run_has_no_training_page(run_dir, tokenizer):
    app = create_app(run_dir / "best", tokenizer=tokenizer)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/api/info").json()["run"] is None
        assert httpx.get(f"{url}/api/metrics").status_code == 404


def test_resolve_checkpoint(tmp_path, model):
    model.save_pretrained(tmp_path / "run" / "checkpoint-20")
    model.save_pretrained(tmp_path / "run" / "checkpoint-100")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-100"
    model.save_pretrained(tmp_path / "run" / "best")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_cli_errors_and_loopback(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint or run folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--batch-rows", "0"]) == 2
    assert "batch_rows must be positive" in capsys.readouterr().err
    for flag in ("--queue", "--max-concurrent"):  # the old name of --queue still works
        assert main(["serve", str(tmp_path), flag, "-1"]) == 2
        assert "queue must be >= 0, got -1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-context", "1"]) == 2
    assert "max_context must hold a prompt token and a new one" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert ServeConfig().host == "127.0.0.1"


def test_cli_binds_loopback_and_warns_otherwise(run_dir, monkeypatch, capsys):
    import tinygemma.cli.serve as serve  # the command calls uvicorn_server

    served = []

    class FakeServer:  # stands in for uvicorn: the test checks what the command sets up, then returns
        def run(self, sockets):
            served.append(sockets[0].getsockname())

    monkeypatch.setattr(serve, "uvicorn_server", lambda app, log_level: FakeServer())
    assert main(["serve", str(run_dir), "--port", "0"]) == 0
    assert served[-1][0] == "127.0.0.1"
    err = capsys.readouterr().err
    assert "warning" not in err and "http://127.0.0.1:" in err
    assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert served[-1][0] == "0.0.0.0" and "warning: listening on 0.0.0.0, not loopback" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(run_dir), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygemma serve: error: cannot listen on 127.0.0.1:") and len(err.splitlines()) == 1
