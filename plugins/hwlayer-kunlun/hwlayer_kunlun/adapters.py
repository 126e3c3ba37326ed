"""hwlayer ops on Kunlunxin's ``kunlun_ops``: argument conversion, the kunlun_ops call, conversion back.

Written against baidu/vLLM-Kunlun 09869ee (``vllm_kunlun/ops/_custom_ops.py``: the keyword calls into
``kunlun_ops`` it wraps as ``torch.ops._C`` ops; ``ops/attention/flashmla.py``, ``ops/deep_gemm.py``,
``ops/_kunlun_ops.py``, ``models/deepseek_v2.py``: how it calls them for DeepSeek-V3.2); emulated in CI
(hwlayer's ``conformance/emulators/kunlun_ops.py``, ``pytest conformance --backend kunlunxin
--emulated``); NOT run on Kunlunxin hardware. Every adapter is behind a ``supports_*`` guard stating the
kernel's limits; declined calls run hwlayer's generic torch implementation. kunlun_ops writes into
output tensors the caller allocates (all sized from host ints here).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops import positions_to_slots, token_positions
from hwlayer.ops.cache import AttentionLayout, PagedKV
from hwlayer.ops.layout import groups_covering_rows, meta_supported, sequence_key_slots
from hwlayer.ops.quant import QuantizedWeight, quantize_activation
from hwlayer.plugin import device_type, lazy_import

NAME = "kunlunxin"
LN2 = math.log(2.0)
INT8_INDEXER_ENV = "HWLAYER_KUNLUN_INT8_INDEXER"


def _ops() -> Any:
    mod, why = lazy_import("kunlun_ops")
    if mod is None:
        raise RuntimeError(why)
    return mod


def _common(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool | str:
    _, why = lazy_import("kunlun_ops")
    if why:
        return why
    if x.device.type != device_type(NAME, "cuda"):  # the XPU is torch device "cuda" (vLLM-Kunlun platforms/kunlun.py)
        return f"tensor on {x.device.type}, kunlun_ops needs XPU tensors"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} not supported by this kunlun_ops kernel"
    return True


# ---- step tables: the host copies of the lengths the kernels take (``*_cpu`` arguments)


@dataclass
class KunlunStepTables:
    """``qlod`` = ``cu_seqlens_q`` and ``kv_lens`` = ``seq_lens`` as int32, on the device and on the host.
    vLLM-Kunlun passes the host copies from its scheduler's state (``query_start_loc_cpu``,
    ``seq_lens_cpu``); here they are copied once per step, before any layer (one device-to-host copy
    per step, never per layer; this backend declares no device graph, so nothing replays them)."""

    qlod_xpu: torch.Tensor
    qlod_cpu: torch.Tensor
    kv_lens_xpu: torch.Tensor
    kv_lens_cpu: torch.Tensor


class Int8IndexerKV(PagedKV):
    """The DSA indexer key cache as vLLM-Kunlun stores it (``DeepseekV32IndexerCache`` of ``head_dim + 4``
    uint8 per token, deepseek_v2.py:690-696): per block, ``bs * D`` int8 key values, then ``bs`` fp32
    scales (the split ``int8_paged_mqa_logits`` reads, ops/deep_gemm.py:93-103). Keys are quantised once,
    when written (per row, absmax / 127); the canonical rows it offers are dequantised."""

    def __init__(self, data: torch.Tensor, dim: int, row_dtype: torch.dtype) -> None:
        super().__init__(data.shape[0], data.shape[1] // (dim + 4), dim)
        self.data, self.row_dtype = data, row_dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.row_dtype  # what rows() gives and write() takes

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    def values(self) -> torch.Tensor:
        """int8 ``[num_blocks, bs, D]`` (a view)."""
        nb, bs, D = self.num_blocks, self.block_size, self.width
        return self.data[:, : bs * D].view(torch.int8).view(nb, bs, D)

    def scales(self) -> torch.Tensor:
        """fp32 ``[num_blocks, bs]`` (a view)."""
        return self.data[:, self.block_size * self.width:].view(torch.float32)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 rows ``[n, D]`` and fp32 scales ``[n]`` at flat ``slots`` (no dequantisation)."""
        b, o = slots.reshape(-1).long().div(self.block_size, rounding_mode="floor"), slots.reshape(-1) % self.block_size
        return self.values()[b, o], self.scales()[b, o]

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        q, s = self.gather(slots)
        return (q.float() * s[:, None]).to(self.row_dtype).view(*slots.shape, self.width)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        q, s = _int8_rows(rows)
        b, o = slots.long().div(self.block_size, rounding_mode="floor"), slots.long() % self.block_size
        self.values()[b, o] = q
        self.scales()[b, o] = s


def _int8_indexer_enabled() -> bool:
    return os.environ.get(INT8_INDEXER_ENV, "") not in ("", "0")


class KunlunLayout(AttentionLayout):
    """The canonical latent cache (``[blocks, bs, 576]``, which both sparse kernels read flattened to
    ``[slots, 576]``: flashmla_sparse.py:636-639); with the int8 indexer opted in
    (``HWLAYER_KUNLUN_INT8_INDEXER=1`` when the caches are allocated), vLLM-Kunlun's int8 indexer cache
    (:class:`Int8IndexerKV`); and the host length tables."""

    name = "kunlun"

    @property
    def canonical(self) -> bool:  # every cache has a canonical tensor, except the int8 indexer cache
        return not _int8_indexer_enabled()

    def indexer_cache(self, num_blocks: int, block_size: int, index_dim: int, dtype: torch.dtype,
                      device: torch.device) -> PagedKV:
        if not _int8_indexer_enabled():
            return super().indexer_cache(num_blocks, block_size, index_dim, dtype, device)
        data = torch.zeros(num_blocks, block_size * (index_dim + 4), dtype=torch.uint8, device=device)
        return Int8IndexerKV(data, index_dim, dtype)

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> KunlunStepTables:
        q, k = cu_seqlens_q.to(torch.int32), seq_lens.to(torch.int32)
        return KunlunStepTables(q, q.to("cpu"), k, k.to("cpu"))


LAYOUT = KunlunLayout()


def _tables(meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor) -> KunlunStepTables:
    if meta is not None and isinstance(meta.backend, KunlunStepTables):
        return meta.backend
    return LAYOUT.step_tables(meta, cu_seqlens_q, seq_lens, block_table)


def global_kv_indices(indices: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, block_size: int, meta: Any = None) -> torch.Tensor:
    """hwlayer ``indices`` (int32 ``[T, K]`` positions in each token's sequence, -1 unused) -> rows of the
    flattened cache (``block * bs + offset``), -1 kept: what xspeedgate_ops.convert_req_index_to_global_index
    gives vLLM-Kunlun (flashmla_sparse.py:690-698). Device arithmetic only."""
    if meta is not None and meta.block_size == block_size:
        slots = meta.key_slots.index_select(0, meta.seq_idx).gather(1, indices.long().clamp(min=0))
    else:
        seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, indices.shape[0])
        slots = positions_to_slots(block_table, seq_idx, indices, block_size)
    return torch.where(indices >= 0, slots, -1).to(torch.int32).contiguous()


# ---- sparse_mla_attention: kunlun_ops.sparse_prefill_fwd_opt (prefill, base-2 lse) and
#      kunlun_ops.fwd_kvcache_mla (decode: one query token per sequence, no lse)


def supports_sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim, *,
                                  meta=None, return_lse=False):
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    if (ok := _common(q, (torch.bfloat16,))) is not True:
        return ok
    cache = kv_cache.canonical if isinstance(kv_cache, PagedKV) else kv_cache
    if not isinstance(cache, torch.Tensor) or cache.dtype != torch.bfloat16 or not cache.is_contiguous():
        return "the sparse kernels read one contiguous bf16 latent cache (flattened to [slots, 576])"
    if q.shape[-1] != 576 or v_dim != 512:
        return f"head dims {q.shape[-1]}/{v_dim}: the sparse kernels take 576/512 (get_supported_head_sizes)"
    if indices.shape[1] == 0:
        return "the sparse kernels take at least one index per token"
    return True


def sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim, *, meta=None,
                         return_lse=False):
    cache = kv_cache.canonical if isinstance(kv_cache, PagedKV) else kv_cache
    T, H, D = q.shape
    kv = cache.view(-1, D)
    slots = global_kv_indices(indices, block_table, cu_seqlens_q, seq_lens, cache.shape[1], meta)
    tables = _tables(meta, cu_seqlens_q, seq_lens, block_table)
    out = torch.zeros(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = None
    if T == seq_lens.shape[0] and not return_lse:
        # A decode step (one query token per sequence: the runner schedules none without one). The
        # decode kernel returns max_logits / p_sums, not an lse, so return_lse takes the prefill kernel.
        max_seq_kv = meta.max_seqlen_k if meta is not None else block_table.shape[1] * cache.shape[1]
        stats = torch.zeros(T, 1, H, dtype=torch.float32, device=q.device)
        _ops().fwd_kvcache_mla(q_c=q.view(T, 1, H, D), kv_cache=kv, indices=slots.view(T, 1, -1),
                               kv_lod_cpu=tables.kv_lens_cpu, out=out.view(T, 1, H, v_dim), max_logits=stats,
                               p_sums=torch.zeros_like(stats), softmax_scale=scale, max_seq_kv=max(1, max_seq_kv),
                               kv_lod_xpu=tables.kv_lens_xpu)
    else:
        lse2 = torch.zeros(T, H, dtype=torch.float32, device=q.device)
        _ops().sparse_prefill_fwd_opt(q=q.contiguous(), kv=kv, indices=slots.unsqueeze(1), out=out,
                                      max_logits=torch.zeros_like(lse2), lse=lse2, sm_scale=scale,
                                      qlod_cpu=tables.qlod_cpu, qlod_xpu=tables.qlod_xpu, kvlod_cpu=tables.qlod_cpu,
                                      kvlod_xpu=tables.qlod_xpu, d_v=v_dim, is_causal=True)  # as flashmla.py:238-253
        lse = lse2 * LN2  # base 2 -> natural log (vLLM-Kunlun flashmla_sparse.py:57-60)
    # hwlayer's contract for a token with no valid index: out 0, lse -inf (normalised on the device).
    empty = (slots < 0).all(dim=-1)
    out = out.masked_fill(empty[:, None, None], 0)
    if not return_lse:
        return out
    return out, lse.masked_fill(empty[:, None], float("-inf"))


# ---- lightning_indexer: kunlun_ops.I8_mqa_logits (int8 keys and queries; opt-in: it is lossy)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (``quant2d``: scale = absmax / 127, deepseek_v2.py:765-766)."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    return (x.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def supports_lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                               max_seqlen_q=None, max_seqlen_k=None, *, meta=None):
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    if (ok := _common(q, (torch.bfloat16, torch.float16, torch.float32))) is not True:
        return ok
    if isinstance(k_cache, Int8IndexerKV):
        return True if scale > 0 else "scale must be positive (it is folded into the head weights)"
    if not isinstance(k_cache.canonical if isinstance(k_cache, PagedKV) else k_cache, torch.Tensor):
        return "I8_mqa_logits reads keys gathered from one contiguous indexer cache"
    if scale <= 0:
        return "scale must be positive (it is folded into the head weights)"
    if not _int8_indexer_enabled():
        return (f"kunlun_ops scores the indexer in int8 only (lossy: the top-k may change); "
                f"enable with {INT8_INDEXER_ENV}=1")
    return True


def lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                      max_seqlen_q=None, max_seqlen_k=None, *, meta=None):
    int8_cache = k_cache if isinstance(k_cache, Int8IndexerKV) else None
    cache = None if int8_cache is not None else k_cache.canonical if isinstance(k_cache, PagedKV) else k_cache
    T, H, D = q.shape
    B, bs = seq_lens.shape[0], k_cache.block_size if int8_cache is not None else cache.shape[1]
    if int8_cache is not None and T == B and T:  # decode (one query token per sequence): the paged kernel
        return _paged_indexer(q, weights, int8_cache, block_table, cu_seqlens_q, seq_lens, topk, scale, meta)
    # One contiguous key buffer, sequence b's positions at rows b * L + p (host sizes only), as
    # vLLM-Kunlun gathers keys for I8_mqa_logits (cp_gather_indexer_k_quant_cache, deepseek_v2.py:536).
    if meta is not None and meta.block_size == bs and max_seqlen_k in (None, meta.max_seqlen_k):
        L, key_slots, seq_idx = meta.max_seqlen_k, meta.key_slots, meta.seq_idx
        pos = (meta.first_query_pos.index_select(0, seq_idx) + torch.arange(T, device=q.device)
               - cu_seqlens_q.index_select(0, seq_idx))
    else:
        L = int(seq_lens.max()) if max_seqlen_k is None and B else (max_seqlen_k or 0)  # documented convenience
        key_slots = sequence_key_slots(block_table, B, L, bs)
        seq_idx, pos = token_positions(cu_seqlens_q, seq_lens, T)
    N = B * L
    if T == 0 or N == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if int8_cache is not None:  # keys were quantised when written: gathered as stored
        k8, k_scale = int8_cache.gather(key_slots)
    else:  # a bf16 cache: the gathered keys quantised for this call
        k8, k_scale = _int8_rows(cache.reshape(-1, D).index_select(0, key_slots.reshape(-1)))
    q8, q_scale = _int8_rows(q.reshape(-1, D))
    # relu(s x) = s relu(x) for s > 0: the query scales and ours fold into the weights (deepseek_v2.py:769)
    head_weights = (weights.float() * q_scale.view(T, H) * scale).contiguous()
    logits = torch.empty(T, N, dtype=torch.float32, device=q.device)
    # The lods span the whole buffer, from host sizes (vLLM-Kunlun indexer.py:106-111); [ks, ke) masks after.
    q_lod, k_lod = torch.tensor([0, T], dtype=torch.int32), torch.tensor([0, N], dtype=torch.int32)
    _ops().I8_mqa_logits(q=q8.view(T, H, D), fused_kv_cache=[k8, k_scale], weights=head_weights,
                         context_q_lens=[q_lod, q_lod.to(q.device)], context_k_lens=[k_lod, k_lod.to(q.device)],
                         logits=logits, clean_logits=True)
    ks = seq_idx * L
    return _topk_in_range(logits, ks, ks + pos + 1, topk)


def _topk_in_range(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-``topk`` columns of each row within ``[ks, ke)``, as positions ``column - ks`` (int32, -1
    where fewer keys are in range)."""
    N = logits.shape[1]
    cols = torch.arange(N, device=logits.device)
    inside = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
    k = min(topk, N)
    vals, idx = logits.masked_fill(~inside, float("-inf")).topk(k, dim=-1)
    positions = (idx - ks[:, None]).to(torch.int32).masked_fill(vals == float("-inf"), -1)
    return torch.nn.functional.pad(positions, (0, topk - k), value=-1) if k < topk else positions


def _paged_indexer(q, weights, cache: Int8IndexerKV, block_table, cu_seqlens_q, seq_lens, topk, scale, meta):
    """``I8_paged_mqa_logits`` on the int8 cache in place, as vLLM-Kunlun decodes (ops/deep_gemm.py:
    int8_paged_mqa_logits): values as a ``[blocks, bs, 1, D]`` view, the scales gathered by the block table
    to ``[B, max_context_len]``, logits over whole blocks of every sequence."""
    T, H, D = q.shape
    L = block_table.shape[1] * cache.block_size  # a whole number of blocks (deepseek_v2.py:723)
    tables = _tables(meta, cu_seqlens_q, seq_lens, block_table)
    q8, q_scale = _int8_rows(q.reshape(-1, D))
    head_weights = (weights.float() * q_scale.view(T, H) * scale).view(T, 1, H).contiguous()
    k_scale = cache.scales().index_select(0, block_table.reshape(-1).long()).view(T, L)
    logits = torch.empty(T, 1, L, dtype=torch.float32, device=q.device)
    _ops().I8_paged_mqa_logits(q=q8.view(T, 1, H, D), fused_kv_cache=[cache.values().unsqueeze(2), k_scale],
                               weights=head_weights, context_lens=[tables.kv_lens_cpu, tables.kv_lens_xpu],
                               block_table=block_table.to(torch.int32), max_context_len=L, clean_logits=True,
                               out=logits)
    return _topk_in_range(logits.view(T, L), torch.zeros_like(seq_lens), seq_lens, topk)


# ---- moe_route: kunlun_ops.moe_sigmoid_group_topk_norm(x, norm_score, topk_index, block_static, bias,
#      n_group, topk_group, scale) (_kunlun_ops.py:419-429)

STAT_BLOCKS = 12  # block_statistic rows vLLM-Kunlun allocates (_kunlun_ops.py:413-419)


def supports_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize,
                       routed_scaling_factor):
    if (ok := _common(router_logits, (torch.float32, torch.bfloat16, torch.float16))) is not True:
        return ok
    if not renormalize:
        return "moe_sigmoid_group_topk_norm always normalizes the top-k weights"
    E = router_logits.shape[1]
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or top_k > topk_group * (E // n_group):
        return "group arguments outside moe_sigmoid_group_topk_norm's range"
    return True


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    M, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(M, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=dev)
    bias = correction_bias.float().contiguous() if correction_bias is not None else torch.zeros(E, device=dev)
    # scale=1.0 as vLLM-Kunlun calls it; the routed scaling factor is applied here, outside the kernel.
    _ops().moe_sigmoid_group_topk_norm(x=router_logits.float().contiguous(), norm_score=weights, topk_index=ids,
                                       block_static=torch.zeros(STAT_BLOCKS, E, dtype=torch.int32, device=dev),
                                       bias=bias, n_group=n_group, topk_group=topk_group, scale=1.0)
    return weights * routed_scaling_factor, ids


# ---- grouped_gemm: kunlun_ops.moe_fc(x, weight, sorted_tokens_num_lod, sorted_tokens_idx, moe_topk, y)
#      on rows already sorted by expert (what moe_pre_sorted produces; _kunlun_ops.py:595-645)


def supports_grouped_gemm(x, w, group_sizes):
    if (ok := _common(x, (torch.bfloat16, torch.float16))) is not True:
        return ok
    if w.dtype != x.dtype or not w.is_contiguous():
        return "moe_fc takes a contiguous [E, N, K] weight of x's dtype"
    return True


def grouped_gemm(x, w, group_sizes):
    M = x.shape[0]
    # grouped_gemm's padding rows (past sum(group_sizes)) join the last group: every row is laid out.
    sizes = groups_covering_rows(group_sizes.to(x.device), M).to(torch.int32)
    lod = torch.nn.functional.pad(torch.cumsum(sizes, 0, dtype=torch.int32), (1, 0))
    y = torch.empty(M, 1, w.shape[1], dtype=x.dtype, device=x.device)
    if M:
        _ops().moe_fc(x=x.contiguous(), weight=w, sorted_tokens_num_lod=lod,
                      sorted_tokens_idx=torch.arange(M, dtype=torch.int32, device=x.device), moe_topk=1, y=y)
    return y.view(M, w.shape[1])


# ---- rms_norm: kunlun_ops.rmsnorm(x, weight, output, eps) / add_rmsnorm(x, y, residual_output=, weight=,
#      eps=, output=) as vLLM-Kunlun's RMSNorm calls them (ops/layernorm.py:85-104, _custom_ops.py:255-340)


def supports_rms_norm(x, weight, eps, residual=None):
    if (ok := _common(x, (torch.bfloat16, torch.float16, torch.float32))) is not True:
        return ok
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        return "Kunlun does not support non-contiguous input (vLLM-Kunlun layernorm.py:77 copies it first)"
    return True


def rms_norm(x, weight, eps, residual=None):
    out = torch.empty_like(x)
    if residual is None:
        _ops().rmsnorm(x, weight, out, eps)
        return out
    summed = torch.empty_like(x)  # the inputs are not modified (vLLM-Kunlun writes in place; the contract does not)
    _ops().add_rmsnorm(x, residual, residual_output=summed, weight=weight, eps=eps, output=out)
    return out, summed


# ---- rope: kunlun_ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox), in place


def supports_rope(x, positions, cos_sin_cache, interleaved, *, meta=None):
    if (ok := meta_supported(meta, x)) is not True:
        return ok
    return _common(x, (torch.bfloat16, torch.float16, torch.float32))


def rope(x, positions, cos_sin_cache, interleaved, *, meta=None):
    # An fp32 copy (also keeps the in-place kernel off the caller's tensor): the kernel wants the cache in
    # the query's dtype, and a bf16 cache would move the result beyond the contract's fp32 tables.
    D = x.shape[-1]
    query = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    # The kernel rotates a query and a key together; hwlayer rotates one tensor per call, so the key is
    # a one-head scratch row per token (host-sized).
    key = torch.zeros(x.shape[0], D, dtype=torch.float32, device=x.device)
    _ops().rotary_embedding(positions=positions, query=query, key=key, head_size=D,
                            cos_sin_cache=cos_sin_cache.float().contiguous(), is_neox=not interleaved)
    return query.to(x.dtype)


# ---- kv_cache_write (the MLA latent cache): kunlun_ops.concat_and_cache_mla(kv_c, k_pe, slot_mapping, kv_cache)

LATENT_DIM, ROPE_DIM = 512, 64  # DeepSeek-V3.2 / GLM-5 MLA (kv_lora_rank, qk_rope_head_dim)


def supports_kv_cache_write(cache, rows, slot_mapping, *, meta=None):
    if (ok := _common(rows, (torch.bfloat16, torch.float16))) is not True:
        return ok
    canonical = cache.canonical if isinstance(cache, PagedKV) else cache
    if not isinstance(canonical, torch.Tensor) or canonical.shape[-1] != LATENT_DIM + ROPE_DIM:
        return "concat_and_cache_mla writes the MLA latent cache (512 + 64); the indexer cache goes generic"
    if canonical.dtype != rows.dtype:
        return "concat_and_cache_mla takes rows of the cache's dtype (bf16 cache; no fp8_ds_mla here)"
    return True


def kv_cache_write(cache, rows, slot_mapping, *, meta=None):
    canonical = cache.canonical if isinstance(cache, PagedKV) else cache
    _ops().concat_and_cache_mla(kv_c=rows[:, :LATENT_DIM].contiguous(), k_pe=rows[:, LATENT_DIM:].contiguous(),
                                slot_mapping=slot_mapping,
                                kv_cache=canonical)


# ---- int8 experts: quant_grouped_gemm through kunlun_ops.moe_fc's W8A8 path (int8 x with its per-row max,
#      int8 weight with its per-channel max: compressed_tensors_moe.py:113-120,224-270); prepare_weight keeps
#      the weight maxima ready once at load


def prepare_weight(name, weight):
    if isinstance(weight, QuantizedWeight) and weight.format == "int8" and weight.data.dim() == 3 \
            and weight.act_scale_fmt is None:
        # kunlun_ops takes the max as the scale: the checkpoint's per-channel scales times 127, once.
        w_max = (weight.scale.float() * 127.0).reshape(*weight.scale.shape[:2], 1).contiguous()
        return dataclasses.replace(weight, prepared={**(weight.prepared or {}), "kunlun_w_max": w_max})
    return weight


def supports_quant_grouped_gemm(x, qweight, group_sizes):
    if (ok := _common(x, (torch.bfloat16, torch.float16))) is not True:
        return ok
    if qweight.format != "int8" or qweight.act_scale_fmt is not None:
        return f"moe_fc's int8 path takes the int8 format with plain per-token scales, not {qweight.format}"
    if not qweight.data.is_contiguous():
        return "moe_fc takes a contiguous [E, N, K] int8 weight"
    return True


def quant_grouped_gemm(x, qweight, group_sizes):
    M = x.shape[0]
    w_max = (qweight.prepared or {}).get("kunlun_w_max")
    if w_max is None:  # not prepared by this backend's prepare_weight (a call outside a loaded model)
        w_max = (qweight.scale.float() * 127.0).reshape(*qweight.scale.shape[:2], 1)
    # The contract's per-token int8 rounding (round half even, clamp +-127), as quant2d quantises for moe_fc.
    x_q, x_scale = quantize_activation(x, "int8")
    sizes = groups_covering_rows(group_sizes.to(x.device), M).to(torch.int32)
    lod = torch.nn.functional.pad(torch.cumsum(sizes, 0, dtype=torch.int32), (1, 0))
    y = torch.empty(M, 1, qweight.shape[1], dtype=x.dtype, device=x.device)
    if M:
        _ops().moe_fc(x=x_q, weight=qweight.data, sorted_tokens_num_lod=lod,
                      sorted_tokens_idx=torch.arange(M, dtype=torch.int32, device=x.device), moe_topk=1, y=y,
                      x_perchannel_max=(x_scale * 127.0).unsqueeze(1).contiguous(), w_perchannel_max=w_max)
    return y.view(M, qweight.shape[1])
