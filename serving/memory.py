"""How big the KV cache is: from a byte budget, from the device's free memory, or a block count.

Precedence (serve.py): ``--num-kv-blocks`` (an explicit count) > ``--kv-cache-memory-bytes`` (a byte
budget for the cache alone) > ``--gpu-memory-utilization`` (the fraction of the device's memory that
weights, activations and the cache may use together; the cache gets what a profiling step leaves,
as vLLM's ``determine_available_memory`` does). On the CPU there is no device memory to profile: the
default there is 4 full contexts at ``--max-model-len`` (at least one block per sequence).
"""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
CPU_DEFAULT_CONTEXTS = 4


def parse_bytes(text: str) -> int:
    """``"512Mi"`` -> 536870912: an integer (or decimal) with an optional ``K``/``M``/``G``/``T``
    (powers of 1000) or ``Ki``/``Mi``/``Gi``/``Ti`` (powers of 1024) suffix, an optional trailing ``B``.
    Raises ``ValueError`` (one line) for anything else or a size below one byte."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not a size; expected bytes such as 8000000000, 8G or 7.5Gi "
                         "(K/M/G/T: powers of 1000, Ki/Mi/Gi/Ti: powers of 1024)")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte; expected a positive size")
    return value


def blocks_for_bytes(budget: int, kv_bytes_per_token: int, block_size: int) -> int:
    """Whole blocks of ``block_size`` tokens that fit ``budget`` bytes."""
    return budget // (kv_bytes_per_token * block_size)


def device_module(device: Any) -> Any | None:
    """``torch.cuda`` / ``torch.npu`` / ... for a device with a memory API, or None (the CPU)."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cpu":
        return None
    mod = getattr(torch, kind, None)
    return mod if mod is not None and hasattr(mod, "mem_get_info") else None


def profile_kv_budget(model: Any, utilization: float, num_tokens: int, block_size: int) -> tuple[int, dict]:
    """Bytes left for the KV cache when weights, activations and cache may use ``utilization`` of the
    device's memory: run one prefill of ``num_tokens`` tokens (the step budget, the largest activation
    a step makes) on a one-context scratch cache and read the peak. Returns (bytes, what was measured).
    Written against the ``torch.cuda`` memory API (``mem_get_info``, ``max_memory_allocated``,
    ``reset_peak_memory_stats``; torch_npu mirrors it as ``torch.npu``); not run on a device here."""
    import torch

    from model import Batch

    mod = device_module(model.device)
    if mod is None:
        raise ValueError("profiling needs a device with a memory API; on the CPU use --kv-cache-memory-bytes "
                         "or --num-kv-blocks")
    free, total = mod.mem_get_info()
    mod.synchronize()
    mod.reset_peak_memory_stats()
    blocks = -(-num_tokens // block_size)
    scratch = model.new_cache(blocks, block_size)
    batch = Batch(input_ids=torch.zeros(num_tokens, dtype=torch.int64),
                  cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32),
                  seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
                  block_table=torch.arange(blocks, dtype=torch.int32).view(1, blocks))
    model.forward_batch(batch, scratch)
    mod.synchronize()
    peak = mod.max_memory_allocated()
    scratch_bytes = blocks * block_size * model.kv_bytes_per_token()
    del scratch
    mod.empty_cache()
    used_by_others = total - free - mod.memory_allocated()  # other processes on the device
    budget = int(total * utilization) - (peak - scratch_bytes) - max(0, used_by_others)
    return budget, {"total": total, "peak": peak, "others": max(0, used_by_others)}


def size_cache(*, num_kv_blocks: int | None, kv_cache_memory_bytes: int | None, gpu_memory_utilization: float,
               model: Any, block_size: int, max_model_len: int, max_num_seqs: int,
               max_num_batched_tokens: int) -> tuple[int, str]:
    """(blocks, how they were chosen) for one cache (one rank's under DP attention)."""
    per_token = model.kv_bytes_per_token()
    if num_kv_blocks is not None:
        return num_kv_blocks, "--num-kv-blocks"
    if kv_cache_memory_bytes is not None:
        return blocks_for_bytes(kv_cache_memory_bytes, per_token, block_size), "--kv-cache-memory-bytes"
    if device_module(getattr(model, "device", "cpu")) is None:
        blocks = max(CPU_DEFAULT_CONTEXTS * -(-max_model_len // block_size), max_num_seqs)
        return blocks, f"cpu default: {CPU_DEFAULT_CONTEXTS} contexts of --max-model-len"
    budget, seen = profile_kv_budget(model, gpu_memory_utilization, max_num_batched_tokens, block_size)
    blocks = max(0, blocks_for_bytes(budget, per_token, block_size))
    return blocks, (f"--gpu-memory-utilization {gpu_memory_utilization:g} of {seen['total'] / 2**30:.1f} GiB, "
                    f"profiled peak {seen['peak'] / 2**30:.2f} GiB")


def agree_on_blocks(num_blocks: int) -> int:
    """Under torchrun: the smallest block count of all ranks (each sized its own cache from its own
    free memory, but expert parallelism needs one geometry and DP attention one per-rank size)."""
    import torch
    import torch.distributed as dist

    from hwlayer import distributed as hd

    ctx = hd.current()
    device = ctx.device if ctx is not None and ctx.dist_backend != "gloo" else "cpu"
    t = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    with hd.rank_failure_guard("agreeing on the KV cache size"):
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def capacity(num_blocks: int, block_size: int, max_model_len: int) -> tuple[int, float]:
    """(tokens the cache holds, how many full --max-model-len contexts fit at once)."""
    tokens = num_blocks * block_size
    return tokens, tokens / max_model_len
