"""Native-library adapters for the CUDA family: our op contracts in, the library's convention out.

Written against the libraries' documented APIs and NOT run on hardware (no GPU in this project's
CI). Every adapter sits behind a ``supports`` predicate that checks the library is importable and
the call's shapes/dtypes are ones the library takes; anything else goes to the Triton tier and then
to generic torch. Libraries are imported inside functions only.

Libraries and the ops they serve:

* FlashMLA ``flash_mla.flash_mla_sparse_fwd`` (NVIDIA SM90/SM100; MetaX ships a MACA build) for
  ``sparse_mla_attention``: our per-sequence positions + block table become FlashMLA's global slot
  ids over the flattened cache (``-1`` kept), heads are zero-padded to the kernel's multiple, and
  its base-2 ``lse`` is converted to natural log.
* DeepGEMM ``deep_gemm.fp8_mqa_logits`` for the ``lightning_indexer`` scoring. It scores FP8
  quantised queries/keys, which can change which positions make the top-k, so it is opt-in:
  ``HWLAYER_FP8_INDEXER=1``.
* vLLM's ``torch.ops._C.rms_norm`` / ``fused_add_rms_norm`` (registered by ``vllm._C`` on NVIDIA,
  by ``mcoplib`` on MetaX) for ``rms_norm``.
* Hygon ``lightop.norm.fused_add_rms_norm`` for ``rms_norm`` with a residual.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from typing import Any

import torch

from hwlayer.ops import positions_to_slots, token_positions


@functools.cache
def importable(module: str) -> bool:
    """Whether ``module`` imports (cached). Imports it: call only from supports()/adapters."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        importlib.import_module(module)
        return True
    except Exception:
        return False


def _cuda_tensors(*tensors: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


# --------------------------------------------------------------------------------------------
# rms_norm through vLLM-compatible custom ops (torch.ops._C), registered by vllm._C or mcoplib


@functools.cache
def _vllm_c_ops(provider: str) -> Any:
    """``torch.ops._C`` once ``provider`` (``vllm._C`` or ``mcoplib``) registered it, else None."""
    if not importable(provider):
        return None
    ops = torch.ops._C
    return ops if hasattr(ops, "rms_norm") and hasattr(ops, "fused_add_rms_norm") else None


def _rms_norm_shape_ok(x: Any, weight: Any, residual: Any) -> bool | str:
    if not _cuda_tensors(x, weight) or (residual is not None and not _cuda_tensors(residual)):
        return "needs CUDA tensors"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        return "the custom op wants x and weight in one dtype"  # it templates both on one scalar type
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0] or x.stride(-1) != 1:
        return "shape outside the contract or non-unit last stride"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return "residual shape/dtype differs from x"
    return True


def make_vllm_rms_norm(provider: str) -> tuple[Any, Any]:
    """(implementation, supports) of ``rms_norm`` over ``torch.ops._C`` registered by ``provider``."""

    def supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
        if _vllm_c_ops(provider) is None:
            return f"{provider} (torch.ops._C.rms_norm) is not importable"
        return _rms_norm_shape_ok(x, weight, residual)

    def rms_norm(
        x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = _vllm_c_ops(provider)
        if residual is None:
            out = torch.empty_like(x)
            ops.rms_norm(out, x.contiguous(), weight, eps)  # rms_norm(out, input, weight, epsilon)
            return out
        # fused_add_rms_norm works in place (input <- normed, residual <- input + residual);
        # the contract leaves inputs untouched, so it works on copies.
        normed, summed = x.clone(), residual.clone()
        ops.fused_add_rms_norm(normed, summed, weight, eps)
        return normed, summed

    rms_norm.__qualname__ = f"rms_norm[{provider}]"
    return rms_norm, supports


# --------------------------------------------------------------------------------------------
# rms_norm on Hygon through lightop


def lightop_rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if residual is None:
        return "lightop adapter covers the residual (fused add) case only"
    if not importable("lightop.norm"):
        return "lightop is not importable"
    return _rms_norm_shape_ok(x, weight, residual)


def lightop_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    from lightop import norm  # noqa: PLC0415

    normed, summed = x.clone(), residual.clone()
    result = norm.fused_add_rms_norm(normed, summed, weight, eps)
    # Documented as vLLM-style in place; accept a returned (normed, summed) pair as well.
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1]
    return normed, summed


# --------------------------------------------------------------------------------------------
# sparse_mla_attention through FlashMLA


def flash_mla_head_multiple(device: torch.device) -> int:
    """FlashMLA's sparse prefill kernel takes heads in multiples of 64 (SM90) or 128 (SM100+)."""
    return 128 if torch.cuda.get_device_capability(device)[0] >= 10 else 64


def to_global_slots(
    indices: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Our per-sequence positions -> slot ids in the flattened ``[num_blocks * block_size]`` cache,
    int32, ``-1`` kept for unused entries (FlashMLA's convention for an invalid index)."""
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens)
    slots = positions_to_slots(block_table, seq_idx, indices, block_size)
    return torch.where(indices >= 0, slots, -1).to(torch.int32)


def flash_mla_sparse_supports(
    q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float, v_dim: int
) -> bool | str:
    if not _cuda_tensors(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens):
        return "needs CUDA tensors"
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        return "FlashMLA sparse prefill takes bf16 q and kv"
    if q.dim() != 3 or q.shape[-1] != 576 or v_dim != 512 or kv_cache.dim() != 3 or kv_cache.shape[-1] != 576:
        return "FlashMLA sparse prefill takes d_qk 576 with d_v 512"
    if indices.dim() != 2 or indices.shape[0] != q.shape[0]:
        return "indices outside the contract"
    if not kv_cache.is_contiguous():
        return "FlashMLA reads the cache as one flat [slots, 1, 576] tensor: needs it contiguous"
    if not importable("flash_mla"):
        return "flash_mla is not importable"
    return True


def flash_mla_sparse_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_mla import flash_mla_sparse_fwd  # noqa: PLC0415

    T, H, Dk = q.shape
    slots = to_global_slots(indices, block_table, cu_seqlens_q, seq_lens, kv_cache.shape[1])
    # Pad topk to the kernel's tile (extra entries invalid) and heads to its multiple (zero queries).
    topk_pad = -slots.shape[1] % 128
    if topk_pad:
        slots = torch.nn.functional.pad(slots, (0, topk_pad), value=-1)
    mult = flash_mla_head_multiple(q.device)
    q_in = q if H % mult == 0 else torch.nn.functional.pad(q, (0, 0, 0, mult - H % mult))
    out, _max_logits, lse2 = flash_mla_sparse_fwd(
        q_in.contiguous(), kv_cache.view(-1, 1, Dk), slots.unsqueeze(1).contiguous(), scale, d_v=v_dim
    )
    out, lse = out[:, :H].to(q.dtype), lse2[:, :H].float() * math.log(2.0)  # base-2 lse -> natural
    empty = ~(indices >= 0).any(dim=1)  # our contract: no valid index -> out 0, lse -inf
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


# --------------------------------------------------------------------------------------------
# lightning_indexer scoring through DeepGEMM (FP8, opt-in)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_indexer_enabled() -> bool:
    return os.environ.get("HWLAYER_FP8_INDEXER", "").strip() not in ("", "0")


def deep_gemm_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> bool | str:
    if not fp8_indexer_enabled():
        return "FP8 scoring can change the top-k; opt in with HWLAYER_FP8_INDEXER=1"
    if not _cuda_tensors(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens):
        return "needs CUDA tensors"
    if q.dim() != 3 or q.shape[-1] != 128 or q.shape[1] not in (32, 64):
        return "DeepGEMM mqa logits takes 32 or 64 heads of dim 128"
    if k_cache.dim() != 3 or k_cache.shape[-1] != 128 or weights.shape != q.shape[:2]:
        return "k_cache/weights outside the contract"
    if not importable("deep_gemm"):
        return "deep_gemm is not importable"
    return True


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3 quantisation over the last dim: (values, fp32 scale with the row shape)."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def deep_gemm_lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> torch.Tensor:
    import deep_gemm  # noqa: PLC0415

    T = q.shape[0]
    bs = k_cache.shape[1]
    lens = seq_lens.long()
    # Gather every sequence's keys into one contiguous [sum(L), D] buffer (DeepGEMM is not paged here).
    seq_of_key = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens)
    key_start = lens.cumsum(0) - lens
    key_pos = torch.arange(int(lens.sum()), device=q.device) - key_start[seq_of_key]
    keys = k_cache.reshape(-1, k_cache.shape[-1])[positions_to_slots(block_table, seq_of_key, key_pos, bs)]
    k_fp8, k_scale = _fp8_rows(keys)
    q_fp8, q_scale = _fp8_rows(q)  # per (token, head)
    # relu is positively homogeneous: relu(s * x) = s * relu(x), so q's scale and our ``scale`` fold
    # into the head weights.
    w = (weights.float() * q_scale * scale).contiguous()
    seq_idx, pos = token_positions(cu_seqlens_q, seq_lens)
    ks = key_start[seq_idx].to(torch.int32)
    ke = (key_start[seq_idx] + pos + 1).to(torch.int32)  # causal: positions 0 .. pos(t)
    logits = deep_gemm.fp8_mqa_logits(q_fp8, (k_fp8, k_scale), w, ks, ke, clean_logits=True)
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    k = min(topk, logits.shape[1])
    if T and k:
        vals, idx = logits.topk(k, dim=-1)
        positions = idx - ks.long().unsqueeze(1)
        out[:, :k] = torch.where(torch.isfinite(vals), positions, -1).to(torch.int32)
    return out
