"""hwlayer ops on Moore Threads' mate library: argument conversion, the mate call, conversion back.

Written against MooreThreads/mate 3f58cc3 (2026-05-26): ``mate/flashmla.py``, ``mate/deep_gemm.py``,
``mate/gemm.py``, ``mate/moe_fused_gate.py`` with ``csrc/moe_fused_gate.mu`` and
``tests/test_fused_moe_gate.py``; NOT run on hardware. CI runs these adapters against CPU emulators
of those APIs (hwlayer's ``conformance/emulators/mate.py``, ``pytest conformance --backend musa
--emulated``). Every adapter is behind a ``supports_*`` guard; declined calls run hwlayer's generic
torch implementation.
"""

from __future__ import annotations

import inspect
import os
from functools import cache
from types import ModuleType
from typing import Any

import torch

from hwlayer import plugin
from hwlayer.ops.cache import Fp8IndexerLayout, Fp8PagedKV, PagedIndexerTables, PagedKV, tables_for_call
from hwlayer.ops.layout import AttentionMetadata, groups_covering_rows

from . import convert

LN2 = 0.6931471805599453


_import = plugin.lazy_import  # (module, "") or (None, one-line reason)


def _module(name: str) -> ModuleType:
    mod, why = _import(name)
    if mod is None:
        raise RuntimeError(why)
    return mod


def device_type() -> str:
    """``musa``, or ``cpu`` under hwlayer's test-only emulation of this backend."""
    return plugin.device_type("musa", "musa")


def _canonical(cache: PagedKV | torch.Tensor) -> torch.Tensor | None:
    """The canonical ``[blocks, bs, D]`` tensor of a cache argument (hook specs 2.0), or None."""
    return cache.canonical if isinstance(cache, PagedKV) else cache


def _common(x: torch.Tensor, module: str, dtypes: tuple[torch.dtype, ...]) -> bool | str:
    _, why = _import(module)
    if why:
        return why
    if x.device.type != device_type():
        return f"tensor on {x.device.type}, mate needs musa tensors"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} not supported by this mate kernel"
    return True


# ---- sparse_mla_attention: mate.flashmla.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512,
#      attn_sink=None, topk_length=None) -> (out, max_logits, lse); FlashMLA's current API


@cache  # per function object
def _natural_lse(fn) -> bool:
    """FlashMLA's API with ``topk_length`` (which mate mirrors) returns a natural-log lse; the
    older one without it returned base 2 (deepseek-ai/FlashMLA 082094b, 2026-01-16)."""
    try:
        return "topk_length" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def supports_sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim, *,
                                   meta=None, return_lse=False):
    ok = _common(q, "mate.flashmla", (torch.bfloat16,))
    if ok is not True:
        return ok
    if q.shape[-1] != 576 or v_dim != 512:
        return f"head dims {q.shape[-1]}/{v_dim}: the sparse kernel is built for 576/512 (DeepSeek MLA)"
    if q.shape[1] > 128:
        return f"{q.shape[1]} query heads: the sparse kernel takes 64 or 128 (fewer are zero-padded)"
    kv = _canonical(kv_cache)
    if kv is None or kv.dtype != torch.bfloat16 or not kv.is_contiguous():
        return "kv_cache must be a contiguous bf16 latent cache (read as one flat [slots, 1, 576] tensor)"
    return True


def sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim, *, meta=None,
                         return_lse=False):
    T, H = q.shape[0], q.shape[1]
    kv_cache = _canonical(kv_cache)
    if T == 0 or indices.shape[1] == 0:  # FlashMLA's API asserts topk > 0: no index, nothing to attend
        out = q.new_zeros(T, H, v_dim)
        return (out, torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)) if return_lse else out
    kv_indices = convert.sparse_kv_indices(indices, block_table, cu_seqlens_q, seq_lens, kv_cache.shape[1], meta)
    # Whole top-k blocks (FLASH_MLA_TOPK_BLOCK) and 64 or 128 heads (zero queries).
    kv_indices = convert.pad_last_dim(kv_indices, convert.FLASH_MLA_TOPK_BLOCK, value=-1)
    heads = 64 if H <= 64 else 128
    q_in = torch.nn.functional.pad(q, (0, 0, 0, heads - H)) if heads != H else q
    sparse_fwd = _module("mate.flashmla").flash_mla_sparse_fwd
    out, _max_logits, lse = sparse_fwd(q_in.contiguous(), convert.flat_kv(kv_cache), kv_indices, scale, d_v=v_dim)
    lse = lse[:, :H].float() * (1.0 if _natural_lse(sparse_fwd) else LN2)
    out, lse = convert.empty_rows_to_contract(out[:, :H].to(q.dtype), lse, kv_indices)
    return (out, lse) if return_lse else out


# ---- lightning_indexer: mate.deep_gemm.fp8_paged_mqa_logits(q, fused_kv_cache, weights, context_lens,
#      block_table, schedule_meta, max_context_len, clean_logits) over the FP8 paged indexer cache, with
#      get_paged_mqa_logits_metadata(context_lens, block_kv, num_mps=0) once per step; mate has no bf16 entry


def _fp8_indexer_enabled() -> bool:
    return os.environ.get("HWLAYER_MUSA_FP8_INDEXER", "") not in ("", "0")


# mate's MQA-logits kernels (MooreThreads/mate 3f58cc3 ``csrc/deepgemm_attention.mu``) take 32 or 64 heads
# of dim 32, 64 or 128; anything else raises inside the call. The paged kernel takes blocks of 64 tokens
# (``get_paged_mqa_logits_metadata``: "block_kv ... must be 64 now").
MQA_LOGITS_HEADS = (32, 64)
MQA_LOGITS_HEAD_DIMS = (32, 64, 128)
PAGED_BLOCK_KV = 64


def _paged_logits_available() -> bool:
    mod, _ = _import("mate.deep_gemm")
    return mod is not None and hasattr(mod, "fp8_paged_mqa_logits") and hasattr(mod, "get_paged_mqa_logits_metadata")


def paged_indexer_tables(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                         num_tokens: int, block_size: int, max_context_len: int,
                         meta: AttentionMetadata | None = None) -> PagedIndexerTables:
    context, table = convert.paged_token_rows(block_table, cu_seqlens_q, seq_lens, num_tokens, meta)
    schedule = None
    if block_size == PAGED_BLOCK_KV:
        schedule = _module("mate.deep_gemm").get_paged_mqa_logits_metadata(context, block_size)
    return PagedIndexerTables(context, table, schedule, max_context_len, block_size)


class MusaLayout(Fp8IndexerLayout):
    """Canonical caches, except that with ``HWLAYER_MUSA_FP8_INDEXER=1`` and a mate that has
    ``fp8_paged_mqa_logits`` the DSA indexer key cache is FP8 with per-row scales in DeepGEMM's fused
    paged layout (:class:`hwlayer.ops.cache.Fp8PagedKV`; mate's ``fused_kv_cache`` is ``(num_blocks,
    block_size, 1, index_dim + 4)``, as its tests/test_deep_gemm.py ``kv_cache_cast_to_fp8`` builds it),
    quantized once when written and read in place; the kernel's tables are built once per step."""

    default_block_size = PAGED_BLOCK_KV
    fp8_name = "mate-fp8-indexer"

    @property
    def fp8_indexer(self) -> bool:
        return _fp8_indexer_enabled() and _paged_logits_available()

    def paged_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor) -> PagedIndexerTables | None:
        return paged_indexer_tables(cu_seqlens_q, seq_lens, block_table, meta.num_tokens, meta.block_size,
                                    meta.max_seqlen_k, meta)


LAYOUT = MusaLayout()


def supports_lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                               max_seqlen_q=None, max_seqlen_k=None, *, meta=None):
    ok = _common(q, "mate.deep_gemm", (torch.bfloat16, torch.float16, torch.float32))
    if ok is not True:
        return ok
    if q.shape[1] not in MQA_LOGITS_HEADS or q.shape[2] not in MQA_LOGITS_HEAD_DIMS:
        return (f"indexer q {tuple(q.shape)}: mate's fp8 mqa logits take {MQA_LOGITS_HEADS} heads of dim "
                f"{MQA_LOGITS_HEAD_DIMS}")
    if scale <= 0:
        return "scale must be positive (it is folded into the head weights)"
    if not _fp8_indexer_enabled():
        return ("mate scores the indexer in FP8 only (lossy: the top-k may change); "
                "enable with HWLAYER_MUSA_FP8_INDEXER=1")
    if not isinstance(k_cache, Fp8PagedKV):
        # scoring a bf16 cache would gather and re-quantize every key per call
        return ("mate scores the FP8 paged indexer cache (the musa layout allocates it under "
                "HWLAYER_MUSA_FP8_INDEXER=1 when mate has fp8_paged_mqa_logits); this cache holds "
                f"{k_cache.dtype} rows")
    if not _paged_logits_available():
        return "this mate has no deep_gemm.fp8_paged_mqa_logits"
    if k_cache.block_size != PAGED_BLOCK_KV:
        return f"mate's paged MQA logits take blocks of {PAGED_BLOCK_KV} tokens, got {k_cache.block_size}"
    return True


def lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                      max_seqlen_q=None, max_seqlen_k=None, *, meta=None):
    T, bs = q.shape[0], k_cache.block_size
    tables = tables_for_call(meta, bs, max_seqlen_k, seq_lens, lambda L, m: paged_indexer_tables(
        cu_seqlens_q, seq_lens, block_table, T, bs, L, m))
    if T == 0 or tables.max_context_len == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    # The keys are read in place (quantized when written); only q is quantized here, per (token, head)
    # row so nothing saturates e4m3; relu is positively homogeneous (relu(s x) = s relu(x), s > 0), so
    # q's scale and ours fold into the weights.
    q_fp8, q_scale = convert.fp8_quantize_rows(q.reshape(-1, q.shape[-1]))
    head_weights = (weights.float() * q_scale.view(q.shape[:2]) * scale).contiguous()
    logits = _module("mate.deep_gemm").fp8_paged_mqa_logits(
        q_fp8.view(T, 1, *q.shape[1:]).contiguous(), k_cache.fused(), head_weights, tables.context_lens,
        tables.block_table, tables.schedule, tables.max_context_len, False)  # we mask past each context below
    ke = tables.context_lens.view(T)
    return convert.topk_positions_from_logits(logits, torch.zeros_like(ke), ke, topk)


# ---- grouped_gemm: mate.deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices, alignment_m=128)
#      (-> mate.gemm.ragged_m_moe_gemm_16bit(a, b, m_indices, d, alignment_m=...))


def supports_grouped_gemm(x, w, group_sizes):
    ok = _common(x, "mate.deep_gemm", (torch.bfloat16,))
    if ok is not True:
        return ok
    if w.dtype != torch.bfloat16 or not w.is_contiguous():
        return "w must be a contiguous bf16 [E, N, K] tensor"
    if not hasattr(_module("mate.deep_gemm"), "m_grouped_bf16_gemm_nt_contiguous"):
        return "this mate has no deep_gemm.m_grouped_bf16_gemm_nt_contiguous"
    return True


def grouped_gemm(x, w, group_sizes):
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    dg = _module("mate.deep_gemm")
    alignment_fn = getattr(dg, "get_mk_alignment_for_contiguous_layout", None)  # only mate's DeepGEMM wrapper has it
    alignment = int(alignment_fn()) if alignment_fn is not None else convert.DEFAULT_GROUP_ALIGNMENT
    # grouped_gemm's padding rows (past sum(group_sizes)) join the last group: every row is laid out.
    # The layout's row count is a host bound (no count read back); unused rows carry group id -1.
    sizes = groups_covering_rows(group_sizes.to(x.device), x.shape[0])
    source_rows, m_indices = convert.contiguous_layout(sizes, alignment, x.shape[0])
    a = convert.pad_rows(x.contiguous(), source_rows)
    d = torch.empty(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    dg.m_grouped_bf16_gemm_nt_contiguous(a, w, d, m_indices, alignment_m=alignment)
    return convert.unpad_rows(d, convert.padded_positions(sizes, alignment, x.shape[0]))


# ---- moe_route: mate.moe_fused_gate(input, bias, num_expert_group, topk_group, topk,
#      num_fused_shared_experts, routed_scaling_factor, renormalize, apply_routed_scaling_factor_on_output)


def supports_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize,
                       routed_scaling_factor):
    ok = _common(router_logits, "mate", (torch.float32, torch.bfloat16, torch.float16))
    if ok is not True:
        return ok
    if not hasattr(_module("mate"), "moe_fused_gate"):
        return "this mate has no moe_fused_gate"
    E = router_logits.shape[1]
    if E % 32:
        return f"{E} experts: moe_fused_gate needs a multiple of 32 (num_experts % WARP_SIZE == 0)"
    if routed_scaling_factor == 0:
        return "moe_fused_gate requires a non-zero routed_scaling_factor"
    return True


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    logits = router_logits.float().contiguous()
    # bias is a required tensor of the input's dtype; no correction bias is a zero bias.
    bias = correction_bias.float().contiguous() if correction_bias is not None else torch.zeros_like(logits[0])
    weights, ids = _module("mate").moe_fused_gate(
        logits, bias, n_group, topk_group, top_k,
        num_fused_shared_experts=0, routed_scaling_factor=routed_scaling_factor, renormalize=renormalize,
        apply_routed_scaling_factor_on_output=True,
    )
    return weights.float(), ids.to(torch.int32)
