"""Native-library adapters for the CUDA family: our op contracts in, the library's convention out.

Written against the libraries' documented APIs and sources (cited per adapter) and NOT run on
hardware; CI runs them against CPU emulators of those APIs (``conformance/emulators``,
``pytest conformance --backend cuda|metax|hygon --emulated``). Every adapter sits behind a
``supports`` predicate that checks the library is importable and the call's shapes/dtypes are ones
the library takes; anything else goes to the Triton tier and then to generic torch. Libraries are
imported inside functions only.

Libraries and the ops they serve:

* FlashMLA ``flash_mla.flash_mla_sparse_fwd`` (NVIDIA SM90/SM100; MetaX ships a MACA build) for
  ``sparse_mla_attention``: our per-sequence positions + block table become FlashMLA's global slot
  ids over the flattened cache (``-1`` kept), top-k is padded to whole 128-wide blocks, heads are
  zero-padded to 64 or 128 (current API: exactly those; more than 128 heads decline), and the lse
  base is taken from the API generation: natural log when the signature has ``topk_length``
  (deepseek-ai/FlashMLA 082094b, 2026-01-16, ``tests/ref.py`` uses ``logsumexp``), base 2 before it
  and in MetaX's mcFlashMLA (c2dbf6e, "lse: 2-based log-sum-exp"), converted to natural log.
* DeepGEMM for the ``lightning_indexer`` scoring: MACA's ``bf16_mqa_logits`` where the build has it
  (lossless; what vLLM-metax 3aadf08 uses), else ``fp8_mqa_logits``, which scores FP8-quantised
  queries/keys and can change which positions make the top-k, so it is opt-in:
  ``HWLAYER_FP8_INDEXER=1``.
* vLLM's ``torch.ops._C.rms_norm`` / ``fused_add_rms_norm`` for ``rms_norm``, registered by
  ``vllm._C`` on NVIDIA and by ``mcoplib._C`` on MetaX (``import mcoplib`` alone registers nothing:
  mcoplib f722323 ``mcoplib/__init__.py``; vLLM-metax ``platform.py`` imports ``mcoplib._C``).
* Hygon ``lightop.norm`` for ``rms_norm``: ``fused_add_rms_norm`` (in place) with a residual,
  ``rmsnorm_forward_autograd`` without; widths under 64 decline (Hygon's vllm_hcu plugin:
  "lightop's HCU RMSNorm kernel currently rejects reductions narrower than one wave").
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Any

import torch

from hwlayer.ops import positions_to_slots, token_positions
from hwlayer.ops.layout import AttentionMetadata, meta_supported


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


FAMILY = ("cuda", "hygon", "metax", "iluvatar", "kunlunxin")


def emulation_note(backend: str) -> str | None:
    """The note of a test-only emulation of ``backend``, else None (always None in production).

    ``conformance/emulators`` installs a marker module ``hwlayer_emulation`` naming the emulated
    backend next to CPU emulators of its libraries; nothing else creates it."""
    marker = sys.modules.get("hwlayer_emulation")
    return getattr(marker, "NOTE", None) if getattr(marker, "BACKEND", None) == backend else None


def device_type() -> str:
    """``cuda``, or ``cpu`` while a CUDA-family backend is emulated in a test process."""
    marker = sys.modules.get("hwlayer_emulation")
    return "cpu" if getattr(marker, "BACKEND", None) in FAMILY else "cuda"


def _cuda_tensors(*tensors: Any) -> bool:
    dev = device_type()
    return all(isinstance(t, torch.Tensor) and t.device.type == dev for t in tensors)


# --------------------------------------------------------------------------------------------
# rms_norm through vLLM-compatible custom ops (torch.ops._C), registered by vllm._C or mcoplib


@functools.cache
def _vllm_c_ops(provider: str) -> Any:
    """``torch.ops._C`` once ``provider`` (``vllm._C`` or ``mcoplib._C``) registered it, else None."""
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
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # the op checks out is contiguous
            ops.rms_norm(out, x.contiguous(), weight.contiguous(), eps)  # rms_norm(out, input, weight, epsilon)
            return out
        # fused_add_rms_norm works in place (input <- normed, residual <- input + residual) and wants
        # a contiguous residual; the contract leaves inputs untouched, so it works on copies.
        normed = x.clone(memory_format=torch.contiguous_format)
        summed = residual.clone(memory_format=torch.contiguous_format)
        ops.fused_add_rms_norm(normed, summed, weight.contiguous(), eps)
        return normed, summed

    rms_norm.__qualname__ = f"rms_norm[{provider}]"
    return rms_norm, supports


# --------------------------------------------------------------------------------------------
# rms_norm on Hygon through lightop


LIGHTOP_MIN_WIDTH = 64  # vllm_hcu: _LIGHTOP_RMSNORM_MIN_COLS, "narrower than one wave" is rejected


def lightop_rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if not importable("lightop.norm"):
        return "lightop is not importable"
    ok = _rms_norm_shape_ok(x, weight, residual)
    if ok is not True:
        return ok
    if x.shape[-1] < LIGHTOP_MIN_WIDTH:
        return f"lightop's RMSNorm rejects widths under {LIGHTOP_MIN_WIDTH} (one wave), got {x.shape[-1]}"
    return True


def lightop_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    from lightop import norm

    if residual is None:
        return norm.rmsnorm_forward_autograd(x.contiguous(), weight.contiguous(), eps, False)  # (x, w, eps, training)
    # In place, as vllm_hcu calls it (x <- normed, residual <- x + residual): work on copies.
    normed = x.clone(memory_format=torch.contiguous_format)
    summed = residual.clone(memory_format=torch.contiguous_format)
    norm.fused_add_rms_norm(normed, summed, weight.contiguous(), eps)
    return normed, summed


# --------------------------------------------------------------------------------------------
# sparse_mla_attention through FlashMLA


@functools.lru_cache(maxsize=8)  # per function object: supports() asks on every call
def flash_mla_natural_lse(fn: Any) -> bool:
    """Whether this ``flash_mla_sparse_fwd`` returns a natural-log lse. FlashMLA 082094b
    (2026-01-16) switched sparse prefill from base 2 to natural log and added ``topk_length`` in the
    same change, without bumping ``__version__``; MetaX's mcFlashMLA documents base 2 and has no
    ``topk_length``. The signature is the one reliable tell."""
    try:
        return "topk_length" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a compiled function without a signature: the older API
        return False


def flash_mla_padded_heads(H: int, natural_lse: bool, device: torch.device) -> int | None:
    """Heads after zero-padding for the sparse prefill kernel, or None if it cannot take H.
    Current API: exactly 64 or 128 (``csrc/api/sparse_fwd.h``: "Unsupported h_q"). Older API and
    MACA: a multiple of the kernel's head block (64; 128 on SM100+ for the older NVIDIA build)."""
    if natural_lse:
        return 64 if H <= 64 else 128 if H <= 128 else None
    block = 128 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10 else 64
    return -(-H // block) * block


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
    q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float, v_dim: int,
    *, meta: Any = None,
) -> bool | str:
    if (ok := meta_supported(meta, q)) is not True:
        return ok
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
    from flash_mla import flash_mla_sparse_fwd

    if flash_mla_padded_heads(q.shape[1], flash_mla_natural_lse(flash_mla_sparse_fwd), q.device) is None:
        return f"FlashMLA sparse prefill takes exactly 64 or 128 query heads; {q.shape[1]} cannot be padded to them"
    return True


def flash_mla_sparse_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int, *,
    meta: AttentionMetadata | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_mla import flash_mla_sparse_fwd

    T, H, Dk = q.shape
    slots = to_global_slots(indices, block_table, cu_seqlens_q, seq_lens, kv_cache.shape[1])
    # Pad topk to whole kernel blocks (the kernel ignores a partial last block of 64; extra entries
    # invalid) and heads to what the kernel takes (zero queries).
    topk_pad = -slots.shape[1] % 128
    if topk_pad:
        slots = torch.nn.functional.pad(slots, (0, topk_pad), value=-1)
    natural = flash_mla_natural_lse(flash_mla_sparse_fwd)
    heads = flash_mla_padded_heads(H, natural, q.device)
    q_in = q if heads == H else torch.nn.functional.pad(q, (0, 0, 0, heads - H))
    out, _max_logits, lse = flash_mla_sparse_fwd(
        q_in.contiguous(), kv_cache.view(-1, 1, Dk), slots.unsqueeze(1).contiguous(), scale, d_v=v_dim
    )
    out, lse = out[:, :H].to(q.dtype), lse[:, :H].float()
    if not natural:
        lse = lse * math.log(2.0)  # base-2 lse -> natural
    empty = ~(indices >= 0).any(dim=1)  # our contract: no valid index -> out 0, lse -inf (FlashMLA: +inf)
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


# --------------------------------------------------------------------------------------------
# lightning_indexer scoring through DeepGEMM (FP8, opt-in)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_indexer_enabled() -> bool:
    return os.environ.get("HWLAYER_FP8_INDEXER", "").strip() not in ("", "0")


def _bf16_logits() -> Any:
    """MACA deep_gemm's lossless ``bf16_mqa_logits``, or None (NVIDIA DeepGEMM has no bf16 entry)."""
    return getattr(sys.modules.get("deep_gemm"), "bf16_mqa_logits", None)


def deep_gemm_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    if not _cuda_tensors(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens):
        return "needs CUDA tensors"
    if q.dim() != 3 or q.shape[-1] != 128 or q.shape[1] not in (32, 64):
        return "DeepGEMM mqa logits takes 32 or 64 heads of dim 128"
    if k_cache.dim() != 3 or k_cache.shape[-1] != 128 or weights.shape != q.shape[:2]:
        return "k_cache/weights outside the contract"
    if not importable("deep_gemm"):
        return "deep_gemm is not importable"
    if not _use_bf16_logits(q, k_cache) and not fp8_indexer_enabled():
        return "FP8 scoring can change the top-k; opt in with HWLAYER_FP8_INDEXER=1"
    return True


def _use_bf16_logits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """bf16 scoring is lossless only for bf16 inputs; fp16/fp32 inputs would be rounded."""
    return _bf16_logits() is not None and q.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3 quantisation over the last dim: (values, fp32 scale with the row shape)."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def deep_gemm_lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    import deep_gemm

    T = q.shape[0]
    bs = k_cache.shape[1]
    lens = seq_lens.long()
    # Gather every sequence's keys into one contiguous [sum(L), D] buffer (DeepGEMM is not paged here).
    seq_of_key = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens)
    key_start = lens.cumsum(0) - lens
    key_pos = torch.arange(int(lens.sum()), device=q.device) - key_start[seq_of_key]
    keys = k_cache.reshape(-1, k_cache.shape[-1])[positions_to_slots(block_table, seq_of_key, key_pos, bs)]
    seq_idx, pos = token_positions(cu_seqlens_q, seq_lens)
    ks = key_start[seq_idx].to(torch.int32)
    ke = (key_start[seq_idx] + pos + 1).to(torch.int32)  # causal: positions 0 .. pos(t)
    if _use_bf16_logits(q, k_cache):  # MACA: bf16 q [M, H, D], bf16 keys [N, D], fp32 weights (vLLM-metax)
        w = (weights.float() * scale).contiguous()  # relu(s x) = s relu(x) for s > 0
        logits = _bf16_logits()(q.contiguous(), keys.contiguous(), w, ks, ke)
    else:
        k_fp8, k_scale = _fp8_rows(keys)
        q_fp8, q_scale = _fp8_rows(q)  # per (token, head)
        # relu is positively homogeneous: relu(s * x) = s * relu(x), so q's scale and our ``scale``
        # fold into the head weights.
        w = (weights.float() * q_scale * scale).contiguous()
        logits = deep_gemm.fp8_mqa_logits(q_fp8.contiguous(), (k_fp8.contiguous(), k_scale.contiguous()), w, ks, ke,
                                          clean_logits=True)
    # Keys outside a token's [ks, ke) are not its candidates whatever the kernel left there.
    cols = torch.arange(logits.shape[1], device=q.device)
    outside = (cols[None, :] < ks.long()[:, None]) | (cols[None, :] >= ke.long()[:, None])
    logits = logits.masked_fill(outside, float("-inf"))
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    k = min(topk, logits.shape[1])
    if T and k:
        vals, idx = logits.topk(k, dim=-1)
        positions = idx - ks.long().unsqueeze(1)
        out[:, :k] = torch.where(torch.isfinite(vals), positions, -1).to(torch.int32)
    return out
