"""Contract validation the dispatcher runs once per call before a backend's implementation (hook
specs 2.0), so a ``supports`` predicate states only its kernel's limits, never "outside the contract".

One function per op, with the op's signature: it raises the op's one-line ``ValueError`` for a call
the contract excludes (shapes, dtypes, ranks, the ``meta`` tables' batch) and never reads a tensor's
values (those checks stay in the generic ops under ``HWLAYER_CHECK=1``). The generic ops validate
themselves as well (they are also called directly), so the plan runs these only in front of native
or inherited implementations. Ops without an entry here (expert parallelism, quantized GEMMs) are
validated by their own implementations.
"""

from __future__ import annotations

from typing import Any, Callable

from .cache import PagedKV
from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_meta, check_tensor, fail


def _varlen(op: str, cu_seqlens_q: Any, seq_lens: Any) -> None:
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=[cu_seqlens_q.shape[0] - 1])


def _cache(op: str, arg: str, cache: Any, width: int) -> None:
    if isinstance(cache, PagedKV):
        if cache.width != width:
            fail(op, arg, f"rows of width {width}", f"width {cache.width}")
    else:
        check_tensor(op, arg, cache, ndim=3, shape=[None, None, width])


def _meta(op: str, meta: Any, rows: int) -> None:
    if meta is not None:
        check_meta(op, meta, rows)


def rms_norm(x: Any, weight: Any, eps: float, residual: Any = None) -> None:
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("rms_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if residual is not None:
        check_tensor("rms_norm", "residual", residual, dtypes=(x.dtype,), shape=list(x.shape))


def layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> None:
    check_tensor("layer_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("layer_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if bias is not None:
        check_tensor("layer_norm", "bias", bias, ndim=1, shape=[x.shape[-1]])


def rope(x: Any, positions: Any, cos_sin_cache: Any, interleaved: bool, *, meta: Any = None) -> None:
    check_tensor("rope", "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("rope", "positions", positions, ndim=1, dtypes=INDEX_DTYPES, shape=[x.shape[0]])
    check_tensor("rope", "cos_sin_cache", cos_sin_cache, ndim=2, shape=[None, x.shape[-1]])
    if x.shape[-1] % 2:
        fail("rope", "x", "an even last dim", x.shape[-1])
    _meta("rope", meta, x.shape[0])


def kv_cache_write(cache: Any, rows: Any, slot_mapping: Any, *, meta: Any = None) -> None:
    op = "kv_cache_write"
    if not isinstance(cache, PagedKV):
        check_tensor(op, "cache", cache, ndim=3)
    width = cache.width if isinstance(cache, PagedKV) else cache.shape[-1]
    check_tensor(op, "rows", rows, ndim=2, shape=[None, width])
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, shape=[rows.shape[0]])
    _meta(op, meta, rows.shape[0])


def lightning_indexer(q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any,
                      topk: int, scale: float, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *,
                      meta: Any = None) -> None:
    op = "lightning_indexer"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, Hi, Di = q.shape
    check_tensor(op, "weights", weights, ndim=2, shape=[T, Hi])
    _cache(op, "k_cache", k_cache, Di)
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    _varlen(op, cu_seqlens_q, seq_lens)
    if topk < 1:
        fail(op, "topk", ">= 1", topk)
    _meta(op, meta, T)


def sparse_mla_attention(q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any,
                         scale: float, v_dim: int, *, meta: Any = None, return_lse: bool = False) -> None:
    op = "sparse_mla_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, _, Dk = q.shape
    _cache(op, "kv_cache", kv_cache, Dk)
    check_tensor(op, "indices", indices, ndim=2, dtypes=INDEX_DTYPES, shape=[T, None])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    _varlen(op, cu_seqlens_q, seq_lens)
    if not 0 < v_dim <= Dk:
        fail(op, "v_dim", f"0 < v_dim <= {Dk}", v_dim)
    _meta(op, meta, T)


def moe_route(router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
              renormalize: bool, routed_scaling_factor: float) -> None:
    op = "moe_route"
    check_tensor(op, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    E = router_logits.shape[1]
    if correction_bias is not None:
        check_tensor(op, "correction_bias", correction_bias, ndim=1, shape=[E])
    if not 1 <= top_k <= E:
        fail(op, "top_k", f"1 <= top_k <= {E}", top_k)
    if n_group < 1 or E % n_group:
        fail(op, "n_group", f"a divisor of the expert count {E}", n_group)
    if not 1 <= topk_group <= n_group:
        fail(op, "topk_group", f"1 <= topk_group <= n_group ({n_group})", topk_group)


def moe_permute(x: Any, topk_ids: Any, num_experts: int) -> None:
    check_tensor("moe_permute", "x", x, ndim=2)
    check_tensor("moe_permute", "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])


def moe_unpermute(y: Any, order: Any, topk_weights: Any, num_tokens: int) -> None:
    check_tensor("moe_unpermute", "y", y, ndim=2)
    check_tensor("moe_unpermute", "order", order, ndim=1, dtypes=INDEX_DTYPES, shape=[y.shape[0]])
    check_tensor("moe_unpermute", "topk_weights", topk_weights, ndim=2, shape=[num_tokens, None])


def grouped_gemm(x: Any, w: Any, group_sizes: Any) -> None:
    check_tensor("grouped_gemm", "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("grouped_gemm", "w", w, ndim=3, shape=[None, None, x.shape[1]])
    check_tensor("grouped_gemm", "group_sizes", group_sizes, ndim=1, dtypes=INDEX_DTYPES, shape=[w.shape[0]])


def silu_and_mul(x: Any) -> None:
    check_tensor("silu_and_mul", "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        fail("silu_and_mul", "x", "an even last dim", tuple(x.shape))


def sample(logits: Any, temperature: Any, top_k: Any, top_p: Any, generators: Any = None) -> None:
    check_tensor("sample", "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    B = logits.shape[0]
    check_tensor("sample", "temperature", temperature, ndim=1, shape=[B])
    check_tensor("sample", "top_k", top_k, ndim=1, dtypes=INDEX_DTYPES, shape=[B])
    check_tensor("sample", "top_p", top_p, ndim=1, shape=[B])
    if generators is not None and len(generators) != B:
        fail("sample", "generators", f"{B} entries", len(generators))


CONTRACTS: dict[str, Callable[..., None]] = {
    fn.__name__: fn
    for fn in (rms_norm, layer_norm, rope, kv_cache_write, lightning_indexer, sparse_mla_attention, moe_route,
               moe_permute, moe_unpermute, grouped_gemm, silu_and_mul, sample)
}


def validated(op: str, fn: Callable) -> Callable:
    """``fn`` behind the op's contract check (``fn`` itself when the op has none here)."""
    check = CONTRACTS.get(op)
    if check is None:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call

