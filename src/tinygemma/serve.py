"""Studio: ``tinygemma serve``, a local web page that streams stories, plus an OpenAI-style API.

The page (``static/``: plain HTML/JS/CSS, nothing fetched from the internet) asks the API below
for a story and shows it token by token. Given a run folder it also draws the training curves
from ``metrics.jsonl`` and shows the newest samples report.

API: ``POST /v1/completions`` (the OpenAI completions fields that apply, streaming as server-sent
events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

Generations run in worker threads, never on the event loop. At most ``max_concurrent`` run at a
time; they take turns one decoding step at a time, and a request beyond that gets 429. A client
that goes away stops its generation before the next token. Requests are validated by pydantic
(422 with a one-line message); nothing in a request names a file; errors never show a traceback.
"""

import argparse
import asyncio
import contextlib
import difflib
import html
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tinygemma.config import UserError, add_dataclass_args, dataclass_overrides, from_dict
from tinygemma.generate import (
    TUTORIAL_PROMPTS,
    SamplingConfig,
    TextStream,
    add_checkpoint_arg,
    add_device_arg,
    add_dtype_arg,
    inference_dtype,
    load_checkpoint,
    parse_device,
    stream,
)
from tinygemma.instruct import FEATURES, build_prompt, split_list
from tinygemma.model import Gemma3
from tinygemma.run import METRICS, display_name, latest_report, read_metrics
from tinygemma.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("tinygemma.serve")

EXAMPLE_PROMPTS = TUTORIAL_PROMPTS  # one-click examples on the story page
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 64
MAX_BODY_BYTES = 1 << 20  # a request body (a completion request is a few KB)
BODY_TIMEOUT_S = 10.0  # to receive a whole body: a client trickling one byte at a time holds no slot for long


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (anything but loopback is "
                                                                "reachable by others: there is no authentication)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)"})
    max_concurrent: int = field(default=4, metadata={"help": "generations at a time; more get HTTP 429"})
    max_tokens_limit: int = field(default=500, metadata={"help": "largest max_tokens a request may ask for"})
    max_prompt_chars: int = field(default=4000, metadata={"help": "longest prompt accepted, in characters"})
    max_n: int = field(default=4, metadata={"help": "largest n (completions per prompt)"})
    max_rows: int = field(default=16, metadata={"help": "largest prompts x n in one request"})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_concurrent", "max_tokens_limit", "max_prompt_chars", "max_n", "max_rows"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")

    def max_tokens_cap(self, context_length: int) -> int:
        """The largest max_tokens this server grants: its limit, and at least one prompt token in context."""
        return min(self.max_tokens_limit, context_length - 1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- generation engine -----------------------------------------------------------------------------
class _Row:
    """One completion's text as tokens arrive: UTF-8 reassembly, stop sequences, finish reason."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.decoder = TextStream(tokenizer)
        self.stops = stops
        self.text = ""  # released to the client
        self.held = ""  # might be the start of a stop sequence: released once it cannot be
        self.tokens = 0
        self.finish: str | None = None

    def push(self, token: int, eot: int) -> str:
        if self.finish is not None:
            return ""
        if token == eot:
            return self.end("stop")
        self.tokens += 1
        return self._release(self.decoder.push(token))

    def end(self, reason: str) -> str:
        """Finish the row; returns the text still held back (none when a stop sequence matched)."""
        self.finish = reason
        out = self.held + self.decoder.flush()
        self.held = ""
        self.text += out
        return out

    def _release(self, piece: str) -> str:
        if not self.stops:
            self.text += piece
            return piece
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:  # cut before the stop sequence, which is not returned (as OpenAI does)
            out = buf[:min(hits)]
            self.held, self.finish = "", "stop"
            self.text += out
            return out
        # hold back the longest tail of buf that some stop sequence starts with
        keep = next((i for i in range(len(buf)) if any(s.startswith(buf[i:]) for s in self.stops)), len(buf))
        out, self.held = buf[:keep], buf[keep:]
        self.text += out
        return out


@dataclass
class Job:
    prompt_ids: list[list[int]]  # each starting with <|endoftext|>
    sampling: SamplingConfig
    stop: list[str]


@dataclass
class Result:
    texts: list[str]
    finish: list[str | None]  # None for rows of a cancelled job
    prompt_tokens: int
    completion_tokens: int
    cancelled: bool


class Engine:
    """Runs generations in worker threads: at most ``max_concurrent`` at a time, one decoding step at a time."""

    def __init__(self, model: Gemma3, tokenizer: Tokenizer, max_concurrent: int):
        self.model, self.tokenizer, self.max_concurrent = model, tokenizer, max_concurrent
        self.pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="tinygemma-generate")
        self._admit = threading.Lock()
        self._step = threading.Lock()  # generations share the model: they take turns, token by token
        self._cancels: set[threading.Event] = set()
        self.active = 0
        self.stats = {"requests": 0, "refused": 0, "completed": 0, "cancelled": 0, "errors": 0,
                      "completion_tokens": 0}

    def try_acquire(self) -> bool:
        with self._admit:
            if self.active >= self.max_concurrent:
                self.stats["refused"] += 1
                return False
            self.active += 1
            self.stats["requests"] += 1
            return True

    def run(self, job: Job, emit: Callable[[list[tuple[int, str, str | None]]], None] | None,
            cancel: threading.Event) -> Result:
        """Generate (in a worker thread; the caller holds a slot from :meth:`try_acquire`, released here).

        ``emit`` gets, after each step, ``(row, new_text, finish_reason)`` for rows that changed.
        ``cancel`` is checked before every step.
        """
        with self._admit:
            self._cancels.add(cancel)
        eot = self.tokenizer.eot_id
        rows = [_Row(self.tokenizer, job.stop) for _ in range(len(job.prompt_ids) * job.sampling.num_samples)]
        steps = stream(self.model, job.prompt_ids, job.sampling)
        status = "errors"
        try:
            while not cancel.is_set():
                with self._step:
                    step = next(steps, None)
                if step is None:
                    break
                changes = []
                for r, (row, tok) in enumerate(zip(rows, step, strict=True)):
                    if tok is None or row.finish is not None:
                        continue
                    text = row.push(tok, eot)
                    if text or row.finish:
                        changes.append((r, text, row.finish))
                if changes and emit is not None:
                    emit(changes)
                if all(row.finish for row in rows):
                    break
            if cancel.is_set():
                status = "cancelled"
            else:
                # rows still open ran out of tokens
                changes = [(r, row.end("length"), "length") for r, row in enumerate(rows) if row.finish is None]
                if changes and emit is not None:
                    emit(changes)
                status = "completed"
            return Result([row.text for row in rows], [row.finish for row in rows],
                          sum(map(len, job.prompt_ids)), sum(row.tokens for row in rows), status == "cancelled")
        finally:
            steps.close()
            with self._admit:
                self._cancels.discard(cancel)
                self.stats[status] += 1
                self.stats["completion_tokens"] += sum(row.tokens for row in rows)
                self.active -= 1  # the slot taken by try_acquire

    def cancel_all(self) -> None:
        """Stop every running generation at its next step (their streams end with finish_reason cancelled)."""
        with self._admit:
            for c in self._cancels:
                c.set()

    def shutdown(self) -> None:
        self.cancel_all()
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- API schema ------------------------------------------------------------------------------------
def _request_model(cfg: ServeConfig, context_length: int, vocab_size: int) -> type:
    """The request body of /v1/completions, with this server's limits built in (shown in /openapi.json too)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    max_tokens_cap = cfg.max_tokens_cap(context_length)

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        include_usage: bool = False

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        model: str | None = None
        prompt: str | list[str] | list[int] | list[list[int]] = Field(
            default="", description="story opening(s), as text or token ids; '' starts a new story")
        max_tokens: int = Field(16, ge=1, le=max_tokens_cap)
        temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy")
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens; 0 keeps all")
        n: int = Field(1, ge=1, le=cfg.max_n)
        stream: bool = False
        stream_options: StreamOptions | None = None
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        stop: str | list[str] | None = None
        user: str | None = None  # accepted and ignored, as it only identifies the end user to OpenAI
        # accepted only with their neutral values, which some clients always send
        echo: bool = False
        best_of: int | None = None
        logprobs: int | None = None
        suffix: str | None = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None
        # extension: TinyStories-Instruct instructions, put before the prompt (which then opens the story)
        words: str | list[str] | None = Field(None, description="extension: words the story must use")
        features: str | list[str] | None = Field(None, description=f"extension: from {', '.join(FEATURES)}")
        summary: str | None = Field(None, max_length=cfg.max_prompt_chars, description="extension: the plot")
        sentence: str | None = Field(None, max_length=cfg.max_prompt_chars,
                                     description="extension: a sentence the story must contain")

        @field_validator("prompt", mode="before")
        @classmethod
        def _check_prompt(cls, v: Any) -> Any:
            shape = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
            if isinstance(v, str):
                items: list = [v]
            elif isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or all(map(is_int, v))):
                items = [v] if is_int(v[0]) else v
            elif isinstance(v, list) and v and all(isinstance(x, list) and x and all(map(is_int, x)) for x in v):
                items = v
            else:
                raise ValueError(shape)
            if len(items) > cfg.max_rows:
                raise ValueError(f"at most {cfg.max_rows} prompts per request, got {len(items)}")
            for item in items:
                if isinstance(item, str) and len(item) > cfg.max_prompt_chars:
                    raise ValueError(f"too long: {len(item)} characters (the limit is {cfg.max_prompt_chars})")
                if isinstance(item, list):
                    if len(item) >= context_length:
                        raise ValueError(f"too long: {len(item)} tokens (the context is {context_length})")
                    if not all(0 <= t < vocab_size for t in item):
                        raise ValueError(f"token ids must lie in [0, {vocab_size})")
            return v

        @field_validator("stop", mode="after")
        @classmethod
        def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
            stops = [v] if isinstance(v, str) else (v or [])
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
                raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
            return v

        @model_validator(mode="after")
        def _check_unsupported(self) -> "CompletionRequest":
            unsupported = [name for name, ok in (
                ("echo", not self.echo), ("best_of", self.best_of in (None, self.n)),
                ("logprobs", self.logprobs is None), ("suffix", not self.suffix),
                ("presence_penalty", self.presence_penalty == 0), ("frequency_penalty", self.frequency_penalty == 0),
                ("logit_bias", not self.logit_bias)) if not ok]
            if unsupported:
                raise ValueError(f"not supported by this server: {', '.join(unsupported)} (leave at the default)")
            rows = (1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt))
            if rows * self.n > cfg.max_rows:
                raise ValueError(f"prompts x n is {rows * self.n}; the limit is {cfg.max_rows}")
            p = self.prompt
            if self.instructions() and not (isinstance(p, str) or isinstance(p[0], str)):
                raise ValueError("words, features, summary and sentence need a text prompt, not token ids")
            return self

        def instructions(self) -> str:
            """The instruction header ('' without instructions); a UserError (a ValueError) if invalid."""
            if all(v is None for v in (self.words, self.features, self.summary, self.sentence)):
                return ""
            words, features = (split_list(v) if isinstance(v, str) else v or [] for v in (self.words, self.features))
            if self.words is not None and not words:
                raise ValueError("words: no words (give 'frog, jump, shiny' or a list)")
            return build_prompt(words=words, features=features, summary=self.summary, sentence=self.sentence)

        def prompts(self) -> list[str | list[int]]:
            p = self.prompt
            rows = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
            header = self.instructions()
            return [header + r for r in rows] if header else rows

        def stops(self) -> list[str]:
            return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    return CompletionRequest


# -- app -------------------------------------------------------------------------------------------
def _error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends (done, error, disconnect)."""

    def __init__(self, content, cancel: threading.Event):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


@dataclass
class Studio:
    """What one app serves: the model, its tokenizer, the limits, the engine and the run folder (if any)."""

    model: Gemma3
    tok: Tokenizer
    cfg: ServeConfig
    model_id: str
    run: Path | None
    engine: Engine = field(init=False)
    request_type: type = field(init=False)  # the body of /v1/completions, with this server's limits
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        mc = self.model.config
        self.engine = Engine(self.model, self.tok, self.cfg.max_concurrent)
        self.request_type = _request_model(self.cfg, mc.context_length, mc.vocab_size)

    @classmethod
    def load(cls, source: str | Path | Gemma3, cfg: ServeConfig, *, device: str | torch.device,
             dtype: torch.dtype | None, tokenizer: Tokenizer | None, run_dir: str | Path | None,
             model_id: str | None) -> "Studio":
        if isinstance(source, Gemma3):
            model, model_id = source.eval(), model_id or "tinygemma"
        else:
            path = Path(source)
            model = load_checkpoint(path, device=device, dtype=dtype)
            model_id = model_id or display_name(path)
            if run_dir is None and not (path / "config.json").is_file():
                run_dir = path
        return cls(model, tokenizer or Tokenizer(), cfg, model_id, Path(run_dir) if run_dir is not None else None)

    def info(self) -> dict:
        mc, cfg = self.model.config, self.cfg
        return {"model": self.model_id, "params": self.model.num_params(), "context_length": mc.context_length,
                "max_tokens": cfg.max_tokens_cap(mc.context_length), "max_prompt_chars": cfg.max_prompt_chars,
                "max_concurrent": cfg.max_concurrent, "examples": EXAMPLE_PROMPTS,
                "run": self.run.name if self.run else None}

    def make_job(self, body) -> Job:
        tok, context = self.tok, self.model.config.context_length
        ids = []
        for i, p in enumerate(body.prompts()):
            row = [tok.eot_id] + (tok.encode(p) if isinstance(p, str) else list(p))
            if len(row) + body.max_tokens > context:
                raise _Invalid(f"prompt {i} is {len(row)} tokens (with the leading <|endoftext|>); with max_tokens="
                               f"{body.max_tokens} it does not fit the model's context of {context} tokens",
                               "prompt")
            ids.append(row)
        sampling = SamplingConfig(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, greedy=body.temperature == 0, seed=body.seed,
                                  num_samples=body.n)
        return Job(ids, sampling, body.stops())


def create_app(source: str | Path | Gemma3, config: ServeConfig | None = None, *, device: str = "cpu",
               dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None,
               run_dir: str | Path | None = None, model_id: str | None = None) -> FastAPI:
    """The FastAPI app serving a checkpoint/run folder (``source`` a path, loaded in ``dtype``, default the
    stored one) or an already loaded model.

    ``run_dir`` (default: ``source`` when it is a run folder) enables the training page.
    """
    studio = Studio.load(source, config or ServeConfig(), device=device, dtype=dtype, tokenizer=tokenizer,
                         run_dir=run_dir, model_id=model_id)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        studio.engine.shutdown()

    # no /docs page: FastAPI's loads its scripts from a CDN (the schema is at /openapi.json)
    app = FastAPI(title="tinygemma studio", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = studio.engine
    app.add_middleware(_BodyLimit)
    if is_loopback(studio.cfg.host):
        # a web page elsewhere cannot reach a loopback server through a DNS name of its own (DNS rebinding)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["localhost", "127.0.0.1", "[::1]"])
    _add_error_handlers(app, studio.request_type)
    _add_page_routes(app, studio)
    _add_completions(app, studio)
    return app


def _validation_error(errors: list[dict], fields: dict) -> JSONResponse:
    """422 with a one-line message from pydantic's errors (the first three), naming the field when one is."""
    parts = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            msg = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
        if e.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        loc = ".".join(str(x) for x in e.get("loc", ())[1:]) if e.get("loc", ("",))[0] == "body" else ""
        parts.append(f"{loc}: {msg}" if loc and e.get("type") != "json_invalid" else msg)
    loc0 = errors[0].get("loc", ()) if errors else ()
    param = str(loc0[1]) if len(loc0) > 1 and loc0[0] == "body" and isinstance(loc0[1], str) else None
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    body = _error_body("; ".join(parts) or "invalid request", "invalid_request_error", param)
    body["detail"] = detail  # FastAPI's usual list, without the echoed input
    return JSONResponse(body, status_code=422)


def _add_error_handlers(app: FastAPI, request_type: type) -> None:
    """Every error as OpenAI's error object; never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors(), request_type.model_fields)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error"}.get(
            exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("error while serving %s %s", request.method, request.url.path)
        return _error(500, "internal server error (see the server's log)", "server_error")


def _add_page_routes(app: FastAPI, studio: Studio) -> None:
    """The page, its static files, and what it reads: model info, health, the run's metrics and report."""
    run = studio.run

    @app.get("/health")
    async def health():
        engine = studio.engine
        return {"status": "ok", "model": studio.model_id, "active": engine.active,
                "max_concurrent": engine.max_concurrent, "stats": dict(engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": studio.model_id, "object": "model", "created": studio.created,
                                            "owned_by": "tinygemma"}]}

    @app.get("/api/info")
    async def info():
        return studio.info()

    @app.get("/api/metrics")
    async def metrics(since: str = ""):
        if run is None:
            raise HTTPException(404, "not serving a run folder")
        records, offset, restarted = await asyncio.to_thread(read_metrics, run / METRICS, since)
        report = await asyncio.to_thread(latest_report, run)
        return {"run": run.name, "records": records, "next": offset, "restarted": restarted,
                "report": {"name": report.relative_to(run).as_posix(), "mtime": report.stat().st_mtime}
                if report else None}

    @app.get("/api/report", response_class=HTMLResponse)
    async def report():
        found = await asyncio.to_thread(latest_report, run) if run else None
        if found is None:
            raise HTTPException(404, "no samples report in the run folder yet")
        text = await asyncio.to_thread(found.read_text, encoding="utf-8", errors="replace")
        if found.suffix != ".html":
            text = f"<!doctype html><meta charset='utf-8'><pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
        # shown in an iframe; the sandbox keeps whatever the file holds from running scripts
        return HTMLResponse(text, headers={"Content-Security-Policy": "sandbox; default-src 'none'; "
                                           "style-src 'unsafe-inline'; img-src data:"})

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_completions(app: FastAPI, studio: Studio) -> None:
    CompletionRequest = studio.request_type

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[valid-type]
        engine, model_id = studio.engine, studio.model_id
        if body.model is not None and body.model != model_id:
            return _error(404, f"model '{body.model}' is not served here; this server has '{model_id}' "
                               "(or leave model out)", "not_found_error", "model")
        try:
            job = await asyncio.to_thread(studio.make_job, body)
        except _Invalid as e:
            return _error(422, str(e), "invalid_request_error", e.param)
        if not engine.try_acquire():
            return _error(429, f"server busy: {engine.max_concurrent} generations are already running "
                               f"(--max-concurrent {engine.max_concurrent}); try again shortly",
                          "rate_limit_error", headers={"Retry-After": "1"})
        reply = _Reply(model_id)
        if not body.stream:
            return await _complete(engine, job, request, reply)
        return _stream(engine, job, reply, bool(body.stream_options and body.stream_options.include_usage))


@dataclass
class _Reply:
    """What every response object of one completion request shares."""

    model_id: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def obj(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": choices, **extra}


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _complete(engine: Engine, job: Job, request: Request, reply: _Reply) -> dict | JSONResponse:
    """The whole completion in one response; stopped if the client goes away first."""
    cancel = threading.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    try:
        result = await asyncio.get_running_loop().run_in_executor(engine.pool, engine.run, job, None, cancel)
    finally:
        watcher.cancel()
        cancel.set()  # stops the generation if this request itself was cancelled
    if result.cancelled:
        return _error(499, "client closed the request", "cancelled")
    return reply.obj([{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                      for i, (t, f) in enumerate(zip(result.texts, result.finish, strict=True))], usage=_usage(result))


def _stream(engine: Engine, job: Job, reply: _Reply, include_usage: bool) -> _SSEResponse:
    """The completion as server-sent events: a chunk per row per decoding step, then ``data: [DONE]``."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancel.set()

    def work() -> None:
        try:
            put(("done", engine.run(job, lambda changes: put(("step", changes)), cancel)))
        except Exception:
            log.exception("generation failed")
            put(("error", None))

    engine.pool.submit(work)  # a slot was taken, so a worker thread is free: the job starts now

    def chunk(choices: list[dict], **extra) -> str:
        return _sse(reply.obj(choices, **extra))

    async def events():
        while True:
            kind, payload = await queue.get()
            if kind == "step":
                for row, text, finish in payload:
                    yield chunk([{"text": text, "index": row, "logprobs": None, "finish_reason": finish}])
                continue
            if kind == "done" and payload.cancelled:  # the server is shutting down: say the rows were cut
                yield chunk([{"text": "", "index": row, "logprobs": None, "finish_reason": "cancelled"}
                             for row, finish in enumerate(payload.finish) if finish is None])
            if kind == "done" and include_usage:
                yield chunk([], usage=_usage(payload))
            if kind == "error":
                yield _sse(_error_body("internal server error (see the server's log)", "server_error"))
            yield "data: [DONE]\n\n"
            return

    return _SSEResponse(events(), cancel)


class _BodyLimit:
    """ASGI middleware: a request body over ``MAX_BODY_BYTES`` gets HTTP 413, one not received within
    ``BODY_TIMEOUT_S`` gets 408 (the app's error handler writes both)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"0")
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S

        async def limited_receive():
            nonlocal received, complete
            if complete:  # the body is in: what follows is the wait for a disconnect
                return await receive()
            if size.isdigit() and int(size) > MAX_BODY_BYTES:
                raise HTTPException(413, f"request body over {MAX_BODY_BYTES:,} bytes")
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {BODY_TIMEOUT_S:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > MAX_BODY_BYTES:
                    raise HTTPException(413, f"request body over {MAX_BODY_BYTES:,} bytes")
            return message

        await self.app(scope, limited_receive, send)


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


async def _watch_disconnect(request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (the request body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


# -- running it ------------------------------------------------------------------------------------
def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line UserError (port taken, bad address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # cut running generations first, so their streams can still send the final chunk and [DONE]
            # before uvicorn's graceful wait runs out and cancels them mid-response
            app.state.engine.cancel_all()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                                 access_log=log_level == "info"))


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); yields its base URL."""
    sock = bind(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield base_url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _serve(args: argparse.Namespace) -> int:
    cfg = from_dict(ServeConfig, dataclass_overrides(args, ServeConfig), "serve")
    device = parse_device(args.device)
    app = create_app(args.checkpoint, cfg, device=device, dtype=inference_dtype(args.dtype, device))
    sock = bind(cfg.host, cfg.port)
    if not is_loopback(cfg.host):
        print(f"tinygemma serve: warning: listening on {cfg.host}, not loopback: anyone who can reach this "
              "machine can use the model (there is no authentication)", file=sys.stderr)
    print(f"tinygemma studio: {base_url(cfg.host, sock.getsockname()[1])}/  (API: /v1/completions, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    _uvicorn_server(app, "info").run(sockets=[sock])
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page that streams stories and shows training; OpenAI-style API",
                       description="Serve a checkpoint (or a run folder: its best/ model plus its training "
                                   "curves and latest samples report) on a local web page and an "
                                   "OpenAI-style completions API.")
    add_checkpoint_arg(p, metavar="CKPT_OR_RUN")
    add_dataclass_args(p, ServeConfig)
    add_device_arg(p)
    add_dtype_arg(p)
    p.set_defaults(func=_serve)

