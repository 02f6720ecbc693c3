"""serve.engine: continuous batching, against a deterministic fake decoder (the real one is tested in test_serve)."""

import threading
import time

import pytest
import torch

from tinygemma.config import UserError
from tinygemma.decode import row_seed
from tinygemma.sampling import SamplingConfig
from tinygemma.serve.engine import Engine, Job

WORDS = [" cat", " dog", " sun", " big", " red", " ran", " sat", " hat", " box", " fox", ".", " and"]


class FakeDecoder:
    """Stands in for tinygemma.decode.Decoder: a row's t-th token depends only on its prompt, t and (when sampled)
    its seed; a prompt ending in token 0 writes <|endoftext|> after 3 tokens. ``log`` records every call."""

    def __init__(self, model, rows: int, max_len: int, *, eot: int, words: list[int], delay: float = 0.0,
                 fail_on: int | None = None):
        self.rows, self.max_len, self.eot, self.words, self.delay, self.fail_on = rows, max_len, eot, words, delay, \
            fail_on
        self.slots: dict[int, list] = {}
        self.log: list[tuple] = []
        self.seeds: list[int | None] = []
        self.lock = threading.Lock()  # the engine calls from one thread: this checks it never overlaps

    @staticmethod
    def token(prompt: list[int], cfg: SamplingConfig, seed: int | None, t: int, eot: int, words: list[int]) -> int:
        if prompt[-1] == 0 and t == 3:
            return eot
        salt = (seed or 0) * 7 if cfg.temperature > 0 and not cfg.greedy else 0
        return words[(sum(prompt) + 5 * t + salt) % len(words)]

    def add(self, prompt_ids: list[int], cfg: SamplingConfig, seed: int | None = None) -> int:
        with self.lock:
            if prompt_ids[-1] == self.fail_on:
                raise RuntimeError("secret detail")
            free = [s for s in range(self.rows) if s not in self.slots]
            if not free or len(prompt_ids) + cfg.max_new_tokens > self.max_len:
                raise UserError("no free slot or too long")
            self.slots[free[0]] = [prompt_ids, cfg, seed, 0]
            self.seeds.append(seed)
            self.log.append(("add", free[0], tuple(prompt_ids)))
            return free[0]

    def step(self) -> torch.Tensor:
        with self.lock:
            time.sleep(self.delay)
            out = torch.full((self.rows,), -1)
            for slot, state in self.slots.items():
                out[slot] = self.token(*state, self.eot, self.words)
                state[3] += 1
            self.log.append(("step", tuple(sorted(self.slots))))
            return out

    def remove(self, slot: int) -> None:
        with self.lock:
            del self.slots[slot]
            self.log.append(("remove", slot))


@pytest.fixture
def make_engine(tokenizer):
    engines = []

    def make(rows: int, queue: int, max_len: int = 64, **kw) -> tuple[Engine, FakeDecoder]:
        words = [tokenizer.encode(w)[0] for w in WORDS]
        assert all(len(tokenizer.encode(w)) == 1 for w in WORDS)
        made = []

        def factory(model, r, m):
            made.append(FakeDecoder(model, r, m, eot=tokenizer.eot_id, words=words, **kw))
            return made[0]

        engine = Engine(None, tokenizer, rows, queue, max_len, decoder=factory)
        engines.append(engine)
        return engine, made[0]

    yield make
    for e in engines:
        e.shutdown()


def job(prompt: list[int], max_tokens: int, stop=(), n: int = 1, **kw) -> Job:
    return Job([prompt], SamplingConfig(max_new_tokens=max_tokens, num_samples=n, **kw), list(stop))


def direct_ids(tokenizer, dec: FakeDecoder, j: Job) -> list[list[int]]:
    """The tokens of each row of ``j``, from the fake's token rule."""
    out = []
    for r in range(j.rows()):
        ids = []
        for t in range(j.sampling.max_new_tokens):
            tok = dec.token(j.row_prompt(r), j.sampling, j.row_seed(r), t, dec.eot, dec.words)
            if tok == tokenizer.eot_id:
                break
            ids.append(tok)
        out.append(ids)
    return out


def direct(tokenizer, dec: FakeDecoder, j: Job) -> list[str]:
    """What each row of ``j`` must say (without stop sequences)."""
    return [tokenizer.decode(ids) for ids in direct_ids(tokenizer, dec, j)]


def run(engine: Engine, j: Job, cancel: threading.Event | None = None):
    """Submit and collect the emitted pieces per row; returns (future, pieces)."""
    pieces: dict[int, list] = {}
    fut = engine.submit(j, lambda changes: [pieces.setdefault(r, []).append((t, f)) for r, t, f in changes],
                        cancel or threading.Event())
    return fut, pieces


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_batched_rows_equal_their_direct_text(make_engine, tokenizer):
    """Requests joining and leaving at different steps, greedy and sampled, several rows each: every row gets
    exactly the tokens its own prompt gives, and the rows really shared steps."""
    engine, dec = make_engine(rows=4, queue=8, delay=0.002)
    jobs = [job([50256, 11, 12], 9, greedy=True, temperature=0), job([50256, 40], 3, temperature=0),
            job([50256, 99, 0], 8, temperature=0),  # ends with <|endoftext|> after 3 tokens
            job([50256, 7, 8, 9, 10], 12, temperature=0.9, seed=4, n=3),
            job([50256, 5], 6, temperature=0)]
    futures = []
    for j in jobs:
        futures.append(run(engine, j))
        time.sleep(0.003)  # later requests join a running batch
    for (fut, pieces), j in zip(futures, jobs, strict=True):
        res = fut.result(10)
        want = direct(tokenizer, dec, j)
        assert res.texts == want and not res.cancelled
        assert ["".join(t for t, _ in pieces[r]) for r in range(j.rows())] == want
        assert [pieces[r][-1][1] for r in range(j.rows())] == res.finish  # the last piece says how it ended
        assert all(f is None for r in pieces for _, f in pieces[r][:-1])
    assert futures[2][0].result().finish == ["stop"] and futures[1][0].result().finish == ["length"]
    assert len(set(futures[3][0].result().texts)) == 3, "the samples of one prompt differ (own seeds)"
    assert max(len(e[1]) for e in dec.log if e[0] == "step") == 4, "rows decoded together"
    assert engine.stats["completed"] == 5 and engine.active == 0 and dec.slots == {}
    assert engine.stats["completion_tokens"] == sum(len(ids) for j in jobs for ids in direct_ids(tokenizer, dec, j))


def test_cancel_mid_batch_frees_the_row_for_the_queue(make_engine, tokenizer):
    engine, dec = make_engine(rows=2, queue=2, delay=0.005)
    long_a, long_b, queued = job([50256, 3], 60, temperature=0), job([50256, 4], 30, temperature=0), \
        job([50256, 6], 5, temperature=0)
    cancel = threading.Event()
    fa, pa = run(engine, long_a, cancel)
    fb, _ = run(engine, long_b)
    fc, _ = run(engine, queued)
    wait_for(lambda: sum(len(p) for p in pa.values()) >= 3)
    assert engine.queued == 1 and fc.done() is False
    cancel.set()
    res_a = fa.result(10)
    assert res_a.cancelled and res_a.finish == [None] and 3 <= res_a.completion_tokens < 60
    assert fb.result(10).texts == direct(tokenizer, dec, long_b)
    assert fc.result(10).texts == direct(tokenizer, dec, queued)
    # A's slot was removed before the next step, and that step already ran the queued request in it
    slot_a = next(e[1] for e in dec.log if e[0] == "add" and e[2] == (50256, 3))
    i = dec.log.index(("remove", slot_a))
    assert dec.log[i + 1] == ("add", slot_a, (50256, 6)) and dec.log[i + 2][0] == "step"
    assert engine.stats["cancelled"] == 1 and engine.stats["completed"] == 2


def test_queue_bound_refuses_and_queued_requests_run_in_order(make_engine, tokenizer):
    engine, dec = make_engine(rows=1, queue=1, delay=0.005)
    fa, _ = run(engine, job([50256, 1], 20, temperature=0))
    fb, _ = run(engine, job([50256, 2], 4, temperature=0))
    assert engine.submit(job([50256, 3], 4, temperature=0), None, threading.Event()) is None
    assert engine.stats["refused"] == 1 and engine.active == 2 and engine.queued == 1
    assert "--batch-rows 1, --queue 1" in engine.busy_message()
    assert fa.result(10).finish == ["length"] and fb.result(10).finish == ["length"]
    adds = [e[2][1] for e in dec.log if e[0] == "add"]
    assert adds == [1, 2]
    # a request needing more rows than are free is queued: refused without a queue
    engine2, _ = make_engine(rows=2, queue=0)
    assert engine2.submit(job([50256, 1], 3, n=3, temperature=0), None, threading.Event()) is None
    assert engine2.submit(job([50256, 1], 3, n=2, temperature=0), None, threading.Event()).result(10)


def test_a_request_with_more_rows_than_the_batch(make_engine, tokenizer):
    engine, dec = make_engine(rows=2, queue=1)
    j = Job([[50256, 1], [50256, 2, 0], [50256, 3]], SamplingConfig(max_new_tokens=5, temperature=0.5, seed=9,
                                                                   num_samples=2), [])
    assert engine.submit(j, None, threading.Event()).result(10).texts == direct(tokenizer, dec, j)
    assert max(len(e[1]) for e in dec.log if e[0] == "step") == 2


def test_stop_sequences_and_max_tokens_per_row(make_engine, tokenizer):
    engine, dec = make_engine(rows=3, queue=0, delay=0.002)
    plain = job([50256, 21], 12, temperature=0)
    text = direct(tokenizer, dec, plain)[0]
    stop = text[len(text) // 2: len(text) // 2 + 4]  # spans two words: held back until it is decided
    jobs = [job([50256, 21], 12, [stop, "zzz"], temperature=0), job([50256, 21], 5, temperature=0), plain]
    futures = [run(engine, j) for j in jobs]
    stopped, short, full = (f.result(10) for f, _ in futures)
    assert stopped.texts == [text[:text.index(stop)]] and stopped.finish == ["stop"]
    assert "".join(t for t, _ in futures[0][1][0]) == stopped.texts[0]
    assert short.texts == direct(tokenizer, dec, jobs[1]) and short.finish == ["length"]
    assert full.texts == [text] and full.finish == ["length"]
    assert max(len(e[1]) for e in dec.log if e[0] == "step") == 3, "in one batch"


def test_seeded_rows_reproducible_and_seedless_rows_differ(make_engine, tokenizer):
    engine, dec = make_engine(rows=4, queue=4)
    j = job([50256, 30], 8, temperature=0.8, seed=123, n=2)
    first = engine.submit(j, None, threading.Event()).result(10).texts
    assert engine.submit(j, None, threading.Event()).result(10).texts == first
    assert len(set(first)) == 2 and dec.seeds[:2] == [row_seed(123, 0), row_seed(123, 1)] == dec.seeds[2:]
    engine.submit(job([50256, 30], 8, temperature=0.8, n=2), None, threading.Event()).result(10)
    assert dec.seeds[-2:] == [None, None]  # the decoder draws fresh seeds


def test_a_failing_row_fails_only_its_request(make_engine, tokenizer):
    engine, dec = make_engine(rows=2, queue=2, delay=0.002, fail_on=77)
    ok = job([50256, 5], 10, temperature=0)
    fo, _ = run(engine, ok)
    bad = Job([[50256, 5], [50256, 77]], SamplingConfig(max_new_tokens=5, temperature=0), [])
    fb, _ = run(engine, bad)
    with pytest.raises(RuntimeError, match="secret"):
        fb.result(10)
    assert fo.result(10).texts == direct(tokenizer, dec, ok)
    assert engine.stats["errors"] == 1 and engine.stats["completed"] == 1 and dec.slots == {}


def test_cancel_all_and_shutdown(make_engine, tokenizer):
    engine, dec = make_engine(rows=1, queue=2, delay=0.005)
    futures = [run(engine, job([50256, k], 50, temperature=0))[0] for k in (1, 2)]
    wait_for(lambda: len(dec.log) > 3)
    assert engine.shutdown()
    assert [f.result(1).cancelled for f in futures] == [True, True] and dec.slots == {}
    assert engine.submit(job([50256, 1], 2), None, threading.Event()) is None


def test_an_error_in_the_loop_fails_the_requests_not_the_engine(make_engine, tokenizer):
    engine, dec = make_engine(rows=2, queue=2)

    def broken(changes):
        raise KeyError("bug")

    with pytest.raises(KeyError, match="bug"):
        engine.submit(job([50256, 8], 5, temperature=0), broken, threading.Event()).result(10)
    j = job([50256, 9], 5, temperature=0)
    assert engine.submit(j, None, threading.Event()).result(10).texts == direct(tokenizer, dec, j)
    assert engine.stats["errors"] == 1 and engine.stats["completed"] == 1 and dec.slots == {}
