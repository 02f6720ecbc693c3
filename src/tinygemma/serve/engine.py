"""The decoding engine behind the studio: queued jobs decoded token by token."""


import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tinygemma.generate import TextStream, stream
from tinygemma.model import Gemma3
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


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
