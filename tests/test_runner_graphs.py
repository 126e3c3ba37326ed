"""model.runner: decode steps captured per padded batch size and replayed on static buffers.

No GPU here. Two step graphs run: the CPU backend's own, :class:`hwlayer.backends.cpu.graph.TracedStepGraph`
(the step traced once by ``torch.jit.trace`` and replayed from C++, what ``serve.py`` uses on a CPU),
and :class:`model.runner.RecordedGraph`, a stand-in that replays the step closure itself, so the
runner's plumbing (host metadata packed into the static buffer, padding rows, context buckets,
copying inputs in, reading outputs out) is checked apart from any capture mechanism.
``torch.cuda.CUDAGraph`` itself is not run.
"""

import pytest
import torch

from hwlayer.backends.cpu.graph import TracedStepGraph
from model import Batch, load_model
from model.runner import ModelRunner, RecordedGraph, context_buckets
from model.tiny import ensure_default_model
from serving.engine import Engine, SamplingParams

GRAPHS = {"traced": TracedStepGraph, "recorded": RecordedGraph}
BLOCK = 4
MAX_LEN = 32  # max_model_len of the runner: 8 blocks per sequence


@pytest.fixture(scope="module")
def tiny():
    return load_model(ensure_default_model(), backend="cpu")


class Recorder:
    """Graph factory that counts captures and replays (to prove the graph path served)."""

    def __init__(self, graph_class=RecordedGraph) -> None:
        self.graph_class = graph_class
        self.captured, self.replayed = 0, 0

    def __call__(self):
        outer, graph = self, self.graph_class()
        capture, replay = graph.capture, graph.replay

        def counted_capture(fn):
            outer.captured += 1
            return capture(fn)

        def counted_replay():
            outer.replayed += 1
            replay()

        graph.capture, graph.replay = counted_capture, counted_replay
        return graph


def prefilled(model, prompts, tables):
    """A fresh cache holding ``prompts`` (sequence b in blocks ``tables[b]``) and their first greedy tokens."""
    cache = model.new_cache(32, BLOCK)
    lens = [len(p) for p in prompts]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    batch = Batch(torch.tensor(sum(prompts, [])), cu, torch.tensor(lens, dtype=torch.int32), tables)
    return cache, model.forward_batch(batch, cache).argmax(-1)


def decode_batch(tokens, lens, tables):
    B = len(lens)
    return Batch(tokens.clone(), torch.arange(B + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                 tables[:B])


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5], [7] * 13, [2, 3]]
# Sequence 1 owns block 0: a padding row aimed at block-table row 0 / slot 0 would land in its cache.
TABLES = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 1, 2, 3, 4, 13, 14, 15],
                       [16, 17, 18, 19, 20, 21, 22, 23], [24, 25, 26, 27, 28, 29, 30, 31]], dtype=torch.int32)


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_replayed_decode_is_bit_identical_to_eager(tiny, kind):
    """A batch whose size is on the ladder (no padding): the graph's logits and cache writes equal
    the eager step's bit for bit, step after step, and the graph served every step. (A traced step
    that kept capture-time inputs, or copies of the cache, instead of reading them in place would
    give other logits from the second step on.)"""
    eager_cache, tokens = prefilled(tiny, PROMPTS, TABLES)
    graph_cache, _ = prefilled(tiny, PROMPTS, TABLES)
    rec = Recorder(GRAPHS[kind])
    runner = ModelRunner(tiny, max_num_seqs=8, max_model_len=MAX_LEN, graphs=rec)
    assert runner.capture_sizes == (1, 2, 4, 8)
    lens = [len(p) for p in PROMPTS]
    for _ in range(4):
        lens = [n + 1 for n in lens]
        batch = decode_batch(tokens, lens, TABLES)
        eager = tiny.forward_batch(batch, eager_cache)
        replayed = runner(batch, graph_cache)
        assert torch.equal(replayed, eager)
        tokens = eager.argmax(-1)
    assert rec.captured == 4 and rec.replayed == 4 and runner.replays == 4 and runner.eager_steps == 0
    for a, b in zip(eager_cache.kv + eager_cache.index_k, graph_cache.kv + graph_cache.index_k, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_padding_rows_write_nowhere(tiny, kind):
    """3 sequences replay in the 4-row graph: the only cache rows that change are the 3 sequences'
    new positions (the padding row, pointed at block-table row 0 and position 0, must not write
    into sequence 1's block 0), and the real rows' logits match the eager step."""
    prompts, tables = PROMPTS[:3], TABLES[:3]
    cache, tokens = prefilled(tiny, prompts, tables)
    eager_cache, _ = prefilled(tiny, prompts, tables)
    runner = ModelRunner(tiny, max_num_seqs=4, max_model_len=MAX_LEN, graphs=GRAPHS[kind])
    runner.capture(cache)
    lens = [len(p) + 1 for p in prompts]
    main = tiny.config.num_hidden_layers  # the MTP layer's cache is not written by a main-model step
    before = [None if t is None else t.clone() for t in cache.kv + cache.index_k]
    logits = runner(decode_batch(tokens, lens, tables), cache)
    assert runner.replays == 1 and logits.shape == (3, tiny.config.vocab_size)
    written = sorted(int(tables[b, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK for b, n in enumerate(lens))
    for i, (old, new) in enumerate(zip(before, cache.kv + cache.index_k, strict=True)):
        if old is None:
            continue
        changed = (old != new).reshape(-1, old.shape[-1]).any(-1).nonzero().flatten().tolist()
        assert changed == (written if i % len(cache.kv) < main else []), "a padding row wrote into the cache"
    # Padded rows change the matmul shapes (CPU BLAS picks kernels by row count), so the real rows
    # match the unpadded eager step to float tolerance; bit-identity is tested at ladder sizes.
    eager = tiny.forward_batch(decode_batch(tokens, lens, tables), eager_cache)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), eager.argmax(-1))


def test_prefill_mixed_and_oversized_steps_run_eagerly(tiny):
    cache, tokens = prefilled(tiny, PROMPTS[:2], TABLES[:2])
    runner = ModelRunner(tiny, max_num_seqs=2, max_model_len=MAX_LEN, graphs=RecordedGraph)
    # mixed: sequence 0 decodes one token while sequence 1 gets 2 more prompt tokens
    mixed = Batch(torch.tensor([int(tokens[0]), 8, 9]), torch.tensor([0, 1, 3], dtype=torch.int32),
                  torch.tensor([10, 5], dtype=torch.int32), TABLES[:2])
    runner(mixed, cache)
    assert runner.eager_steps == 1 and runner.replays == 0 and runner.graphs == {}
    cache4, tokens4 = prefilled(tiny, PROMPTS, TABLES)  # 4 sequences, ladder ends at 2
    runner(decode_batch(tokens4, [len(p) + 1 for p in PROMPTS], TABLES), cache4)
    assert runner.eager_steps == 2 and runner.replays == 0


def test_enforce_eager_captures_nothing_and_the_cpu_backend_traces(tiny):
    assert ModelRunner(tiny, max_num_seqs=8, max_model_len=MAX_LEN, graphs=None).capture_sizes == ()
    # the CPU backend declares its traced step: "auto" (serve.py's default) uses it, in context buckets
    spec = tiny.plan.backend.device_graph
    assert (spec.module, spec.graph, spec.kind) == ("hwlayer.backends.cpu.graph", "TracedStepGraph", "step")
    auto = ModelRunner(tiny, max_num_seqs=8, max_model_len=5000)
    assert auto.uses_graphs and auto.make_graph is TracedStepGraph and auto.buckets == (1024, 2048, 4096, 5000)
    with pytest.raises(ValueError, match="ModelRunner: expected max_num_seqs >= 1"):
        ModelRunner(tiny, max_num_seqs=0, max_model_len=MAX_LEN)


def test_context_buckets():
    assert context_buckets(5000, cheap_graphs=True) == (1024, 2048, 4096, 5000)
    assert context_buckets(4096, cheap_graphs=True) == (1024, 2048, 4096)
    assert context_buckets(512, cheap_graphs=True) == (512,)
    assert context_buckets(5000, cheap_graphs=False) == (5000,)  # device-module graphs: one per size


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_context_buckets_capture_on_first_use_and_match_eager(tiny, kind):
    """Contexts up to 16 run in the 16-key graphs, longer ones in the 32-key graphs (captured when
    first needed, without writing the cache), each step equal to eager bit for bit."""
    prompts, tables = [[5] * 12, [6] * 14], TABLES[:2]
    eager_cache, tokens = prefilled(tiny, prompts, tables)
    graph_cache, _ = prefilled(tiny, prompts, tables)
    rec = Recorder(GRAPHS[kind])
    runner = ModelRunner(tiny, max_num_seqs=2, max_model_len=MAX_LEN, graphs=rec, buckets=(16,))
    assert runner.buckets == (16, 32)
    runner.capture(graph_cache)
    assert set(runner.graphs) == {(1, 32), (2, 32)}
    lens = [len(p) for p in prompts]
    for _ in range(5):  # contexts 13/15 .. 17/19: bucket 16, then 32
        lens = [n + 1 for n in lens]
        batch = decode_batch(tokens, lens, tables)
        eager = tiny.forward_batch(batch, eager_cache)
        assert torch.equal(runner(batch, graph_cache), eager)
        tokens = eager.argmax(-1)
    assert set(runner.graphs) == {(1, 32), (2, 32), (2, 16)} and rec.captured == 3 and runner.replays == 5
    for a, b in zip(eager_cache.kv + eager_cache.index_k, graph_cache.kv + graph_cache.index_k, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_engine_greedy_outputs_same_with_graphs_and_enforce_eager(tiny):
    """What ``serve.py`` and ``serve.py --enforce-eager`` run: the engine with a graph runner and
    with an eager one give the same greedy tokens for concurrent requests of different lengths
    (chunked prefill, mixed steps, decode batches of every size down to 1 as requests finish)."""
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ensure_default_model())
    requests = [(list(range(3 + 5 * i, 9 + 7 * i)), SamplingParams(max_tokens=4 + 3 * i, temperature=0.0))
                for i in range(5)]

    def run(graphs):
        runner = ModelRunner(tiny, max_num_seqs=8, max_model_len=64, graphs=graphs)
        engine = Engine(tiny, tokenizer, num_blocks=64, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=16,
                        max_model_len=64, eos_token_ids=[], forward=runner)
        done = [[] for _ in requests]
        seqs = [engine.submit(p, sp, done[i].append) for i, (p, sp) in enumerate(requests)]
        while not all(d and d[-1].finished for d in done):
            engine.step()
        return [s.output_ids for s in seqs], runner

    eager_out, eager_runner = run(None)
    assert [len(o) for o in eager_out] == [4, 7, 10, 13, 16]
    for graphs in ("auto", RecordedGraph):  # the CPU backend's traced steps, and the plain replay
        graph_out, graph_runner = run(graphs)
        assert graph_out == eager_out
        assert eager_runner.replays == 0 and graph_runner.replays > 10 and graph_runner.eager_steps > 0


def test_hwlayer_info_shows_each_backends_device_graphs(capsys):
    from hwlayer import cli

    info = cli._info()
    graphs = {b["name"]: b["device_graph"] for b in info["backends"]}
    assert graphs["cuda"] == "torch.cuda.CUDAGraph" and graphs["ascend"] == "torch.npu.NPUGraph"
    assert graphs["cpu"] == "hwlayer.backends.cpu.graph.TracedStepGraph"
    cli._print_info(info)
    out = capsys.readouterr().out
    assert "device graphs: torch.cuda.CUDAGraph (written against torch.cuda.CUDAGraph docs, not run on a GPU)" in out
    assert "device graphs: none (eager steps)" in out


def test_a_step_the_tracer_cannot_record_runs_eagerly(tiny, monkeypatch, caplog):
    """serve.py's default on a CPU must not die on a step TorchScript cannot trace: the runner warns
    once and runs decode steps eagerly, with eager's logits."""
    def refuse(self, fn):
        raise RuntimeError("0 INTERNAL ASSERT FAILED: no op for aten::something\nmore lines")

    monkeypatch.setattr(TracedStepGraph, "capture", refuse)
    cache, tokens = prefilled(tiny, PROMPTS[:2], TABLES[:2])
    eager_cache, _ = prefilled(tiny, PROMPTS[:2], TABLES[:2])
    runner = ModelRunner(tiny, max_num_seqs=2, max_model_len=MAX_LEN)  # "auto": the CPU's traced steps
    batch = decode_batch(tokens, [len(p) + 1 for p in PROMPTS[:2]], TABLES[:2])
    with caplog.at_level("WARNING", logger="model.runner"):
        logits = runner(batch, cache)
    assert torch.equal(logits, tiny.forward_batch(batch, eager_cache))
    assert not runner.uses_graphs and runner.replays == 0 and runner.eager_steps == 1
    assert "decode graph capture failed, running decode steps eagerly: 0 INTERNAL ASSERT FAILED" in caplog.text
    with pytest.raises(RuntimeError, match="INTERNAL ASSERT"):  # an explicitly chosen graph class: no fallback
        ModelRunner(tiny, max_num_seqs=2, max_model_len=MAX_LEN, graphs=TracedStepGraph).capture(cache)


@pytest.mark.parametrize("graphs", ["auto", RecordedGraph])
def test_speculative_verify_steps_replay_from_graphs_with_the_same_tokens(graphs, tmp_path):
    """With ``num_speculative_tokens`` the decode graphs hold verify steps (1 + N tokens per row,
    hidden states out) and the MTP draft step after them: on the bigram checkpoint (drafts accepted)
    the engine's greedy tokens equal the eager speculative engine's and the plain engine's, and the
    graphs served most steps."""
    from model.tiny import make_bigram_checkpoint
    from model.tokenizer import load_tokenizer

    path = make_bigram_checkpoint(tmp_path / "bigram")
    model, tokenizer = load_model(path, backend="cpu"), load_tokenizer(path)
    requests = [(list(range(3 + 5 * i, 9 + 7 * i)), SamplingParams(max_tokens=8 + 3 * i, temperature=0.0))
                for i in range(4)]

    def run(runner, N):
        engine = Engine(model, tokenizer, num_blocks=64, block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=16,
                        max_model_len=64, eos_token_ids=[], forward=runner, num_speculative_tokens=N)
        seqs = [engine.submit(p, sp, lambda e: None) for p, sp in requests]
        while engine.has_work():
            engine.step()
        return [s.output_ids for s in seqs], engine

    plain, _ = run(None, 0)
    eager, _ = run(ModelRunner(model, max_num_seqs=4, max_model_len=64, graphs=None, num_speculative_tokens=2), 2)
    runner = ModelRunner(model, max_num_seqs=4, max_model_len=64, graphs=graphs, num_speculative_tokens=2)
    got, engine = run(runner, 2)
    assert got == eager == plain
    assert engine.num_accepted_tokens > 0.8 * engine.num_draft_tokens
    assert runner.replays > 3 and runner.replays > runner.eager_steps // 2
    assert runner.draft_replays > 3  # the MTP draft step ran from its graph too
