"""Paged-cache attention: ``kv_cache_write`` and DeepSeek Sparse Attention (``lightning_indexer``,
``sparse_mla_attention``) over the varlen / paged layout of :mod:`hwlayer.ops`."""

from __future__ import annotations

import torch

from .cache import ContiguousKV, PagedKV, as_paged
from .layout import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    AttentionMetadata,
    check_meta,
    check_tensor,
    check_varlen,
    chunk_rows,
    fail,
    fp32_scalar,
    positions_to_slots,
    sequence_key_slots,
    token_positions,
    value_checks,
)

# --------------------------------------------------------------------------------------------
# Paged cache


def kv_cache_write(cache: PagedKV | torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor, *,
                   meta: AttentionMetadata | None = None) -> None:
    """Write ``rows[t]`` into flat slot ``slot_mapping[t]`` of a paged cache, in place.

    ``cache``: the backend's cache object (:class:`~hwlayer.ops.cache.PagedKV`, hook specs 2.0) or a
    contiguous canonical ``[num_blocks, block_size, D]`` tensor; ``rows``: ``[T, D]`` canonical rows
    (cast to the cache dtype); ``slot_mapping``: int ``[T]``, ``-1`` skips the row (padding). Slots
    must be distinct. Used for the MLA latent cache (D = kv_lora_rank + rope dim) and the indexer
    key cache. ``meta``: the step's :class:`~hwlayer.ops.layout.AttentionMetadata` (optional); when
    it says the step has no padding rows, the write is one indexed copy.
    """
    op = "kv_cache_write"
    if isinstance(cache, torch.Tensor):
        check_tensor(op, "cache", cache, ndim=3)
        if not cache.is_contiguous():
            fail(op, "cache", "a contiguous tensor", "a strided view")
        paged: PagedKV = ContiguousKV(cache)
    elif isinstance(cache, PagedKV):
        paged = cache
    else:
        fail(op, "cache", "a PagedKV or a [num_blocks, block_size, D] tensor", type(cache).__name__)
    check_tensor(op, "rows", rows, ndim=2, shape=[None, paged.width])
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, shape=[rows.shape[0]])
    if rows.shape[0] == 0:
        return
    n_slots = paged.num_blocks * paged.block_size
    slots = slot_mapping.long()
    if value_checks() and slots.numel() and int(slots.max()) >= n_slots:
        fail(op, "slot_mapping", f"slots < {n_slots}", int(slots.max()))
    rows = rows.to(paged.dtype)
    if meta is not None:
        check_meta(op, meta, rows.shape[0])
        if not meta.has_padding:  # every slot is real: nothing to skip
            if value_checks() and slots.numel() and int(slots.min()) < 0:
                fail(op, "slot_mapping", "no -1 slot (meta.has_padding is False)", int(slots.min()))
            paged.write(slots, rows)
            return
    valid = slots >= 0
    # Skipping the -1 rows by boolean indexing would size a tensor by data (a host sync). Instead a
    # padding row is aimed at the slot a real row writes (the row with the largest slot: any real
    # slot beats -1), carrying that row's value: equal values written twice to one slot leave what
    # a skip would. With no real row it rewrites slot 0 with slot 0's current value.
    first = slots.argmax().view(1)  # a real row when there is one, on the device
    first_slot = slots.index_select(0, first)
    any_valid = first_slot >= 0
    pad_row = torch.where(any_valid, rows.index_select(0, first), paged.rows(torch.zeros_like(first)))
    slots = torch.where(valid, slots, first_slot.clamp(min=0))
    rows = torch.where(valid.unsqueeze(1), rows, pad_row)
    paged.write(slots, rows)

# --------------------------------------------------------------------------------------------
# DeepSeek Sparse Attention


def lightning_indexer(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: PagedKV | torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    scale: float,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    """DSA lightning indexer: the top-``topk`` past positions of every query token.

    ``q``: ``[T, Hi, Di]`` indexer queries (RoPE applied); ``weights``: fp32 ``[T, Hi]`` per-head
    weights (already including ``Hi^-0.5``); ``k_cache``: paged indexer keys (the backend's
    :class:`~hwlayer.ops.cache.PagedKV`, or a canonical ``[num_blocks, block_size, Di]`` tensor)
    holding every context position (write new keys first);
    ``block_table``, ``cu_seqlens_q``, ``seq_lens``: see the module doc; ``scale``: ``Di^-0.5``.
    ``max_seqlen_q`` / ``max_seqlen_k``: host ints, upper bounds of any sequence's new-token
    count and context length (flash-attn varlen's arguments); they size temporaries and never
    change the result (a captured decode step passes the cache's capacity as ``max_seqlen_k``).
    ``None`` reads them from the device (a host sync: callers inside a forward pass them; every
    implementation must accept them and may ignore them). ``meta``: the step's
    :class:`~hwlayer.ops.layout.AttentionMetadata` (optional; built with this ``max_seqlen_k`` and
    the cache's block size, its key slots and token -> sequence map replace rebuilding them).

    ``score[t, s] = sum_h weights[t, h] * relu(q[t, h] . k[s] * scale)`` for the causal positions
    ``s <= pos(t)`` of t's sequence. Returns int32 ``[T, topk]``: positions of the highest scores
    (order unspecified), padded with ``-1`` when the causal context has fewer than ``topk``
    positions (then every causal position is returned). Ties may be broken either way.
    """
    op = "lightning_indexer"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, Hi, Di = q.shape
    check_tensor(op, "weights", weights, ndim=2, shape=[T, Hi])
    keys_of = _paged_arg(op, "k_cache", k_cache, Di)
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_varlen(op, cu_seqlens_q, seq_lens, T)
    if topk < 1:
        fail(op, "topk", ">= 1", topk)
    B = seq_lens.shape[0]
    if max_seqlen_q is None:  # convenience for callers outside a forward pass: reads the device
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    if max_seqlen_k is None:
        max_seqlen_k = int(seq_lens.max()) if B else 0
    bs = keys_of.block_size
    if meta is not None:
        check_meta(op, meta, T)
        if meta.block_size != bs or meta.max_seqlen_k != max_seqlen_k:
            fail(op, "meta", f"tables for block_size {bs} and max_seqlen_k {max_seqlen_k}",
                 f"block_size {meta.block_size} and max_seqlen_k {meta.max_seqlen_k}")
    if T == 0 or max_seqlen_k == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    pos = torch.arange(max_seqlen_k, device=q.device)
    if meta is not None:
        key_slots, first_pos = meta.key_slots, meta.first_query_pos
    else:
        key_slots = sequence_key_slots(block_table, B, max_seqlen_k, bs)
        first_pos = seq_lens - cu_seqlens_q.diff()  # [B], the table's int dtype (promoted to int64 below)
    keys = keys_of.rows(key_slots).float()  # [B, max_seqlen_k, Di]
    keys_t = keys.transpose(1, 2)  # [B, Di, max_seqlen_k]
    k = min(topk, max_seqlen_k)
    if max_seqlen_q == 1 and T == B:  # pure decode (known on the host): one row per sequence, no padding
        picked = _indexer_topk(q.float().unsqueeze(1), weights.float().unsqueeze(1), keys_t, pos,
                               first_pos.unsqueeze(1), k, scale)[:, 0]
    else:
        # Sequences padded to [B, max_seqlen_q] query rows over [B, max_seqlen_k] keys; padded keys lie
        # beyond every query's position (masked), padded query rows are never read back. Query rows
        # go in chunks so one chunk's [B, rows, Hi, keys] temporary stays bounded (long prefills).
        seq_idx = meta.seq_idx if meta is not None else token_positions(cu_seqlens_q, seq_lens, T)[0]
        row = torch.arange(T, device=q.device) - cu_seqlens_q[seq_idx]  # token's place in its sequence
        q_pad = q.new_zeros((B, max_seqlen_q, Hi, Di), dtype=torch.float32)
        q_pad[seq_idx, row] = q.float()
        w_pad = q.new_zeros((B, max_seqlen_q, Hi), dtype=torch.float32)
        w_pad[seq_idx, row] = weights.float()
        padded = torch.empty((B, max_seqlen_q, k), dtype=torch.int32, device=q.device)
        step = chunk_rows(max_seqlen_q, B * max_seqlen_k * (Hi + 1))
        for r0 in range(0, max_seqlen_q, step):
            r1 = min(max_seqlen_q, r0 + step)
            # query position of padded row r of sequence b: first_pos[b] + r (right-aligned causal)
            rpos = first_pos.unsqueeze(1) + torch.arange(r0, r1, device=q.device)  # [B, rows]
            padded[:, r0:r1] = _indexer_topk(q_pad[:, r0:r1], w_pad[:, r0:r1], keys_t, pos, rpos, k, scale)
        picked = padded[seq_idx, row]
    if k == topk:
        return picked
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    out[:, :k] = picked
    return out


def _indexer_topk(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, pos: torch.Tensor, rpos: torch.Tensor,
                  k: int, scale: float) -> torch.Tensor:
    """Top-``k`` key positions of ``n`` query rows per sequence: ``q`` fp32 ``[B, n, Hi, Di]``, ``w`` fp32
    ``[B, n, Hi]``, ``keys_t`` fp32 ``[B, Di, keys]``, ``pos`` ``[keys]`` the key positions, ``rpos``
    ``[B, n]`` the rows' positions. Returns int32 ``[B, n, k]``, ``-1`` where fewer keys are causal."""
    B, n, Hi, Di = q.shape
    # [B, n*Hi, Di] @ [B, Di, keys]: one batched matmul, then the head-weighted sum as another
    logits = torch.bmm(q.reshape(B, n * Hi, Di), keys_t).mul_(fp32_scalar(scale)).relu_()
    score = torch.bmm(w.reshape(B * n, 1, Hi), logits.view(B * n, Hi, -1)).view(B, n, -1)
    score.masked_fill_(pos > rpos.unsqueeze(2), float("-inf"))  # keys past the query's position
    vals, idx = score.topk(k, dim=-1)
    return idx.to(torch.int32).masked_fill_(vals.isneginf(), -1)


def sparse_mla_attention(
    q: torch.Tensor,
    kv_cache: PagedKV | torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
    *,
    meta: AttentionMetadata | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention over a paged latent cache, restricted to the given positions.

    ``q``: ``[T, H, Dk]`` with ``Dk = kv_lora_rank + rope_dim`` (absorbed ``q_nope @ W_uk``
    concatenated with the roped ``q_pe``); ``kv_cache``: the backend's latent cache object
    (:class:`~hwlayer.ops.cache.PagedKV`) or a canonical ``[num_blocks, block_size, Dk]`` tensor, one
    latent head shared by all query heads (MQA), canonical row = ``[c (kv_lora_rank), k_pe (rope_dim)]``;
    ``indices``: int32 ``[T, K]`` positions within each token's sequence, ``-1`` = unused (as
    ``lightning_indexer`` returns; duplicates are not allowed); ``scale``: softmax scale;
    ``v_dim``: the value width, the first ``v_dim`` columns of each row (``kv_lora_rank``).

    ``p = softmax_k(q[t, h] . kv[idx_k] * scale)`` over valid ``k``;
    returns ``out[t, h] = sum_k p_k kv[idx_k][:v_dim]`` as ``[T, H, v_dim]`` in ``q.dtype``; with
    ``return_lse=True`` (hook specs 2.0; only callers that merge attention results ask) returns
    ``(out, lse)`` with ``lse[t, h] = log(sum_k exp(q . kv * scale))`` fp32 ``[T, H]`` (natural log).
    A token with no valid index gets ``out = 0`` and ``lse = -inf``. Softmax is computed in fp32.
    An implementation that cannot produce the lse with its kernel declines ``return_lse=True`` in
    ``supports`` rather than computing a second pass. ``meta``: the step's
    :class:`~hwlayer.ops.layout.AttentionMetadata` (optional; its token -> sequence map replaces
    rebuilding it).
    """
    op = "sparse_mla_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, H, Dk = q.shape
    paged = _paged_arg(op, "kv_cache", kv_cache, Dk)
    check_tensor(op, "indices", indices, ndim=2, dtypes=INDEX_DTYPES, shape=[T, None])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_varlen(op, cu_seqlens_q, seq_lens, T)
    if value_checks() and indices.numel() and int(indices.max()) >= int(seq_lens.max()):
        fail(op, "indices", f"positions < the longest context ({int(seq_lens.max())})", int(indices.max()))
    if not 0 < v_dim <= Dk:
        fail(op, "v_dim", f"0 < v_dim <= {Dk}", v_dim)
    bs = paged.block_size
    if meta is not None:
        check_meta(op, meta, T)
        if meta.block_size != bs:
            fail(op, "meta", f"tables for block_size {bs}", f"block_size {meta.block_size}")
        seq_idx = meta.seq_idx

        def slots_of(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # a lookup in the step's key slots
            return meta.key_slots.index_select(0, rows).gather(1, idx.long().clamp(min=0))
    else:
        seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, T)

        def slots_of(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return positions_to_slots(block_table, rows, idx, bs)
    K = indices.shape[1]
    step = chunk_rows(T, K * (Dk + H))
    if step >= T:  # one chunk (decode): no per-chunk slicing and copies
        out, lse = _sparse_mla_rows(q, paged, indices, slots_of(seq_idx, indices), scale, v_dim)
        return (out, lse) if return_lse else out
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        idx = indices[c0:c1]
        out[c0:c1], lse[c0:c1] = _sparse_mla_rows(q[c0:c1], paged, idx, slots_of(seq_idx[c0:c1], idx), scale, v_dim)
    return (out, lse) if return_lse else out


def _paged_arg(op: str, arg: str, cache: object, width: int) -> PagedKV:
    """A cache argument as a :class:`~hwlayer.ops.cache.PagedKV` of canonical rows ``width`` wide (raises
    the op's one-line ``ValueError`` otherwise)."""
    if isinstance(cache, torch.Tensor):
        check_tensor(op, arg, cache, ndim=3, shape=[None, None, width])
        return as_paged(cache if cache.is_contiguous() else cache.contiguous())
    if not isinstance(cache, PagedKV):
        fail(op, arg, "a PagedKV or a [num_blocks, block_size, D] tensor", type(cache).__name__)
    if cache.width != width:
        fail(op, arg, f"rows of width {width}", f"width {cache.width}")
    return cache


def _sparse_mla_rows(q: torch.Tensor, cache: PagedKV, idx: torch.Tensor, slots: torch.Tensor, scale: float,
                     v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla_attention`` for a chunk of query rows (``slots``: the cache slot of each index, any
    slot where the index is -1): ``(out [t, H, v_dim] in q.dtype, lse fp32 [t, H])``."""
    kv = cache.rows(slots).float()  # [t, K, Dk]
    s = torch.bmm(q.float(), kv.transpose(1, 2)).mul_(fp32_scalar(scale))  # [t, H, K]
    s.masked_fill_((idx < 0).unsqueeze(1), float("-inf"))
    m = torch.logsumexp(s, dim=-1)  # [t, H]
    p = torch.exp(s.sub_(m.unsqueeze(-1))).nan_to_num_(0.0)
    return torch.bmm(p, kv[:, :, :v_dim]).to(q.dtype), m
