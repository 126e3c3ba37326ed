"""GLM-5 model on the hwlayer CPU backend vs transformers' GlmMoeDsaForCausalLM (eager), same
checkpoint, same dtype (bf16), same run.

The checkpoint is shaped like GLM-5 but narrow: hidden 512, 8 heads, MLA (q_lora 256, kv_lora 128,
nope 64 + rope 32, v 64), DSA indexer (8 heads x 64, index_topk 256), 32 routed experts top-4 + 1
shared, first layer dense. Measured:

* decode ms/token at 1K / 4K / 16K context (batch 1, greedy): ours = one forward_batch step over
  the paged cache; transformers = one forward with its DynamicCache, after the same prefill;
* prefill tokens/s at 2K (one forward over the 2K prompt);
* a memory-bandwidth floor for our decode: bytes one decode step must read (weights of the
  replicated parts + the 4 routed experts + shared expert, the indexer keys of the whole context,
  the 256 selected latent rows) / measured copy bandwidth.

``--host-overhead``: the decode config's per-step host overhead instead (no transformers): a
decode step's time minus the time inside aten operators, from a ``torch.profiler`` trace with one
torch thread (minimum over the traced steps), plus the step's aten op count and its device->host
reads (``aten::_local_scalar_dense``), for an eager ``forward_batch`` step and for the model
runner's step (serve.py's: on the CPU backend a traced step replayed from C++).
The eager measurement uses only ``load_model`` / ``forward_batch``, so it runs unchanged against older
revisions (``PYTHONPATH=<old checkout> python bench/bench_model.py --host-overhead``).

Transformers at long context is slow on this CPU: its context is built by chunked prefill
(``--hf-chunk`` tokens per forward through its cache) and its decode is timed over fewer steps.

    PYTHONPATH=. .venv/bin/python bench/bench_model.py [--contexts 1024,4096,16384] [--steps 8] [--json]
    PYTHONPATH=. .venv/bin/python bench/bench_model.py --host-overhead [--contexts 1024,4096] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from model import Batch, load_model
from model.tiny import make_tiny_checkpoint

BENCH_CONFIG = {
    "vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 8, "q_lora_rank": 256, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32, "v_head_dim": 64, "head_dim": 32, "index_n_heads": 8, "index_head_dim": 64,
    "index_topk": 256, "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1,
    "moe_intermediate_size": 256, "intermediate_size": 1024, "first_k_dense_replace": 1, "n_group": 1,
    "topk_group": 1, "max_position_embeddings": 20480, "num_nextn_predict_layers": 0, "dtype": "bfloat16",
}


def _ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Read+write bandwidth of a 512 MiB tensor copy (bytes read counted once)."""
    src = torch.empty(128 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = min(_ms(lambda: dst.copy_(src), 1) for _ in range(5))
    return src.numel() * 4 / (best / 1e3) / 1e9


def decode_bytes(m, context: int) -> int:
    """Bytes one batch-1 decode step reads (lower bound: every weight it multiplies, once)."""
    cfg, elem = m.config, torch.empty((), dtype=m.dtype).element_size()
    total = m.embed.shape[1] * elem + m.lm_head.numel() * elem + m.norm.numel() * elem
    for layer in m.layers:
        a = layer.attn
        for t in (a.q_a_proj, a.q_b_proj, a.kv_a_proj, a.o_proj, a.w_uk, a.w_uv_t):
            total += t.numel() * t.element_size()
        if a.has_indexer:
            total += sum(t.numel() * t.element_size() for t in (a.wq_b, a.wk, a.weights_proj))
            total += context * cfg.index_head_dim * elem  # indexer keys: the whole context
        total += min(cfg.index_topk, context) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem  # selected rows
        mlp = layer.mlp
        if hasattr(mlp, "w13"):
            per_expert = (mlp.w13[0].numel() + mlp.w2[0].numel()) * elem
            total += cfg.num_experts_per_tok * per_expert + mlp.gate.numel() * 4
            if mlp.shared is not None:
                total += (mlp.shared.gate_up.numel() + mlp.shared.down.numel()) * elem
        else:
            total += (mlp.gate_up.numel() + mlp.down.numel()) * elem
    return total


def decode_at(m, ids: torch.Tensor, context: int, chunk: int, spare: int) -> Callable[[], None]:
    """Build a ``context``-token cache by chunked prefill; return a function running one batch-1 decode
    step after it (each call appends the next token; ``spare`` tokens of room for those steps)."""
    bs = 64
    cache = m.new_cache(-(-(context + spare) // bs), bs)
    table = torch.arange(cache.num_blocks, dtype=torch.int32)[None]
    for s in range(0, context, chunk):  # chunked prefill up to the context
        e = min(context, s + chunk)
        m.forward_batch(Batch(ids[s:e], torch.tensor([0, e - s], dtype=torch.int32),
                              torch.tensor([e], dtype=torch.int32), table), cache)
    pos = [context]

    def step() -> None:
        pos[0] += 1
        m.forward_batch(Batch(ids[pos[0] - 1 : pos[0]], torch.tensor([0, 1], dtype=torch.int32),
                              torch.tensor([pos[0]], dtype=torch.int32), table), cache)

    return step


def ours_prefill_and_decode(m, ids: torch.Tensor, contexts: list[int], steps: int, chunk: int) -> dict:
    out = {}
    for C in contexts:
        step = decode_at(m, ids, C, chunk, steps + 1)
        step()  # warm-up
        out[C] = _ms(step, steps)
    return out


def decode_with_runner(m, ids: torch.Tensor, context: int, chunk: int, spare: int) -> tuple[Callable[[], None], str]:
    """As :func:`decode_at`, but each decode step goes through ``model.runner.ModelRunner`` as serve.py runs
    it (the backend's device graph: on the CPU backend the traced step of hwlayer/backends/cpu/graph.py).
    Returns the step and what served it."""
    from model.runner import ModelRunner

    bs = 64
    cache = m.new_cache(-(-(context + spare) // bs), bs)
    table = torch.arange(cache.num_blocks, dtype=torch.int32)[None]
    for s in range(0, context, chunk):
        e = min(context, s + chunk)
        m.forward_batch(Batch(ids[s:e], torch.tensor([0, e - s], dtype=torch.int32),
                              torch.tensor([e], dtype=torch.int32), table), cache)
    runner = ModelRunner(m, max_num_seqs=1, max_model_len=cache.num_blocks * bs)
    runner.capture(cache)
    pos = [context]

    def step() -> None:
        pos[0] += 1
        runner(Batch(ids[pos[0] - 1 : pos[0]], torch.tensor([0, 1], dtype=torch.int32),
                     torch.tensor([pos[0]], dtype=torch.int32), table), cache)

    spec = m.plan.backend.device_graph
    served = f"ModelRunner, graph {spec.api}" if runner.uses_graphs and spec is not None else "ModelRunner, eager"
    return step, served


def _traced_steps(step: Callable[[], None], steps: int) -> dict:
    """Per step, from a ``torch.profiler`` trace: span, time inside aten ops, host overhead = the difference,
    aten calls and device->host reads; the sample with the least overhead of ``steps`` traced steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(2):
        step()  # warm-up
    samples = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("decode_step"):
                step()
        events = prof.key_averages()
        span = next(e.cpu_time_total for e in events if e.key == "decode_step") / 1e3
        ops = [e for e in events if e.key.startswith("aten::")]
        op_ms = sum(e.self_cpu_time_total for e in ops) / 1e3
        reads = sum(e.count for e in ops if e.key == "aten::_local_scalar_dense")
        samples.append((span - op_ms, span, op_ms, sum(e.count for e in ops), reads))
    overhead, span, op_ms, calls, reads = min(samples)
    return {"step_ms": span, "op_ms": op_ms, "host_overhead_ms": overhead, "aten_calls": calls, "host_reads": reads}


def host_overhead(m, ids: torch.Tensor, contexts: list[int], steps: int, chunk: int) -> dict:
    """Per batch-1 decode step, from a ``torch.profiler`` trace with one torch thread (every op runs
    on the traced thread): the step's span, the time inside aten ops (the sum of every ``aten::``
    event's self time) and the host overhead = the difference (Python, the model and op glue,
    argument checks, dispatch). Minimum over ``steps`` traced steps (a shared machine disturbs some);
    also aten op calls and device->host reads (``aten::_local_scalar_dense``: ``.item()``,
    ``int(t)``, ``bool(t)``) per step. Two ways per context: an eager ``forward_batch`` (what older
    revisions can run too) and, where this revision has it, the model runner's decode step (serve.py's)."""
    torch.set_num_threads(1)
    out = {}
    for C in contexts:
        ways = [("eager forward_batch", decode_at(m, ids, C, chunk, 3 * steps + 4))]
        try:
            ways.append(tuple(reversed(decode_with_runner(m, ids, C, chunk, 3 * steps + 4))))
        except ImportError:  # an older revision without the runner
            pass
        for name, step in ways:
            r = _traced_steps(step, steps)
            out.setdefault(name, {})[C] = r
            print(f"decode @{C} ({name}): step {r['step_ms']:.2f} ms, inside aten ops {r['op_ms']:.2f} ms, host "
                  f"overhead {r['host_overhead_ms']:.2f} ms; {r['aten_calls']} aten calls, {r['host_reads']} "
                  f"device->host reads per step", flush=True)
    return out


def hf_prefill_and_decode(hf, ids: torch.Tensor, contexts: list[int], steps: int, chunk: int) -> dict:
    from transformers import DynamicCache

    out = {}
    for C in contexts:
        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            for s in range(0, C, chunk):
                e = min(C, s + chunk)
                hf(ids[None, s:e], cache=cache, use_cache=True,
                   position_ids=torch.arange(s, e)[None])
            pos = [C]

            def step() -> None:
                hf(ids[None, pos[0] : pos[0] + 1], cache=cache, use_cache=True,
                   position_ids=torch.tensor([[pos[0]]]))
                pos[0] += 1

            step()
            out[C] = _ms(step, steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--hf-contexts", default=None, help="contexts for transformers (default: same)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per context (median)")
    ap.add_argument("--hf-steps", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=2048, help="our chunked-prefill size")
    ap.add_argument("--hf-chunk", type=int, default=1024, help="transformers chunked-prefill size")
    ap.add_argument("--host-overhead", action="store_true", help="measure per-step host overhead only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.host_overhead:
        tmp = Path(tempfile.mkdtemp(prefix="bench_model_"))
        path = make_tiny_checkpoint(tmp / "ckpt", BENCH_CONFIG, seed=0, dtype=torch.bfloat16, std=0.05)
        ours = load_model(path, backend="cpu", dtype="bf16")
        ids = torch.randint(20, BENCH_CONFIG["vocab_size"], (max(contexts) + 3 * args.steps + 8,),
                            generator=torch.Generator().manual_seed(0))
        res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "host_overhead": host_overhead(ours, ids, contexts, args.steps, args.chunk)}
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        return
    hf_contexts = [int(c) for c in (args.hf_contexts or args.contexts).split(",")]

    from transformers import GlmMoeDsaForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bench_model_"))
    path = make_tiny_checkpoint(tmp / "ckpt", BENCH_CONFIG, seed=0, dtype=torch.bfloat16, std=0.05)
    ours = load_model(path, backend="cpu", dtype="bf16")
    hf = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    n = max(contexts + hf_contexts + [args.prefill]) + max(args.steps, args.hf_steps) + 4
    ids = torch.randint(20, BENCH_CONFIG["vocab_size"], (n,), generator=torch.Generator().manual_seed(0))

    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                 "torch": torch.__version__, "config": BENCH_CONFIG}
    # prefill tokens/s at 2K (fresh cache; one forward over the whole prompt)
    P = args.prefill
    cache = ours.new_cache(-(-P // 64), 64)
    table = torch.arange(cache.num_blocks, dtype=torch.int32)[None]
    batch = Batch(ids[:P], torch.tensor([0, P], dtype=torch.int32), torch.tensor([P], dtype=torch.int32), table)
    ours.forward_batch(batch, cache)  # warm-up
    t_ours = min(_ms(lambda: ours.forward_batch(batch, cache), 1) for _ in range(2))
    with torch.no_grad():
        t_hf = _ms(lambda: hf(ids[None, :P]), 1)
    res["prefill"] = {"tokens": P, "ours_tok_s": P / t_ours * 1e3, "hf_tok_s": P / t_hf * 1e3,
                      "speedup": t_hf / t_ours}
    print(f"prefill {P}: ours {P / t_ours * 1e3:.0f} tok/s, transformers {P / t_hf * 1e3:.0f} tok/s, "
          f"x{t_hf / t_ours:.1f}", flush=True)

    bw = copy_bandwidth_gbs()
    res["copy_bandwidth_GBs"] = bw
    ours_ms = ours_prefill_and_decode(ours, ids, contexts, args.steps, args.chunk)
    for C in contexts:
        floor_ms = decode_bytes(ours, C) / (bw * 1e9) * 1e3
        print(f"decode @{C}: ours {ours_ms[C]:.1f} ms/token (bandwidth floor {floor_ms:.2f} ms, "
              f"x{ours_ms[C] / floor_ms:.1f} above it)", flush=True)
    hf_ms = hf_prefill_and_decode(hf, ids, hf_contexts, args.hf_steps, args.hf_chunk)
    for C in hf_contexts:
        line = f"decode @{C}: transformers {hf_ms[C]:.1f} ms/token"
        if C in ours_ms:
            line += f", ours x{hf_ms[C] / ours_ms[C]:.1f} faster"
        print(line, flush=True)
    res["decode_ms"] = {"ours": ours_ms, "hf": hf_ms,
                        "bandwidth_floor_ms": {C: decode_bytes(ours, C) / (bw * 1e9) * 1e3 for C in contexts}}
    if len(contexts) > 1:
        print(f"ours decode {contexts[-1]} / {contexts[0]}: x{ours_ms[contexts[-1]] / ours_ms[contexts[0]]:.2f}")
    if args.json:
        print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
