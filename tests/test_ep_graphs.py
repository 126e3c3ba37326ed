"""Expert-parallel decode steps in device graphs: the fixed-capacity all-to-all, one size on every rank.

Two gloo ranks (spawned, real torch.distributed), the tiny checkpoint with routing that spreads every
token over both ranks' experts. Each rank runs a :class:`model.runner.ModelRunner` whose graphs are
:class:`model.runner.RecordedGraph` (the runner's own plumbing: static buffers, padded ladder sizes,
replays; the CPU's traced graph cannot record a c10d collective, see ``test_cpu_traced_graph_*``),
and every ``ep_dispatch`` call is traced with its row count and ``capacity``:

* plain EP: rank 0's :class:`serving.engine.Engine` through :class:`serving.ep.LeaderForward`, rank 1
  in :func:`serving.ep.follower_loop`; greedy tokens equal one process's eager engine, decode steps
  replayed with ``capacity`` = the padded batch size on both ranks, prefill steps exact;
* data-parallel attention: :class:`serving.dp.DPEngine`, first 3 sequences (2 + 1 on the ranks:
  uneven, padded to one size), then 1 (the other rank idle: it replays the same graph on padding rows);
* the emulated DeepEP (cuda) and MC2 (ascend) libraries at a width their kernels take (hidden 2048,
  bf16): a decode step replayed at EP=2 is served by DeepEP low-latency / MC2 dispatch + combine
  (adapter and emulated-kernel call counts), its logits agreeing with one process on the cpu backend.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # spawns two gloo ranks per scenario

ROUTING = {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3}  # every token crosses ranks
PER_RANK, BLOCK, MAX_TOKENS = 16, 4, 5
ENGINE = dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, eos_token_ids=[])
# A width DeepEP's low-latency kernels (hidden in SWITCH_HIDDEN) and MC2 (hidden in [1024, 8192]) take.
WIDE = {**ROUTING, "hidden_size": 2048, "num_hidden_layers": 2, "num_nextn_predict_layers": 0,
        "n_routed_experts": 4, "num_experts_per_tok": 2}
SPAWN_TIMEOUT_S = 150


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


PHASES = ((7, 3, 10), (6,))  # data-parallel run: 3 sequences (2 + 1 per rank), then 1 (one rank idle)
LATE = (5, 4)  # then 2 sequences, the second arriving while the first decodes (its rank prefills, the other decodes)


def _generate(engine, prompts: list[list[int]], late: bool = False) -> list[list[int]]:
    """Greedy tokens; ``late``: the last prompt is submitted after two steps of the others."""
    from serving.engine import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = [engine.submit(p, params, lambda e: None) for p in (prompts[:-1] if late else prompts)]
    if late:
        engine.step()
        engine.step()
        seqs.append(engine.submit(prompts[-1], params, lambda e: None))
    for _ in range(1000):
        if all(s.finished for s in seqs):
            break
        engine.step()
    return [s.output_ids for s in seqs]


# --------------------------------------------------------------------------------------------
# The ranks


def _trace(m, runner) -> list[dict]:
    """Per ``runner.run`` call: the batch size, the graph key, and (rows, capacity) of each ep_dispatch."""
    steps: list[dict] = []
    dispatch, run = m.plan.ep_dispatch, runner.run

    def traced_dispatch(x, topk_ids, num_experts, group=None, topk_weights=None, capacity=None):
        if steps:
            steps[-1]["dispatch"].append((int(x.shape[0]), capacity))
        return dispatch(x, topk_ids, num_experts, group, topk_weights, capacity)

    def traced_run(batch, cache, key):
        steps.append({"B": int(batch.seq_lens.numel()), "key": key, "dispatch": []})
        return run(batch, cache, key)

    m.plan.ep_dispatch, runner.run = traced_dispatch, traced_run
    return steps


def _serve(rank: int, world: int, checkpoint: str, dp_attention: bool) -> dict:
    """Rank 0 serves greedy requests through the EP / DP leader, the others follow; graphs recorded."""
    from model import load_model
    from model.runner import ModelRunner, RecordedGraph
    from model.tokenizer import load_tokenizer
    from serving import dp
    from serving import ep as ep_mod
    from serving.engine import Engine

    m = load_model(checkpoint, backend="cpu", ep=world)
    runner = ModelRunner(m, max_num_seqs=ENGINE["max_num_seqs"], max_model_len=ENGINE["max_model_len"],
                         graphs=RecordedGraph)
    steps = _trace(m, runner)
    out: dict = {}
    if rank == 0:
        tok = load_tokenizer(checkpoint)
        if dp_attention:
            engine = dp.DPEngine(m, tok, world=world, num_blocks=PER_RANK, runner=runner, **ENGINE)
        else:
            engine = Engine(m, tok, num_blocks=PER_RANK, forward=ep_mod.leader_forward(m, runner),
                            on_idle=ep_mod.keepalive, **ENGINE)
        engine.forward.capture(engine.cache)
        out["uses_graphs"] = engine.forward.uses_graphs
        phases = PHASES if dp_attention else PHASES[:1]
        out["generated"] = [_generate(engine, _prompts(m.config.vocab_size, p, 11 + i)) for i, p in enumerate(phases)]
        if dp_attention:
            out["generated"].append(_generate(engine, _prompts(m.config.vocab_size, LATE, 20), late=True))
        ep_mod.shutdown_followers(False)
    else:
        (dp.follower_loop if dp_attention else ep_mod.follower_loop)(m, PER_RANK, BLOCK, runner)
    out.update(steps=steps, replays=runner.replays, capture_sizes=list(runner.capture_sizes))
    return out


def _emulated_decode(rank: int, world: int, checkpoint: str, backend: str) -> dict:
    """One prefill (eager, exact form) then one decode step replayed from a recorded graph, on the
    emulated vendor EP library; the adapters' and emulated kernels' call counts around the decode."""
    from conformance import emulators

    emulators.activate(backend)
    from model import load_model
    from model.runner import ModelRunner, RecordedGraph

    m = load_model(checkpoint, backend=backend, ep=world, dtype="bfloat16")
    cache = m.new_cache(8, BLOCK)
    runner = ModelRunner(m, max_num_seqs=2, max_model_len=32, graphs=RecordedGraph)
    runner.capture(cache)
    prefill, decode = _wide_batches(m.config.vocab_size)
    first = m.forward_batch(prefill, cache)
    before = _ep_calls()
    key = runner.step_key([decode], cache)
    logits = runner.run(decode, cache, key)
    after = _ep_calls()
    served = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"prefill": first.float().tolist(), "decode": logits.float().tolist(), "key": key, "served": served}


def _wide_batches(vocab: int):
    """A 2-sequence prefill (5 and 3 tokens) and the decode step after it, blocks 0-1 and 2-3."""
    from model import Batch

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(10, vocab, (8,), generator=g)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    prefill = Batch(ids, torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32), table)
    decode = Batch(torch.tensor([17, 23]), torch.tensor([0, 1, 2], dtype=torch.int32),
                   torch.tensor([6, 4], dtype=torch.int32), table)
    return prefill, decode


def _ep_calls() -> dict[str, int]:
    import sys

    calls: dict[str, int] = {}
    for module, prefix in (("hwlayer.backends.cuda.deepep", "adapter:deepep."),
                           ("hwlayer.backends.ascend.mc2", "adapter:mc2."),
                           ("conformance.emulators.deep_ep", "emulator:deep_ep."),
                           ("conformance.emulators.torch_npu_mc2", "emulator:torch_npu.")):
        for key, n in (getattr(sys.modules.get(module), "CALLS", None) or {}).items():
            calls[prefix + key] = n
    return calls


def _cpu_traced(rank: int, world: int, checkpoint: str) -> dict:
    """The CPU backend's own graphs ("auto": TracedStepGraph) at EP=2: what the server gets today."""
    from model import load_model
    from model.runner import ModelRunner

    m = load_model(checkpoint, backend="cpu", ep=world)
    cache = m.new_cache(8, BLOCK)
    runner = ModelRunner(m, max_num_seqs=2, max_model_len=32)
    wanted = runner.uses_graphs
    prefill, decode = _wide_batches(m.config.vocab_size)
    runner.capture(cache)
    m.forward_batch(prefill, cache)
    logits = runner.run(decode, cache, runner.step_key([decode], cache))
    return {"wanted": wanted, "uses_graphs": runner.uses_graphs, "replays": runner.replays, "decode": logits.tolist()}


def _worker(rank: int, world: int, port: int, scenario: str, checkpoint: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HWLAYER_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    try:
        if scenario in ("ep", "dp"):
            result = _serve(rank, world, checkpoint, scenario == "dp")
        elif scenario == "cpu_traced":
            result = _cpu_traced(rank, world, checkpoint)
        else:
            result = _emulated_decode(rank, world, checkpoint, scenario)
    except Exception:
        result = {"error": traceback.format_exc(limit=8)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # Leave the group together: a rank exiting with gloo's pairs still open aborts ("terminate called
    # without an active exception") when its peer is still tearing down.
    import torch.distributed as dist

    from hwlayer.distributed import shutdown

    try:
        if dist.is_initialized():
            dist.barrier()
    finally:
        shutdown()


def _spawn(scenario: str, checkpoint: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, port, scenario, str(checkpoint), out), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{scenario}: the ranks did not finish in {SPAWN_TIMEOUT_S} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    for rank, r in enumerate(results):
        assert "error" not in r, f"{scenario} rank {rank}:\n{r['error']}"
    return results


# --------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ep-graphs"), config_overrides=ROUTING)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ep-graphs-wide"), config_overrides=WIDE,
                                dtype=torch.bfloat16)


def _single(checkpoint: Path, phases: tuple[tuple[int, ...], ...], late: bool = False) -> list[list[list[int]]]:
    """Greedy tokens of one process, every step eager: the reference."""
    from model import load_model
    from model.runner import ModelRunner
    from model.tokenizer import load_tokenizer
    from serving.engine import Engine

    m = load_model(checkpoint, backend="cpu")
    runner = ModelRunner(m, max_num_seqs=ENGINE["max_num_seqs"], max_model_len=ENGINE["max_model_len"], graphs=None)
    engine = Engine(m, load_tokenizer(checkpoint), num_blocks=2 * PER_RANK, forward=runner, **ENGINE)
    out = [_generate(engine, _prompts(m.config.vocab_size, p, 11 + i)) for i, p in enumerate(phases)]
    return out + ([_generate(engine, _prompts(m.config.vocab_size, LATE, 20), late=True)] if late else [])


def _n_moe(checkpoint: Path) -> int:
    cfg = json.loads((checkpoint / "config.json").read_text())
    return cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]


def _check_steps(steps: list[dict], n_moe: int, rank: int) -> tuple[int, int]:
    """Every replayed step dispatched ``bs`` rows (padding included) with capacity ``bs`` in each MoE
    layer; every eager step the exact form. Returns (replayed, eager) step counts."""
    replayed = eager = 0
    for i, step in enumerate(steps):
        if step["key"] is None:
            eager += 1
            assert [cap for _, cap in step["dispatch"]] == [None] * n_moe, (rank, i, step)
        else:
            replayed += 1
            bs = step["key"][0]
            assert bs >= step["B"], (rank, i, step)
            assert step["dispatch"] == [[bs, bs]] * n_moe, (rank, i, step)  # json: tuples -> lists
    return replayed, eager


def test_ep_decode_graphs_match_one_process(checkpoint: Path) -> None:
    """(a) EP=2, decode steps replayed at one padded size with the fixed-capacity all-to-all: greedy
    tokens equal one eager process; prefill steps took the exact form."""
    want = _single(checkpoint, PHASES[:1])
    ranks = _spawn("ep", checkpoint)
    leader = ranks[0]
    assert leader["uses_graphs"] and leader["generated"] == want
    n_moe = _n_moe(checkpoint)
    counts = [_check_steps(r["steps"], n_moe, rank) for rank, r in enumerate(ranks)]
    replayed, eager = counts[0]
    assert counts[1] == counts[0]
    assert replayed == MAX_TOKENS - 1 and eager >= 1, counts  # every decode step in a graph, prefill eager
    # 3 sequences decode in the ladder's 4-row graph: capacity 4 on both ranks, the same steps
    assert [s["key"] for s in ranks[0]["steps"]] == [s["key"] for s in ranks[1]["steps"]]
    assert {s["key"][0] for s in ranks[0]["steps"] if s["key"]} == {4}
    assert ranks[0]["replays"] == ranks[1]["replays"] == replayed


def test_dp_attention_decode_graphs_with_uneven_and_idle_ranks(checkpoint: Path) -> None:
    """(b) DP attention at EP=2: rank 0 picks one graph size for both ranks (the larger sub-batch up the
    ladder); an idle rank replays it on padding rows; a step where one rank prefills runs eagerly on
    both, the decoding rank included; tokens equal one eager process."""
    want = _single(checkpoint, PHASES, late=True)
    ranks = _spawn("dp", checkpoint)
    assert ranks[0]["uses_graphs"] and ranks[0]["generated"] == want
    n_moe = _n_moe(checkpoint)
    counts = [_check_steps(r["steps"], n_moe, rank) for rank, r in enumerate(ranks)]
    assert counts[0] == counts[1] and counts[0][0] >= 2 * (MAX_TOKENS - 1), counts
    keys = [[s["key"] for s in r["steps"]] for r in ranks]
    assert keys[0] == keys[1]  # one size on every rank, every step
    sizes = [(a["B"], b["B"], a["key"]) for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)
             if a["key"] is not None]
    uneven = [s for s in sizes if s[0] != s[1] and min(s[:2]) > 0]
    idle = [s for s in sizes if min(s[:2]) == 0]
    assert uneven and all(key[0] == 2 for *_, key in uneven), sizes  # 2 + 1 sequences: both ranks replay 2 rows
    assert idle and all(key[0] == 1 for *_, key in idle), sizes  # 1 + 0: the idle rank replays 1 padding row
    # the late sequence's prefill: one rank prefills, the other only decodes, and both run eagerly
    decoding_eagerly = [(a, b) for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)
                        if a["key"] is None and {a["B"], b["B"]} == {1} and
                        sorted(x["dispatch"][0][0] for x in (a, b)) == [1, LATE[-1]]]
    assert decoding_eagerly, [(a["B"], b["B"], a["key"], a["dispatch"][:1], b["dispatch"][:1])
                              for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("backend,served", [
    ("cuda", ("adapter:deepep.low_latency_dispatch", "adapter:deepep.low_latency_combine",
              "emulator:deep_ep.low_latency_dispatch", "emulator:deep_ep.low_latency_combine")),
    ("ascend", ("adapter:mc2.dispatch_v2", "adapter:mc2.combine_v2", "emulator:torch_npu.dispatch_v2",
                "emulator:torch_npu.combine_v2")),
])
def test_emulated_native_ep_serves_the_decode_graph(backend: str, served: tuple[str, ...],
                                                    wide_checkpoint: Path) -> None:
    """(c) A replayed decode step at EP=2 goes through DeepEP low-latency (cuda) / MC2 (ascend), once per
    MoE layer per rank, and its logits agree with one process on the cpu backend (bf16)."""
    from model import load_model

    ranks = _spawn(backend, wide_checkpoint)
    m = load_model(wide_checkpoint, backend="cpu", dtype="bfloat16")
    cache = m.new_cache(8, BLOCK)
    prefill, decode = _wide_batches(m.config.vocab_size)
    want_prefill, want_decode = m.forward_batch(prefill, cache), m.forward_batch(decode, cache)
    n_moe = _n_moe(wide_checkpoint)
    for rank, r in enumerate(ranks):
        assert r["key"] is not None and r["key"][0] == 2, r["key"]
        for name in served:
            assert r["served"].get(name) == n_moe, (rank, name, r["served"])
        for what, want in (("prefill", want_prefill), ("decode", want_decode)):
            got = torch.tensor(r[what])
            assert _cosine(got, want) > 0.995, (rank, what, _cosine(got, want))
            assert (got.argmax(-1) == want.argmax(-1)).all(), (rank, what)


def test_cpu_traced_graph_replays_the_ep_decode_step(checkpoint: Path) -> None:
    """The CPU's own graph (TracedStepGraph) at EP=2: the fixed-capacity exchange is one op
    (``hwlayer::fixed_all_to_all``, taking the group by name), which torch.jit.trace records, so every
    rank replays the decode step, with the same logits as one process."""
    from model import load_model

    ranks = _spawn("cpu_traced", checkpoint)
    m = load_model(checkpoint, backend="cpu")
    cache = m.new_cache(8, BLOCK)
    prefill, decode = _wide_batches(m.config.vocab_size)
    m.forward_batch(prefill, cache)
    want = m.forward_batch(decode, cache)
    for r in ranks:
        assert r["wanted"] and r["uses_graphs"] and r["replays"] == 1, r  # the decode step replayed
        torch.testing.assert_close(torch.tensor(r["decode"]), want, rtol=1e-5, atol=1e-5)
