"""The OpenAI-style request schema, errors and streamed replies."""
import asyncio
import difflib
import json
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tinygemma.config import MAX_SEED
from tinygemma.prompts import FEATURES, TUTORIAL_PROMPTS, instruction_header
from tinygemma.serve.config import ServeConfig, log
from tinygemma.serve.engine import Engine, Job, Result

EXAMPLE_PROMPTS = TUTORIAL_PROMPTS  # one-click examples on the story page
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 64


# -- API schema ------------------------------------------------------------------------------------
def request_model(cfg: ServeConfig, context_length: int, vocab_size: int) -> type:
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
        seed: int | None = Field(None, ge=0, lt=MAX_SEED)
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
            return instruction_header(words=self.words, features=self.features, summary=self.summary,
                                      sentence=self.sentence) or ""

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


def error_response(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
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


def validation_error(errors: list[dict], fields: dict) -> JSONResponse:
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


@dataclass
class Reply:
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


def busy_response(engine: Engine) -> JSONResponse:
    return error_response(429, engine.busy_message(), "rate_limit_error", headers={"Retry-After": "1"})


async def complete_reply(engine: Engine, job: Job, request: Request, reply: Reply) -> dict | JSONResponse:
    """The whole completion in one response (429 when the engine's queue is full); stopped if the client goes
    away first."""
    cancel = threading.Event()
    future = engine.submit(job, None, cancel)
    if future is None:
        return busy_response(engine)
    watcher = asyncio.create_task(watch_disconnect(request, cancel))
    try:
        result = await asyncio.wrap_future(future)
    finally:
        watcher.cancel()
        cancel.set()  # frees the rows if this request itself was cancelled
    if result.cancelled:
        return error_response(499, "client closed the request", "cancelled")
    return reply.obj([{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                      for i, (t, f) in enumerate(zip(result.texts, result.finish, strict=True))], usage=_usage(result))


def stream_reply(engine: Engine, job: Job, reply: Reply, include_usage: bool) -> _SSEResponse | JSONResponse:
    """The completion as server-sent events: a chunk per row per decoding step, then ``data: [DONE]`` (429 when
    the engine's queue is full)."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancel.set()

    def done(future: Future) -> None:
        if future.exception() is None:
            put(("done", future.result()))
        else:
            log.error("generation failed", exc_info=future.exception())
            put(("error", None))

    future = engine.submit(job, lambda changes: put(("step", changes)), cancel)
    if future is None:
        return busy_response(engine)
    future.add_done_callback(done)

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


class Invalid(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


async def watch_disconnect(request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (the request body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
