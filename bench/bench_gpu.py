"""GLM-5 on a GPU through hwlayer vs transformers' GlmMoeDsaForCausalLM, same checkpoint, same GPU, same run.

The checkpoint is the one of issue 11: GLM-5's head geometry (16 heads, MLA q_lora 1024, kv_lora 512,
nope 192 + rope 64, v 256, DSA indexer 32 x 128 with index_topk 2048, 64 routed experts top-8 + 1
shared), narrower elsewhere (hidden 2048, 6 layers, vocab 16384): about 2.3 B parameters in bf16,
random weights written by :func:`model.tiny.make_tiny_checkpoint` in the real HF layout.

Measured (median over ``--steps`` timed steps after a warm-up; the device is synchronised around
every timed step):

* decode ms/token at 1K / 4K / 16K context, batch 1: ours = one ``forward_batch`` step over the
  paged cache after a chunked prefill of the context; transformers = one forward with its
  DynamicCache after its own prefill;
* decode tok/s at batch 32 (32 sequences of ``--batch-context`` tokens, one step for all);
* prefill tok/s at 4K (one forward over a 4096-token prompt, fresh cache);
* the bandwidth floor of a batch-1 decode step: bytes it must read (every weight it multiplies
  once, the indexer keys of the context, the selected latent rows) / the device's measured copy
  bandwidth;
* per decode step (4K, batch 1), from torch.profiler: kernel launches, device->host syncs and
  copies, CPU time and device time.

With no CUDA device it says so and exits 0. ``--tiny --device cpu`` runs the same logic on a tiny
checkpoint on the CPU (a dry run of the script, not a measurement).

    PYTHONPATH=. python bench/bench_gpu.py [--backend cuda] [--steps 16] [--json out.json]
    PYTHONPATH=. python bench/bench_gpu.py --tiny --device cpu          # dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Batch, load_model
from model.tiny import make_tiny_checkpoint

# The checkpoint of issue 11 (transformers GlmMoeDsaConfig with these arguments, its defaults elsewhere).
GLM5_SHAPED = {
    "vocab_size": 16384, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 1024,
    "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 1024,
    "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "head_dim": 64,
    "index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048, "n_routed_experts": 64,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "max_position_embeddings": 20480, "num_nextn_predict_layers": 0,
    "dtype": "bfloat16",
}
# For the CPU dry run: the same structure, tiny.
TINY_SHAPED = dict(GLM5_SHAPED, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                   index_n_heads=4, index_head_dim=16, index_topk=32, n_routed_experts=8, num_experts_per_tok=2,
                   max_position_embeddings=1024)

BLOCK_SIZE = 64
NOMINAL_HBM_TBS = {"H200": 4.8, "H100": 3.35, "H20": 4.0, "A100": 2.0}  # vendor figures, for the record


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Device memory bandwidth from a large copy: (bytes read + bytes written) / time."""
    src = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(median_ms(lambda: dst.copy_(src), 1, device) for _ in range(5))
    return 2 * src.numel() * 4 / (best / 1e3) / 1e9


def decode_step_bytes(m: Any, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight it multiplies once (the routed experts
    it picks, not all of them), the indexer keys of the whole context, the selected latent rows."""
    cfg, elem = m.config, torch.empty((), dtype=m.dtype).element_size()
    total = m.embed.shape[1] * elem + m.lm_head.numel() * elem + m.norm.numel() * elem
    for layer in m.layers:
        a = layer.attn
        total += sum(t.numel() * t.element_size() for t in (a.q_a_proj, a.q_b_proj, a.kv_a_proj, a.o_proj, a.w_uk,
                                                             a.w_uv_t))
        if a.has_indexer:
            total += sum(t.numel() * t.element_size() for t in (a.wq_b, a.wk, a.weights_proj))
            total += context * cfg.index_head_dim * elem
        total += min(cfg.index_topk, context) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
        mlp = layer.mlp
        if hasattr(mlp, "w13"):
            total += cfg.num_experts_per_tok * (mlp.w13[0].numel() + mlp.w2[0].numel()) * elem + mlp.gate.numel() * 4
            if mlp.shared is not None:
                total += (mlp.shared.gate_up.numel() + mlp.shared.down.numel()) * elem
        else:
            total += (mlp.gate_up.numel() + mlp.down.numel()) * elem
    return total


# --------------------------------------------------------------------------------------------
# Ours: forward_batch over a paged cache


def make_step(m: Any, batch: int, max_len: int, eager: bool) -> tuple[Callable[[Batch, Any], torch.Tensor], str]:
    """How ours runs a step: :class:`model.runner.ModelRunner` (decode replayed from device graphs
    where the backend has them; ``eager`` = ``--enforce-eager``), or ``forward_batch`` in a tree
    without the runner."""
    try:
        from model.runner import ModelRunner
    except ImportError:
        return m.forward_batch, "forward_batch (no model.runner)"
    runner = ModelRunner(m, max_num_seqs=batch, max_model_len=max_len, graphs=None if eager else "auto")
    return runner, f"ModelRunner ({'device graphs' if runner.uses_graphs else 'eager'})"


class OursSequences:
    """``batch`` sequences of the same context in one paged cache, each with its own blocks."""

    def __init__(self, m: Any, batch: int, max_len: int, eager: bool = False) -> None:
        self.m, self.batch = m, batch
        per_seq = -(-max_len // BLOCK_SIZE)
        self.cache = m.new_cache(batch * per_seq, BLOCK_SIZE)
        self.table = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
        self.lens = [0] * batch
        self.run, self.how = make_step(m, batch, per_seq * BLOCK_SIZE, eager)

    def prefill(self, ids: torch.Tensor, context: int, chunk: int) -> None:
        """Each sequence's first ``context`` tokens, ``chunk`` tokens per forward (one sequence at a time)."""
        for b in range(self.batch):
            for s in range(0, context, chunk):
                e = min(context, s + chunk)
                self.run(Batch(ids[b, s:e], torch.tensor([0, e - s], dtype=torch.int32),
                               torch.tensor([e], dtype=torch.int32), self.table[b : b + 1]), self.cache)
            self.lens[b] = context

    def decode_step(self, ids: torch.Tensor) -> torch.Tensor:
        """One new token for every sequence, one forward."""
        new = torch.stack([ids[b, self.lens[b]] for b in range(self.batch)])
        self.lens = [n + 1 for n in self.lens]
        return self.run(Batch(new, torch.arange(self.batch + 1, dtype=torch.int32),
                              torch.tensor(self.lens, dtype=torch.int32), self.table), self.cache)


# --------------------------------------------------------------------------------------------
# transformers: its own DynamicCache


class HFSequences:
    def __init__(self, hf: Any, batch: int) -> None:
        from transformers import DynamicCache

        self.hf, self.batch = hf, batch
        self.cache = DynamicCache(config=hf.config)
        self.len = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, context: int, chunk: int) -> None:
        dev = self.hf.device
        for s in range(0, context, chunk):
            e = min(context, s + chunk)
            pos = torch.arange(s, e, device=dev)[None].expand(self.batch, -1)
            self.hf(ids[: self.batch, s:e].to(dev), cache=self.cache, use_cache=True, position_ids=pos)
        self.len = context

    @torch.inference_mode()
    def decode_step(self, ids: torch.Tensor) -> torch.Tensor:
        dev = self.hf.device
        pos = torch.full((self.batch, 1), self.len, device=dev)
        out = self.hf(ids[: self.batch, self.len : self.len + 1].to(dev), cache=self.cache,
                      use_cache=True, position_ids=pos)
        self.len += 1
        return out.logits


# --------------------------------------------------------------------------------------------
# Profiling one decode step


LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_step(step: Callable[[], Any], device: torch.device, table_path: Path | None) -> dict:
    """Kernel launches, syncs and device->host copies of one step, with its CPU and device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    names = [e.name for e in events]
    out = {
        "kernel_launches": sum(n in LAUNCH_EVENTS for n in names),
        "syncs": sum(n in SYNC_EVENTS for n in names) - (1 if device.type == "cuda" else 0),  # minus ours above
        "device_to_host_copies": sum("DtoH" in n or "Device -> Host" in n for n in names),
        "aten_ops": sum(n.startswith("aten::") for n in names),
        # kernels that ran on the device (inside a replayed graph too, where launches count 1 graph)
        "device_kernels": sum(str(getattr(e, "device_type", "")).endswith("CUDA") and "Memcpy" not in e.name
                              and "Memset" not in e.name for e in events),
    }
    averages = prof.key_averages()
    out["cpu_ms"] = sum(a.self_cpu_time_total for a in averages) / 1e3
    if device.type == "cuda":
        out["device_ms"] = sum(getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0))
                               for a in averages) / 1e3
        sort = "self_cuda_time_total"
    else:
        out["kernel_launches"] = None  # no device: nothing is launched
        out["syncs"] = None
        sort = "self_cpu_time_total"
    if table_path is not None:
        table_path.write_text(averages.table(sort_by=sort, row_limit=40))
    return out


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny: a dry run)")
    ap.add_argument("--backend", default=None, help="hwlayer backend (default: cuda on a GPU, cpu on --device cpu)")
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint and small sizes: a dry run of the logic")
    ap.add_argument("--checkpoint", default=None, help="reuse a checkpoint directory (default: build one)")
    ap.add_argument("--contexts", default=None, help="batch-1 decode contexts (default 1024,4096,16384)")
    ap.add_argument("--batch", type=int, default=32, help="sequences of the batched decode")
    ap.add_argument("--batch-context", type=int, default=None, help="context of each batched sequence (1024)")
    ap.add_argument("--prefill", type=int, default=None, help="prefill length (default 4096)")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk when building a context")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per figure (median)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--enforce-eager", action="store_true", help="no device graphs for our decode steps")
    ap.add_argument("--profile-table", default=None, help="write the profiler table of one decode step here")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device: expected cuda or cpu, got {args.device!r}")
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu: only with --tiny (the GLM-5-shaped checkpoint is a GPU benchmark)")
    small = args.tiny
    args.contexts = [int(c) for c in (args.contexts or ("64,128" if small else "1024,4096,16384")).split(",")]
    args.batch_context = args.batch_context or (32 if small else 1024)
    args.prefill = args.prefill or (128 if small else 4096)
    if small:
        args.batch = min(args.batch, 4)
        args.steps = min(args.steps, 3)
        args.chunk = min(args.chunk, 64)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, or `--tiny --device cpu` for a dry run of its logic.")
        return 0
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    config = TINY_SHAPED if args.tiny else GLM5_SHAPED

    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "ckpt", config, seed=0,
                                    dtype=torch.bfloat16, std=0.02)
    ours = load_model(path, backend=backend, dtype="bf16")
    if ours.device.type != device.type:
        print(f"bench_gpu.py: backend {backend!r} runs on {ours.device}, not {device}; pick --backend", file=sys.stderr)
        return 2
    hf = None
    if not args.no_hf:
        from transformers import GlmMoeDsaForCausalLM

        hf = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()

    params = checkpoint_parameters(path)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "backend": backend, "parameters": params, "config": config,
        "plan": {op: e.origin for op, e in ours.plan.entries.items()},
    }
    print(f"{res['device']}: hwlayer backend {backend}, {params / 1e6:.1f} M parameters", flush=True)
    vocab = config["vocab_size"]
    longest = max(args.contexts + [args.prefill, args.batch_context]) + args.steps + 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, vocab, (args.batch, longest), generator=gen)

    # Bandwidth floor of a batch-1 decode step.
    bw = copy_bandwidth_gbs(device, 64 if args.tiny else 1024)
    res["copy_bandwidth_GBs"] = bw
    res["decode_floor_ms"] = {C: decode_step_bytes(ours, C) / (bw * 1e9) * 1e3 for C in args.contexts}

    # Decode, batch 1.
    res["decode_ms"] = {"ours": {}, "hf": {}}
    for C in args.contexts:
        seq = OursSequences(ours, 1, C + 2 * args.steps + 4, args.enforce_eager)
        res.setdefault("ours_step", seq.how)
        seq.prefill(ids, C, args.chunk)
        seq.decode_step(ids)  # warm-up (Triton compilation, allocator)
        res["decode_ms"]["ours"][C] = median_ms(lambda: seq.decode_step(ids), args.steps, device)
        line = (f"decode @{C}, batch 1: ours {res['decode_ms']['ours'][C]:.2f} ms/token "
                f"(floor {res['decode_floor_ms'][C]:.3f} ms)")
        if C == args.contexts[len(args.contexts) // 2]:
            table = Path(args.profile_table) if args.profile_table else None
            res["profile_decode_step"] = dict(context=C, **profile_step(lambda: seq.decode_step(ids), device, table))
        seq = None  # free its cache before the next one
        if hf is not None:
            hseq = HFSequences(hf, 1)
            hseq.prefill(ids, C, args.chunk)
            hseq.decode_step(ids)
            res["decode_ms"]["hf"][C] = median_ms(lambda: hseq.decode_step(ids), args.steps, device)
            line += f"; transformers {res['decode_ms']['hf'][C]:.2f} ms/token " \
                    f"(ours x{res['decode_ms']['hf'][C] / res['decode_ms']['ours'][C]:.1f})"
            hseq = None
        print(line, flush=True)

    # Decode, batch 32.
    B, C = args.batch, args.batch_context
    seq = OursSequences(ours, B, C + 2 * args.steps + 4, args.enforce_eager)
    seq.prefill(ids, C, args.chunk)
    seq.decode_step(ids)
    ms = median_ms(lambda: seq.decode_step(ids), args.steps, device)
    res["batch_decode_tok_s"] = {"batch": B, "context": C, "ours": B / ms * 1e3}
    seq = None  # free its cache before the next one
    line = f"decode batch {B} @{C}: ours {B / ms * 1e3:.0f} tok/s"
    if hf is not None:
        hseq = HFSequences(hf, B)
        hseq.prefill(ids, C, args.chunk)
        hseq.decode_step(ids)
        hms = median_ms(lambda: hseq.decode_step(ids), args.steps, device)
        res["batch_decode_tok_s"]["hf"] = B / hms * 1e3
        line += f"; transformers {B / hms * 1e3:.0f} tok/s (ours x{hms / ms:.1f})"
        hseq = None
    print(line, flush=True)

    # Prefill.
    P = args.prefill
    runs = 2 if args.tiny else 3

    def ours_prefill() -> None:
        OursSequences(ours, 1, P, eager=True).prefill(ids, P, P)

    ours_prefill()
    ms = median_ms(ours_prefill, runs, device)
    res["prefill_tok_s"] = {"tokens": P, "ours": P / ms * 1e3}
    line = f"prefill {P}: ours {P / ms * 1e3:.0f} tok/s"
    if hf is not None:
        def hf_prefill() -> None:
            HFSequences(hf, 1).prefill(ids, P, P)

        hf_prefill()
        hms = median_ms(hf_prefill, runs, device)
        res["prefill_tok_s"]["hf"] = P / hms * 1e3
        line += f"; transformers {P / hms * 1e3:.0f} tok/s (ours x{hms / ms:.2f})"
    print(line, flush=True)
    print(f"our steps ran through {res['ours_step']}")
    prof = res["profile_decode_step"]
    print(f"one decode step @{prof['context']}: {prof['kernel_launches']} kernel launches "
          f"({prof['device_kernels']} kernels on the device), {prof['syncs']} syncs, "
          f"{prof['device_to_host_copies']} device->host copies, CPU {prof['cpu_ms']:.1f} ms"
          + (f", device {prof['device_ms']:.2f} ms" if "device_ms" in prof else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def checkpoint_parameters(path: Path) -> int:
    """Parameters stored in the checkpoint's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += _numel(f.get_slice(name).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
