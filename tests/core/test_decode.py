"""The Decoder (src/tinygemma/decode.py): rows joining and leaving a running batch get exactly their tokens
alone; seeded sampling depends on the row's seed only; one compiled step is one graph that never recompiles and
never syncs with the host. On the tiny preset (window 16 < the sequences here, a full-attention layer, MQA)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.train.test_host_sync import install_counter
from tinygemma.config import UserError
from tinygemma.decode import CANDIDATES, GREEDY, Decoder, decode_step, kernel_calls
from tinygemma.device import generation_bytes
from tinygemma.generate import generate_ids
from tinygemma.model import PRESETS, Gemma3, ModelConfig
from tinygemma.sampling import SamplingConfig

GREEDY_CFG = SamplingConfig(max_new_tokens=30, greedy=True)
SAMPLED = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9)
aten = torch.ops.aten
# ops that hand a value to the host (or, like multinomial on CUDA, wait for one)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
            aten.masked_select.default, aten.multinomial.default, aten.item.default, aten._unique2.default}


def decisive(m):
    """Large random weights: decisive logits and varied outputs (see tests/core/test_generate.py)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 1.0 if "embed" in name else 0.1 if "norm" in name else 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return decisive(Gemma3(ModelConfig(**{**PRESETS["tiny"], "tie_embeddings": False})))


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


def run(decoder, steps, record):
    """``steps`` steps; ``record`` maps slot -> list to which that slot's tokens are appended."""
    for _ in range(steps):
        out = decoder.step().tolist()
        for slot, got in record.items():
            got.append(out[slot])


def test_greedy_rows_equal_generate_alone(model):
    prompts = prompts_of([40, 3, 17, 1])
    decoder = Decoder(model, rows=4, max_len=80)
    record = {decoder.add(p, GREEDY_CFG): [] for p in prompts}
    run(decoder, 30, record)
    model.config.eot_token_id = -1  # alone, without stopping at <|endoftext|> either
    try:
        alone = [generate_ids(model, [p], GREEDY_CFG)[0] for p in prompts]
    finally:
        model.config.eot_token_id = 50256
    assert list(record.values()) == alone
    assert len({tuple(r) for r in alone}) == 4


def test_rows_join_and_leave_without_changing_a_row(model):
    """A greedy and a sampled row keep their tokens while others are added and removed around them, and a
    slot freed mid-way is reused by a new row that gets its own tokens alone."""
    a, b, c = prompts_of([20, 5, 33], seed=2)
    sampled = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=0, top_p=0.95, seed=11)

    def alone(prompt, cfg):
        d = Decoder(model, rows=1, max_len=80)
        record = {d.add(prompt, cfg): []}
        run(d, cfg.max_new_tokens, record)
        return record[0]

    d = Decoder(model, rows=3, max_len=80)
    ra, rs = d.add(a, GREEDY_CFG), d.add(a, sampled)
    record = {ra: [], rs: []}
    run(d, 5, record)
    rb = d.add(b, GREEDY_CFG)
    run(d, 10, record)
    d.remove(rb)
    rc = d.add(c, SamplingConfig(max_new_tokens=15, greedy=True))
    assert rc == rb  # the freed slot
    record[rc] = []
    run(d, 15, record)
    assert record[ra] == alone(a, GREEDY_CFG)
    assert record[rs] == alone(a, sampled)
    assert record[rc] == alone(c, SamplingConfig(max_new_tokens=15, greedy=True))
    assert record[rs] != record[ra]


def test_seeded_sampling_is_reproducible_and_the_rows_own(model):
    prompts = prompts_of([12, 7, 25], seed=3)
    cfgs = [SAMPLED, SamplingConfig(max_new_tokens=30, temperature=0.7, top_k=0, top_p=1.0), GREEDY_CFG]

    def tokens(rows, seeds):
        d = Decoder(model, rows=len(rows), max_len=64)
        record = {d.add(prompts[i], cfgs[i], seed=s): [] for i, s in zip(rows, seeds, strict=True)}
        run(d, 30, record)
        return list(record.values())

    both = tokens([0, 1, 2], [5, 6, 7])
    assert both == tokens([0, 1, 2], [5, 6, 7])
    assert tokens([0], [5])[0] == both[0] and tokens([1], [6])[0] == both[1]  # alone: the same draws
    assert tokens([1, 0], [9, 5])[1] == both[0]  # another slot, other batch mates
    assert tokens([0], [4])[0] != both[0]


def test_generate_rows_sample_independently_of_the_other_prompts(model):
    p, q = prompts_of([12, 30], seed=4)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, seed=3, num_samples=2)
    together = generate_ids(model, [q, p], cfg)
    assert together[2:] == generate_ids(model, [p], cfg) and together[:2] == generate_ids(model, [q], cfg)
    assert together[2] != together[3]


def test_compiled_step_gives_the_eager_tokens(model):
    prompts = prompts_of([20, 3], seed=5)
    cfgs = [SAMPLED, SamplingConfig(max_new_tokens=30, temperature=0.8, top_k=0, top_p=0.9)]
    out = []
    for compiled in (False, True):
        d = Decoder(model, rows=3, max_len=64, compile=compiled, backend="aot_eager")
        record = {d.add(p, c, seed=2): [] for p, c in zip(prompts, cfgs, strict=True)}
        record[d.add(prompts[0], GREEDY_CFG)] = []
        run(d, 30, record)
        out.append(record)
    assert out[0] == out[1]


@pytest.mark.parametrize("total", [40, 300, 2000])
def test_generation_bytes_is_what_a_decoder_allocates(model, total):
    """The memory check before generating counts the caches the decoder really allocates (full layers bucketed,
    sliding layers a window), plus one float32 row of logits per row."""
    mc = model.config
    total = min(total, mc.context_length)
    decoder = Decoder(model, rows=3, max_len=total, compile=False)
    cache = sum(c.k.nbytes + c.v.nbytes for c in decoder.state.caches)
    assert generation_bytes(mc, 3, total, torch.float32) == cache + 4 * 3 * mc.vocab_size


def test_eager_step_runs_only_the_rows_up_to_the_last_in_use(model):
    """A lone request on a decoder of 8 rows costs a batch of 1 in eager mode; the rows' tokens are unchanged."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        decoder = Decoder(model, rows=8, max_len=64, compile=False)
        cfg = SamplingConfig(max_new_tokens=8, greedy=True)
        a = decoder.add(prompts_of([5])[0], cfg)
        seen.clear()
        first = decoder.step()[a].item()
        b = decoder.add(prompts_of([7], seed=2)[0], cfg)
        decoder.step()
        decoder.remove(a)
        decoder.step()
    finally:
        handle.remove()
    assert (a, b) == (0, 1)
    assert seen == [1, 1, 2, 2]  # a's step; b's prefill; both; b alone, still in slot 1 after slot 0 left
    alone = generate_ids(model, [prompts_of([5])[0]], cfg)[0]
    assert first == alone[0]


def test_bad_input(model):
    d = Decoder(model, rows=2, max_len=100)
    assert d.max_len == 256  # bucketed
    with pytest.raises(UserError, match=r"prompt \(250 tokens\) \+ max_new_tokens \(10\) exceed the decoder's 256"):
        d.add(prompts_of([250])[0], SamplingConfig(max_new_tokens=10))
    with pytest.raises(UserError, match="token ids must lie in"):
        d.add([50257], GREEDY_CFG)
    d.add([1], SamplingConfig(max_new_tokens=2)), d.add([2], GREEDY_CFG)
    with pytest.raises(UserError, match="all 2 rows of the decoder are in use"):
        d.add([3], GREEDY_CFG)
    d.remove(1)
    with pytest.raises(ValueError, match=r"slot 1 is not in use \(in use: \[0\]\)"):
        d.remove(1)
    with pytest.raises(ValueError, match="slot 5 is not in use"):
        d.remove(5)
    d.step(), d.step()
    with pytest.raises(ValueError, match="slot 0 has taken its max_new_tokens steps"):
        d.step()
    with pytest.raises(UserError, match="exceeds the model's context"):
        Decoder(model, rows=1, max_len=513)


# -- one graph, no recompiles, no host syncs ---------------------------------------------------------------
class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_compiled_step_is_one_graph_without_recompiles(model):
    """1,000 steps over rows of 1..100 prompt tokens joining and leaving (one bucket), a greedy and a sampling
    row together: traced once, no graph break, no recompile (dynamo would raise)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    d = Decoder(model, rows=2, max_len=160, compile=True, backend="aot_eager")
    sampled = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=40, seed=1)
    d.add(prompts_of([1])[0], sampled)
    greedy = SamplingConfig(max_new_tokens=40, greedy=True)
    d.add(prompts_of([2])[0], greedy)
    d.step()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    lengths = iter(torch.randint(1, 101, (100,), generator=torch.Generator().manual_seed(0)).tolist())
    steps = 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        while steps < 1000:
            for slot in (0, 1):
                if steps % 40 == 20 * slot:  # rows leave and join at different steps
                    d.remove(slot)
                    d.add(prompts_of([next(lengths)], seed=steps)[0], sampled if slot == 0 else greedy)
            d.step()
            steps += 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_decoders_of_many_shapes_each_get_a_compiled_step(model):
    """More batch sizes than dynamo's recompile limit (lowered to 1 here, 8 by default): every decoder still runs
    compiled (sharing one cache, the second would fall back to eager, silently)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        for rows in (1, 2, 3):
            d = Decoder(model, rows=rows, max_len=32, compile=True, backend="aot_eager")
            d.add([1, 2], GREEDY_CFG)
            d.step()
    assert counters["stats"]["unique_graphs"] == 3


def aten_graph(graphs):
    """A torch.compile backend that keeps the ATen graph (after AOT autograd) of what it compiles, and runs it."""
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm
    return aot_autograd(fw_compiler=keep)


def test_a_step_does_not_sync_with_the_host(model, monkeypatch):
    """Eager: no op that reads a value to the host runs (a dispatch mode sees every op). Compiled (dynamo cannot
    trace under a dispatch mode): fullgraph=True already refuses a read inside the graph; no such op is in the
    one ATen graph, and the step reads nothing around it."""
    graphs = []
    for compiled in (False, True):
        d = Decoder(model, rows=3, max_len=64, compile=compiled, backend=aten_graph(graphs))
        d.add(prompts_of([20])[0], SAMPLED), d.add([5], GREEDY_CFG), d.add(prompts_of([9])[0], SAMPLED)
        d.step()  # compiled: the trace
        counter, log = install_counter(monkeypatch), OpLog()
        if compiled:
            [d.step() for _ in range(3)]
        else:
            with counter, log:
                [d.step() for _ in range(3)]
            assert log.ops and not set(log.ops) & SYNC_OPS
        assert counter.seen == []
    (graph,) = graphs
    ops = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert aten.mm.default in ops and not ops & SYNC_OPS


# gemma3-270m's graph (18 layers, every 6th full, MQA, its vocabulary and window) at a tiny width: the same ops
NARROW_270M = dict(hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=128,
                   query_pre_attn_scalar=16)


def test_eager_step_op_count_of_gemma3_270m():
    """The ATen ops of one eager decode step of gemma3-270m's graph, batch 1: what the compiled step replaces
    (bench/generate.py prints the same count)."""
    big = Gemma3(ModelConfig(**NARROW_270M)).eval()
    counts = {}
    for variant, cfg in ((GREEDY, GREEDY_CFG), (CANDIDATES, SAMPLED)):
        d = Decoder(big, rows=1, max_len=256)
        d.add([1, 2, 3], cfg)
        log = OpLog()
        with log, torch.inference_mode():
            decode_step(big, d.state, variant)
        counts[variant] = len(log.ops)
    print(f"eager ATen ops per decode step of gemma3-270m: greedy {counts[GREEDY]}, sampling {counts[CANDIDATES]}")
    assert 18 * 7 < counts[GREEDY] < counts[CANDIDATES]  # at least the 7 projections per layer


@pytest.mark.slow  # inductor compiles an 18-layer step (about a minute on 2 CPU cores)
def test_compiled_step_of_gemma3_270m_is_at_most_300_kernels():
    """The compiled step of gemma3-270m's graph (18 layers, at a tiny width), a sampling row: the calls in
    inductor's generated code (fused C++ kernels, matmuls, attention, top-k) are at most 300, against ~1,900
    ATen ops eager; and its tokens are the eager step's."""
    from torch._inductor.utils import run_and_get_code

    big = decisive(Gemma3(ModelConfig(**NARROW_270M)))
    tokens = []
    for compiled in (False, True):
        d = Decoder(big, rows=2, max_len=64, compile=compiled)
        d.add([1, 2, 3], SAMPLED, seed=1), d.add([4], GREEDY_CFG)
        out, codes = run_and_get_code(d.step)
        tokens.append([out.tolist()] + [d.step().tolist() for _ in range(5)])
    kernels = kernel_calls(codes[-1])
    print(f"compiled step of gemma3-270m: {len(kernels)} kernel calls")
    assert tokens[0] == tokens[1]
    assert sum(k == "extern_kernels.mm" for k in kernels) == 18 * 7 + 1  # the projections and the head
    assert len(kernels) <= 300
