"""Studio: ``tinygemma serve``, a local web page that streams stories, plus an OpenAI-style API.

The page (``static/``: plain HTML/JS/CSS, nothing fetched from the internet) asks the API below
for a story and shows it token by token. Given a run folder it also draws the training curves
from ``metrics.jsonl`` and shows the newest samples report.

API: ``POST /v1/completions`` (the OpenAI completions fields that apply, streaming as server-sent
events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

Generation runs in one background thread, never on the event loop: requests are batched together
(continuous batching, see ``engine``), ``batch_rows`` rows at a time; up to ``queue`` more requests
wait for a row, and a request beyond that gets 429. A client that goes away frees its rows before
the next token. Requests are validated by pydantic
(422 with a one-line message); nothing in a request names a file; errors never show a traceback.
"""


import asyncio
import contextlib
import html
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tinygemma.config import UserError
from tinygemma.model import Gemma3
from tinygemma.quant import load_for_inference
from tinygemma.rundir import METRICS, display_name, latest_report, read_metrics
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.config import ServeConfig, log
from tinygemma.serve.engine import Engine, Job
from tinygemma.serve.openai import (
    EXAMPLE_PROMPTS,
    Invalid,
    Reply,
    complete_reply,
    error_response,
    request_model,
    stream_reply,
    validation_error,
)
from tinygemma.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"




MAX_BODY_BYTES = 1 << 20  # a request body (a completion request is a few KB)
BODY_TIMEOUT_S = 10.0  # to receive a whole body: a client trickling one byte at a time holds no slot for long




def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        cfg, mc = self.cfg, self.model.config
        self.engine = Engine(self.model, self.tok, cfg.batch_rows, cfg.queue, self.context)
        self.request_type = request_model(cfg, self.context, mc.vocab_size)

    @property
    def context(self) -> int:
        """The tokens a request may span: the model's context, or the server's shorter --max-context."""
        return self.cfg.context(self.model.config.context_length)

    @classmethod
    def load(cls, source: str | Path | Gemma3, cfg: ServeConfig, *, device: str | torch.device,
             dtype: str | None, tokenizer: Tokenizer | None, run_dir: str | Path | None,
             model_id: str | None) -> "Studio":
        if isinstance(source, Gemma3):
            model, model_id = source.eval(), model_id or "tinygemma"
        else:
            path = Path(source)
            model = load_for_inference(path, device, dtype)
            model_id = model_id or display_name(path)
            if run_dir is None and not (path / "config.json").is_file():
                run_dir = path
        return cls(model, tokenizer or Tokenizer(), cfg, model_id, Path(run_dir) if run_dir is not None else None)

    def info(self) -> dict:
        cfg = self.cfg
        return {"model": self.model_id, "params": self.model.num_params(),
                "context_length": self.model.config.context_length, "max_context": self.context,
                "max_tokens": cfg.max_tokens_cap(self.context), "max_prompt_chars": cfg.max_prompt_chars,
                "batch_rows": cfg.batch_rows, "queue": cfg.queue, "examples": EXAMPLE_PROMPTS,
                "run": self.run.name if self.run else None}

    def make_job(self, body) -> Job:
        tok, context = self.tok, self.context
        whose = "the model's context" if context == self.model.config.context_length else "the server's --max-context"
        ids = []
        for i, p in enumerate(body.prompts()):
            row = [tok.eot_id] + (tok.encode(p) if isinstance(p, str) else list(p))
            if len(row) + body.max_tokens > context:
                raise Invalid(f"prompt {i} is {len(row)} tokens (with the leading <|endoftext|>); with max_tokens="
                               f"{body.max_tokens} it does not fit {whose} of {context} tokens",
                               "prompt")
            ids.append(row)
        sampling = SamplingConfig(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, greedy=body.temperature == 0, seed=body.seed,
                                  num_samples=body.n)
        return Job(ids, sampling, body.stops())


def create_app(source: str | Path | Gemma3, config: ServeConfig | None = None, *, device: str = "cpu",
               dtype: str | None = None, tokenizer: Tokenizer | None = None,
               run_dir: str | Path | None = None, model_id: str | None = None) -> FastAPI:
    """The FastAPI app serving a checkpoint/run folder (``source`` a path, loaded in ``dtype``: auto, fp32, bf16
    or int8 as :func:`tinygemma.quant.load_for_inference` takes it, default the stored one) or an already loaded
    model.

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


def _add_error_handlers(app: FastAPI, request_type: type) -> None:
    """Every error as OpenAI's error object; never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors(), request_type.model_fields)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error"}.get(
            exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("error while serving %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (see the server's log)", "server_error")


def _add_page_routes(app: FastAPI, studio: Studio) -> None:
    """The page, its static files, and what it reads: model info, health, the run's metrics and report."""
    run = studio.run

    @app.get("/health")
    async def health():
        engine = studio.engine
        return {"status": "ok", "model": studio.model_id, "active": engine.active, "queued": engine.queued,
                "batch_rows": engine.batch_rows, "queue": engine.queue, "stats": dict(engine.stats)}

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
            return error_response(404, f"model '{body.model}' is not served here; this server has '{model_id}' "
                               "(or leave model out)", "not_found_error", "model")
        try:
            job = await asyncio.to_thread(studio.make_job, body)
        except Invalid as e:
            return error_response(422, str(e), "invalid_request_error", e.param)
        reply = Reply(model_id)
        if not body.stream:
            return await complete_reply(engine, job, request, reply)
        return stream_reply(engine, job, reply, bool(body.stream_options and body.stream_options.include_usage))


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


def uvicorn_server(app, log_level: str):
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
    server = uvicorn_server(app, log_level)
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
