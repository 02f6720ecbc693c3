"""The decoding engine behind the studio: continuous batching of the API's requests.

One :class:`~tinygemma.decode.Decoder` with ``rows`` slots decodes in one background thread. Each row of a
request (a prompt × one of its ``n`` samples) takes a free slot and joins the running batch at the next step;
it leaves when it finishes (``<|endoftext|>``, its ``max_tokens`` or a stop sequence), when its request is
cancelled, or when its client goes away, and the slot is free for the next row at once. A row's tokens depend
only on its own prompt, settings and seed, never on its batch mates. Requests that find no free slot wait in a
bounded FIFO queue; beyond that they are refused (HTTP 429).
"""


import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tinygemma.decode import Decoder, row_seed
from tinygemma.generate import TextStream
from tinygemma.model import Gemma3
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.config import log
from tinygemma.tokenizer import Tokenizer


# -- one completion's text -------------------------------------------------------------------------
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


# -- requests --------------------------------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[list[int]]  # each starting with <|endoftext|>
    sampling: SamplingConfig
    stop: list[str]

    def rows(self) -> int:
        return len(self.prompt_ids) * self.sampling.num_samples

    def row_prompt(self, row: int) -> list[int]:
        return self.prompt_ids[row // self.sampling.num_samples]  # prompt-major, as generate_rows orders rows

    def row_seed(self, row: int) -> int | None:
        """The row's own seed, the one generate_rows gives it: its texts match `tinygemma generate`'s."""
        return row_seed(self.sampling.seed, row % self.sampling.num_samples)


@dataclass
class Result:
    texts: list[str]
    finish: list[str | None]  # None for rows of a cancelled job
    prompt_tokens: int
    completion_tokens: int
    cancelled: bool


Emit = Callable[[list[tuple[int, str, str | None]]], None]


class DecoderLike(Protocol):
    """What the engine needs of :class:`Decoder` (tests stand in a fake)."""

    def add(self, prompt_ids: list[int], cfg: SamplingConfig, seed: int | None = None) -> int: ...
    def step(self) -> torch.Tensor: ...
    def remove(self, slot: int) -> None: ...


@dataclass(eq=False)
class _Ticket:
    """A request in the engine: its rows' text, and where its rows are (queued, promised a slot, decoding)."""

    job: Job
    emit: Emit | None
    cancel: threading.Event
    rows: list[_Row]
    future: Future = field(default_factory=Future)
    unpromised: deque[int] = field(default_factory=deque)  # rows still waiting for a slot
    held: int = 0  # rows promised a slot or decoding in one
    failed: BaseException | None = None

    def gone(self) -> bool:
        """Cancelled or failed: its rows leave the batch."""
        return self.cancel.is_set() or self.failed is not None

    def finished(self) -> bool:
        return not self.held and (self.gone() or all(r.finish is not None for r in self.rows))

    def result(self) -> Result:
        return Result([r.text for r in self.rows], [r.finish for r in self.rows],
                      sum(map(len, self.job.prompt_ids)), sum(r.tokens for r in self.rows), self.cancel.is_set())


@dataclass
class _Live:
    """A decoder slot's occupant."""

    ticket: _Ticket
    index: int  # the row in its ticket


# -- the engine ------------------------------------------------------------------------------------
class Engine:
    """Continuous batching over one decoder of ``rows`` slots; at most ``queue`` requests wait for a slot."""

    def __init__(self, model: Gemma3, tokenizer: Tokenizer, rows: int, queue: int, max_len: int, *,
                 decoder: Callable[[Gemma3, int, int], DecoderLike] = Decoder):
        self.model, self.tokenizer, self.batch_rows, self.queue = model, tokenizer, rows, queue
        self._decoder = decoder(model, rows, max_len)
        self._cond = threading.Condition()
        # under the lock: the admitted requests, the FIFO of those with rows still unplaced, promised rows
        self._tickets: set[_Ticket] = set()
        self._queue: deque[_Ticket] = deque()
        self._ready: list[tuple[_Ticket, int]] = []  # promised a slot: the decode thread adds them next
        self._free = rows  # slots neither decoding nor promised
        self._stopping = False
        self._slots: dict[int, _Live] = {}  # the decode thread's own
        self.stats = {"requests": 0, "refused": 0, "completed": 0, "cancelled": 0, "errors": 0,
                      "completion_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="tinygemma-decode", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests admitted and not finished (decoding or queued)."""
        return len(self._tickets)

    @property
    def queued(self) -> int:
        """Requests with rows still waiting for a slot."""
        return len(self._queue)

    def submit(self, job: Job, emit: Emit | None, cancel: threading.Event) -> "Future[Result] | None":
        """Admit a request, or None when the queue is full (HTTP 429).

        Its rows join the batch as slots free up, in arrival order. ``emit`` gets, after each step (in the decode
        thread), ``(row, new_text, finish_reason)`` for the request's rows that changed; then the future gets the
        :class:`Result` (or the error). Setting ``cancel`` frees the request's slots before the next step.
        """
        ticket = _Ticket(job, emit, cancel, [_Row(self.tokenizer, job.stop) for _ in range(job.rows())])
        ticket.unpromised.extend(range(job.rows()))
        with self._cond:
            fits_now = not self._queue and self._free >= job.rows()
            if self._stopping or (not fits_now and len(self._queue) >= self.queue):
                self.stats["refused"] += 1
                return None
            self.stats["requests"] += 1
            self._tickets.add(ticket)
            self._queue.append(ticket)
            self._promise()
            self._cond.notify()
        return ticket.future

    def busy_message(self) -> str:
        return (f"server busy: {self.batch_rows} rows decoding and {self.queued} requests queued (--batch-rows "
                f"{self.batch_rows}, --queue {self.queue}); try again shortly")

    def cancel_all(self) -> None:
        """Stop every request at the next step (their streams end with finish_reason cancelled)."""
        with self._cond:
            for t in self._tickets:
                t.cancel.set()
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Cancel every request and stop the decode thread; False if it did not stop within ``timeout``."""
        with self._cond:
            self._stopping = True
        self.cancel_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- bookkeeping (under the lock) ------------------------------------------------------------------
    def _promise(self) -> None:
        """Give free slots to the queued rows, first come first served."""
        while self._queue and self._free:
            t = self._queue[0]
            while t.unpromised and self._free:
                self._ready.append((t, t.unpromised.popleft()))
                t.held += 1
                self._free -= 1
            if not t.unpromised:
                self._queue.popleft()

    def _release(self, ticket: _Ticket) -> None:
        """One row of ``ticket`` gave back its slot (or its promise of one)."""
        ticket.held -= 1
        self._free += 1

    # -- the decode thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._ready or self._slots or self._stopping or self._any_gone()):
                        self._cond.wait()
                    if self._stopping and not self._tickets:
                        return
                ready: deque[tuple[_Ticket, int]] = deque()
                try:
                    self._drop_gone()  # first, so that the rows it frees are placed in this step
                    with self._cond:
                        ready.extend(self._ready)
                        self._ready.clear()
                    self._place(ready)
                    if self._slots:
                        self._step()
                except Exception as e:  # a bug here must not leave requests hanging: fail them all
                    log.exception("the decode loop failed")
                    with self._cond:
                        for t in self._tickets:
                            t.failed = t.failed or e
                        for t, _ in ready:
                            self._release(t)
                    # the next round frees their slots (each try takes one out of the batch, even if it fails)

    def _any_gone(self) -> bool:
        return any(t.gone() for t in self._tickets)

    def _vacate(self, slot: int) -> None:
        live = self._slots.pop(slot)
        try:
            self._decoder.remove(slot)
        finally:
            with self._cond:
                self._release(live.ticket)

    def _drop_gone(self) -> None:
        """Free at once the slots of cancelled (or failed) requests, and take them out of the queue."""
        for slot in [s for s, live in self._slots.items() if live.ticket.gone()]:
            self._vacate(slot)
        with self._cond:
            for t in [t for t in self._queue if t.gone()]:
                self._queue.remove(t)
                t.unpromised.clear()
            self._promise()
            done = self._settle([t for t in self._tickets if t.gone()])
        _resolve(done)

    def _place(self, ready: deque[tuple[_Ticket, int]]) -> None:
        """Prefill the promised rows into slots (a row of a request that is gone gives its promise back)."""
        while ready:
            t, i = ready[0]
            if not t.gone():
                try:
                    slot = self._decoder.add(t.job.row_prompt(i), t.job.sampling, seed=t.job.row_seed(i))
                    self._slots[slot] = _Live(t, i)
                    ready.popleft()
                    continue
                except Exception as e:
                    t.failed = e
            with self._cond:
                self._release(t)
            ready.popleft()
        self._drop_gone()  # the other rows of a request whose row failed

    def _step(self) -> None:
        try:
            tokens = self._decoder.step().tolist()  # the step's one host copy
        except Exception as e:
            for live in self._slots.values():
                live.ticket.failed = live.ticket.failed or e
            self._drop_gone()
            return
        eot = self.tokenizer.eot_id
        changes: dict[_Ticket, list[tuple[int, str, str | None]]] = {}
        for slot, live in list(self._slots.items()):
            row, limit = live.ticket.rows[live.index], live.ticket.job.sampling.max_new_tokens
            text = row.push(tokens[slot], eot)
            if row.finish is None and row.tokens >= limit:
                text += row.end("length")
            if text or row.finish:
                changes.setdefault(live.ticket, []).append((live.index, text, row.finish))
            if row.finish is not None:
                self._vacate(slot)  # before the next step: the slot takes a queued row at once
        for t, rows in changes.items():
            if t.emit is not None:
                t.emit(rows)
        with self._cond:
            self._promise()
            done = self._settle(list(changes))
        _resolve(done)

    def _settle(self, tickets: list[_Ticket]) -> list[_Ticket]:
        """Take the finished requests among ``tickets`` out of the engine and count them (under the lock)."""
        done = [t for t in tickets if t in self._tickets and t.finished()]
        for t in done:
            self._tickets.discard(t)
            status = "errors" if t.failed is not None else "cancelled" if t.cancel.is_set() else "completed"
            self.stats[status] += 1
            self.stats["completion_tokens"] += sum(r.tokens for r in t.rows)
        return done


def _resolve(tickets: list[_Ticket]) -> None:
    """Hand finished requests their result (outside the lock: the futures' callbacks run here)."""
    for t in tickets:
        if t.failed is not None:
            t.future.set_exception(t.failed)
        else:
            t.future.set_result(t.result())
