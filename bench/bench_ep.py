"""Expert-parallel communication cost on gloo, and whole-model tokens/s at EP = 1, 2, 4.

Part 1, per MoE layer: ``ep_dispatch + ep_combine`` (generic hwlayer ops, expert compute left out:
the combine sends back the delivered rows) against its peer, a bare ``all_to_all_single`` pair
moving one row per assignment out and back (the rows the contract delivers, same split sizes) on
buffers prepared beforehand. The ops run as the model calls them (routing weights at dispatch: each
token travels once per rank, one row per token and rank comes back) and without weights at dispatch
(one row per assignment); ``bare a2a x2, token bytes`` moves exactly the bytes of the former, the
peer for its overhead. ``before`` (485127a) and ``legacy`` are the generic implementations of the
two previous rounds, kept here for the record. ``--capacity`` adds the fixed-capacity form
(``capacity = --tokens``, every rank sends every rank ``C * k`` rows, zero-padded) against bare
all-to-alls of those buffers. Each figure is the median over iterations of the slowest rank's time;
variants alternate within every iteration.

Part 2: greedy generation with a small GLM-5-shaped checkpoint (``model.tiny`` with a larger
config), EP=1 in one process, EP=2/4 as spawned gloo ranks sharing this machine's cores.

Part 3, serving with and without data-parallel attention, eager and with decode graphs: N concurrent greedy
streams through the serving engine at EP=2 (rank 0 schedules, the other rank follows, exactly the code of ``serve.py
--ep 2 [--dp-attention]`` minus HTTP): aggregate tokens/s, the attention tokens each rank computes
per step and the KV blocks each rank holds. On one CPU both ranks share the same cores, so the
tokens/s say little about a multi-device node; the per-rank work and cache are the point.

    PYTHONPATH=. .venv/bin/python bench/bench_ep.py [--worlds 2 4] [--tokens 256] [--hidden 2048]
        [--experts 64] [--top-k 8] [--dtype bf16] [--iters 20] [--skip-model] [--skip-comm] [--skip-serve]
        [--capacity] [--serve-streams 8] [--serve-prompt 32] [--serve-new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hwlayer import ops  # noqa: E402
from hwlayer.ops import EPHandle, all_to_all, moe_unpermute  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A small but GLM-5-shaped model: 4 layers (1 dense, 3 MoE), 32 experts top-4 in 4 groups.
MODEL_OVERRIDES = {
    "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
    "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "index_n_heads": 8, "index_head_dim": 32, "index_topk": 64, "n_routed_experts": 32,
    "num_experts_per_tok": 4, "moe_intermediate_size": 256, "intermediate_size": 1024, "n_group": 4,
    "topk_group": 2, "num_nextn_predict_layers": 0,
}


def legacy_ep_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> tuple:
    """The generic ep_dispatch before this bench's change: rows and ids in two blocking exchanges."""
    world = dist.get_world_size()
    per_rank = num_experts // world
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    dest = flat // per_rank
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = all_to_all(x.index_select(0, order // k), recv, send)
    recv_ids = all_to_all((flat.index_select(0, order) % per_rank).to(torch.int32), recv, send)
    return recv_x, recv_ids, EPHandle(order, send, recv, x.shape[0], k)


def legacy_ep_combine(y: torch.Tensor, handle: EPHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    back = all_to_all(y, handle.send_counts, handle.recv_counts)
    return moe_unpermute(back, handle.order, topk_weights, handle.num_tokens)


def before_ep_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> tuple:
    """The generic ep_dispatch before the issue-24 round (485127a): blocking counts exchange, then
    the gather, ids under the rows."""
    world = dist.get_world_size()
    per_rank = num_experts // world
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    dest = flat // per_rank
    order = torch.argsort(dest, stable=True)
    send_counts = torch.zeros(world, dtype=torch.int64).scatter_add_(0, dest, torch.ones_like(dest))
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    local_ids = (flat.index_select(0, order) % per_rank).to(torch.int32)
    recv_ids = local_ids.new_empty(sum(recv))
    ids_work = dist.all_to_all_single(recv_ids, local_ids, recv, send, async_op=True)
    recv_x = all_to_all(x.index_select(0, order // k), recv, send)
    ids_work.wait()
    return recv_x, recv_ids, EPHandle(order, send, recv, x.shape[0], k)


def before_ep_combine(y: torch.Tensor, handle: EPHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """... and its combine: inverse permutation of the whole buffer, fp32 upcast, one bmm."""
    back = all_to_all(y, handle.send_counts, handle.recv_counts)
    T, k = handle.num_tokens, handle.top_k
    inverse = torch.empty_like(handle.order)
    inverse[handle.order] = torch.arange(T * k)
    rows = back.index_select(0, inverse).view(T, k, y.shape[1]).float()
    return torch.bmm(topk_weights.float().view(T, 1, k), rows).view(T, y.shape[1]).to(y.dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from hwlayer.distributed import init_distributed

    init_distributed("cpu", timeout_s=120)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _comm_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _join(rank, world, port)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
    ids = torch.rand(args.tokens, args.experts, generator=g).topk(args.top_k, dim=1).indices.to(torch.int32)
    w = torch.rand(args.tokens, args.top_k, generator=g)
    recv_x, _, handle = ops.ep_dispatch(x, ids, args.experts)  # weights at combine: one row per assignment
    send_rows = x.index_select(0, handle.order // args.top_k)  # the bare exchange's prepared buffer
    # Weights at dispatch (as the model calls it): tokens travel once per rank and come back once per
    # rank (that rank's partial sum). The bare peer of those bytes: the tokens each rank receives, and
    # one row per received token back.
    dest = (ids.long() // (args.experts // world)).t()
    hits = torch.zeros(world, args.tokens, dtype=torch.bool).scatter_(0, dest, True)
    tok_counts = hits.sum(1)
    tok_recv_counts = torch.empty_like(tok_counts)
    dist.all_to_all_single(tok_recv_counts, tok_counts)
    tok_send_split, tok_recv_split = tok_counts.tolist(), tok_recv_counts.tolist()
    tok_send = x.index_select(0, hits.view(-1).nonzero().view(-1) % args.tokens)
    tok_back = x.new_empty(sum(tok_recv_split), args.hidden)
    capacity = args.tokens  # the fixed-capacity form: every rank sends every rank C * k rows
    block = [capacity * args.top_k] * world
    cap_send = x.new_zeros(world * capacity * args.top_k, args.hidden)

    def bare() -> None:
        all_to_all(send_rows, handle.recv_counts, handle.send_counts)
        all_to_all(recv_x, handle.send_counts, handle.recv_counts)

    def hwlayer_ops() -> None:  # as the model calls them
        rx, _, h = ops.ep_dispatch(x, ids, args.experts, None, w)
        ops.ep_combine(rx, h, w)

    def per_assignment_ops() -> None:
        rx, _, h = ops.ep_dispatch(x, ids, args.experts)
        ops.ep_combine(rx, h, w)

    def bare_tokens() -> None:  # the bytes the weights-at-dispatch path moves: tokens out, one row per token back
        all_to_all(tok_send, tok_recv_split, tok_send_split)
        all_to_all(tok_back, tok_send_split, tok_recv_split)

    def before() -> None:
        rx, _, h = before_ep_dispatch(x, ids, args.experts)
        before_ep_combine(rx, h, w)

    def bare_capacity() -> None:
        back = all_to_all(cap_send, block, block)
        all_to_all(back, block, block)

    def capacity_ops() -> None:
        rx, _, h = ops.ep_dispatch(x, ids, args.experts, None, w, capacity)
        ops.ep_combine(rx, h, w)

    def legacy() -> None:
        rx, _, h = legacy_ep_dispatch(x, ids, args.experts)
        legacy_ep_combine(rx, h, w)

    variants = {"bare all_to_all_single x2": bare, "ep_dispatch + ep_combine": hwlayer_ops,
                "ops, weights at combine": per_assignment_ops, "before": before, "legacy": legacy,
                "bare a2a x2, token bytes": bare_tokens}
    if args.capacity:
        variants.update({"bare a2a x2, capacity buffers": bare_capacity, "capacity form ops": capacity_ops})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for it in range(args.iters + 3):
        names = list(variants) if it % 2 == 0 else list(reversed(variants))
        for name in names:
            dist.barrier()
            start = time.perf_counter()
            variants[name]()
            elapsed = _slowest(time.perf_counter() - start)
            if it >= 3:  # warm-up
                times[name].append(elapsed)
    if rank == 0:
        rows = sum(handle.send_counts)
        result = {
            "world": world, "tokens_per_rank": args.tokens, "hidden": args.hidden, "experts": args.experts,
            "top_k": args.top_k, "dtype": args.dtype, "rows_sent_by_rank0": rows,
            "mib_each_way_rank0": rows * args.hidden * x.element_size() / 2**20,
            "median_ms": {n: statistics.median(v) * 1e3 for n, v in times.items()},
        }
        Path(out).write_text(json.dumps(result))


def _model_worker(rank: int, world: int, port: int, ckpt: str, batch: int, prompt_len: int, new_tokens: int,
                  out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        _join(rank, world, port)
    from model import load_model
    from model.generate import generate

    m = load_model(ckpt, backend="cpu", ep=world)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, m.config.vocab_size, (batch, prompt_len), generator=g)
    generate(m, prompts[:, :8], max_new_tokens=2, stop_at_eos=False)  # warm-up
    runs = []
    for _ in range(2):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        generate(m, prompts, max_new_tokens=new_tokens, stop_at_eos=False)
        runs.append(time.perf_counter() - start)
    elapsed = min(runs)
    if world > 1:
        elapsed = _slowest(elapsed)
    if rank == 0:
        Path(out).write_text(json.dumps({"ep": world, "seconds": elapsed, "tokens_per_s": batch * new_tokens / elapsed,
                                         "experts_per_rank": m.config.n_routed_experts // world}))


def _serve_worker(rank: int, world: int, port: int, ckpt: str, streams: int, prompt_len: int, new_tokens: int,
                  dp_attention: bool, graphs: bool, out: str) -> None:
    """Rank 0: the serving engine (DP or plain EP) over ``streams`` greedy requests; others: the follower loop.
    ``graphs``: every rank builds the same ModelRunner, as ``serve.py`` does (decode steps replayed from the
    CPU's traced graphs, the MoE all-to-alls in their fixed-capacity form); else every step runs eagerly."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _join(rank, world, port)
    from model import load_model
    from model.runner import ModelRunner
    from model.tokenizer import load_tokenizer
    from serving import dp
    from serving import ep as ep_mod
    from serving.engine import Engine, SamplingParams

    m = load_model(ckpt, backend="cpu", ep=world)
    block_size = 16
    per_stream = -(-(prompt_len + new_tokens) // block_size)
    num_blocks = streams * per_stream + 1  # room for every stream on one rank either way
    runner = ModelRunner(m, max_num_seqs=streams, max_model_len=prompt_len + new_tokens) if graphs else None
    if rank != 0:
        (dp.follower_loop if dp_attention else ep_mod.follower_loop)(m, num_blocks, block_size, runner)
        return
    tok = load_tokenizer(ckpt)
    common = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=streams,
                  max_num_batched_tokens=streams * prompt_len, max_model_len=prompt_len + new_tokens,
                  eos_token_ids=[])
    if dp_attention:
        engine = dp.DPEngine(m, tok, world=world, runner=runner, **common)
    else:
        engine = Engine(m, tok, forward=ep_mod.leader_forward(m, runner), **common)
    if runner is not None:
        engine.forward.capture(engine.cache)  # every rank captures at once (rank 0 tells the followers)
    forward = engine.forward
    trace = {"attention_tokens": [], "kv_blocks": []}

    def traced(batch, cache):
        logits = forward(batch, cache)
        if dp_attention:
            trace["attention_tokens"].append(list(forward.last_tokens))
            trace["kv_blocks"].append([s["kv_blocks_used"] for s in engine.rank_stats()])
        else:  # every rank runs the whole batch on its own copy of the same cache
            trace["attention_tokens"].append([int(batch.input_ids.numel())] * world)
            trace["kv_blocks"].append([engine.allocator.num_used] * world)
        return logits

    engine.forward = traced
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, m.config.vocab_size, (streams, prompt_len), generator=g).tolist()

    def run(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seqs = [engine.submit(p, params, lambda e: None) for p in prompts]
        start = time.perf_counter()
        while not all(s.finished for s in seqs):
            engine.step()
        return time.perf_counter() - start

    run(2)  # warm-up
    trace["attention_tokens"].clear()
    trace["kv_blocks"].clear()
    seconds = run(new_tokens)
    ep_mod.shutdown_followers(False)
    steps = trace["attention_tokens"]
    decode = steps[1:] or steps
    Path(out).write_text(json.dumps({
        "ep": world, "dp_attention": dp_attention, "graphs": bool(runner is not None and runner.uses_graphs),
        "replays": runner.replays if runner is not None else 0, "streams": streams, "prompt": prompt_len,
        "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": streams * new_tokens / seconds,
        "steps": len(steps), "prefill_attention_tokens_per_rank": steps[0],
        "decode_attention_tokens_per_rank_per_step": [sum(s[r] for s in decode) / len(decode) for r in range(world)],
        "peak_kv_blocks_per_rank": [max(k[r] for k in trace["kv_blocks"]) for r in range(world)],
        "kv_blocks_per_stream": per_stream,
    }))


def _spawn(fn: Any, world: int, *args: Any, timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        ctx = mp.start_processes(fn, args=(world, _free_port(), *args, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks took over {timeout} s")
        return json.loads(Path(out).read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per MoE layer")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--capacity", action="store_true",
                   help="also time the fixed-capacity form (C = --tokens) against bare all-to-alls of its buffers")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-comm", action="store_true", help="only the whole-model tokens/s")
    p.add_argument("--model-batch", type=int, default=4)
    p.add_argument("--model-prompt", type=int, default=64)
    p.add_argument("--model-new-tokens", type=int, default=16)
    p.add_argument("--skip-serve", action="store_true", help="leave out part 3 (serving with/without DP attention)")
    p.add_argument("--serve-worlds", type=int, nargs="+", default=[2])
    p.add_argument("--serve-streams", type=int, default=8)
    p.add_argument("--serve-prompt", type=int, default=32)
    p.add_argument("--serve-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "comm": [], "model": [], "serve": [],
    }
    for world in [] if args.skip_comm else args.worlds:
        r = _spawn(_comm_worker, world, args)
        base = r["median_ms"]["bare all_to_all_single x2"]
        r["ratio_vs_bare"] = {n: v / base for n, v in r["median_ms"].items()}
        if "capacity form ops" in r["median_ms"]:  # the fixed-capacity form against its own peer
            cap_base = r["median_ms"]["bare a2a x2, capacity buffers"]
            for n in ("bare a2a x2, capacity buffers", "capacity form ops"):
                r["ratio_vs_bare"][n] = r["median_ms"][n] / cap_base
        report["comm"].append(r)
        if not args.json:
            print(f"EP={world} T={args.tokens}/rank D={args.hidden} E={args.experts} top-{args.top_k} {args.dtype} "
                  f"({r['mib_each_way_rank0']:.1f} MiB each way from rank 0):")
            for name, ms in r["median_ms"].items():
                print(f"  {name:28s} {ms:8.2f} ms  {r['ratio_vs_bare'][name]:.2f}x")
    if not args.skip_model:
        from model.tiny import make_tiny_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(make_tiny_checkpoint(Path(tmp) / "ckpt", config_overrides=MODEL_OVERRIDES))
            for world in [1, *args.worlds]:
                margs = (ckpt, args.model_batch, args.model_prompt, args.model_new_tokens)
                if world == 1:
                    with tempfile.TemporaryDirectory() as t2:
                        _model_worker(0, 1, 0, *margs, str(Path(t2) / "r.json"))
                        r = json.loads((Path(t2) / "r.json").read_text())
                else:
                    r = _spawn(_model_worker, world, *margs)
                report["model"].append(r)
                if not args.json:
                    print(f"model EP={world}: {r['tokens_per_s']:.1f} tokens/s ({args.model_batch} x "
                          f"{args.model_new_tokens} new tokens after {args.model_prompt}-token prompts, "
                          f"{r['seconds']:.2f} s, {r['experts_per_rank']} experts per rank)")
    if not args.skip_serve:
        from model.tiny import make_tiny_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(make_tiny_checkpoint(Path(tmp) / "ckpt", config_overrides=MODEL_OVERRIDES))
            for world in args.serve_worlds:
                for dp_attention, graphs in ((False, False), (False, True), (True, False), (True, True)):
                    r = _spawn(_serve_worker, world, ckpt, args.serve_streams, args.serve_prompt,
                               args.serve_new_tokens, dp_attention, graphs)
                    report["serve"].append(r)
                    if not args.json:
                        mode = "--dp-attention" if dp_attention else "replicated attention"
                        mode += f", decode graphs ({r['replays']} replays)" if r["graphs"] else ", eager"
                        per_step = ", ".join(f"{t:g}" for t in r["decode_attention_tokens_per_rank_per_step"])
                        print(f"serve EP={world} {mode}: {r['tokens_per_s']:.1f} tokens/s aggregate "
                              f"({r['streams']} streams x {r['new_tokens']} tokens after {r['prompt']}-token prompts, "
                              f"{r['seconds']:.2f} s, {r['steps']} steps); attention tokens per rank: prefill "
                              f"{r['prefill_attention_tokens_per_rank']}, per decode step [{per_step}]; "
                              f"peak KV blocks per rank {r['peak_kv_blocks_per_rank']} "
                              f"({r['kv_blocks_per_stream']} per stream)")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
