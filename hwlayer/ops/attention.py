"""Paged-cache attention: ``kv_cache_write`` and DeepSeek Sparse Attention (``lightning_indexer``,
``sparse_mla_attention``) over the varlen / paged layout of :mod:`hwlayer.ops`."""

from __future__ import annotations

import torch

from .layout import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_tensor,
    check_varlen,
    chunk_rows,
    fail,
    positions_to_slots,
    token_positions,
)

# --------------------------------------------------------------------------------------------
# Paged cache


def kv_cache_write(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``rows[t]`` into flat slot ``slot_mapping[t]`` of a paged cache, in place.

    ``cache``: contiguous ``[num_blocks, block_size, D]``; ``rows``: ``[T, D]`` (cast to the
    cache dtype); ``slot_mapping``: int ``[T]``, ``-1`` skips the row (padding). Slots must be
    distinct. Used for the MLA latent cache (D = kv_lora_rank + rope dim) and the indexer key cache.
    """
    check_tensor("kv_cache_write", "cache", cache, ndim=3)
    check_tensor("kv_cache_write", "rows", rows, ndim=2, shape=[None, cache.shape[-1]])
    check_tensor("kv_cache_write", "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, shape=[rows.shape[0]])
    if not cache.is_contiguous():
        fail("kv_cache_write", "cache", "a contiguous tensor", "a strided view")
    flat = cache.view(-1, cache.shape[-1])
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, rows = slots[valid], rows[valid]
    if slots.numel() and int(slots.max()) >= flat.shape[0]:
        fail("kv_cache_write", "slot_mapping", f"slots < {flat.shape[0]}", int(slots.max()))
    flat.index_copy_(0, slots, rows.to(cache.dtype))


# --------------------------------------------------------------------------------------------
# DeepSeek Sparse Attention


def lightning_indexer(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """DSA lightning indexer: the top-``topk`` past positions of every query token.

    ``q``: ``[T, Hi, Di]`` indexer queries (RoPE applied); ``weights``: fp32 ``[T, Hi]`` per-head
    weights (already including ``Hi^-0.5``); ``k_cache``: paged indexer keys
    ``[num_blocks, block_size, Di]`` holding every context position (write new keys first);
    ``block_table``, ``cu_seqlens_q``, ``seq_lens``: see the module doc; ``scale``: ``Di^-0.5``.

    ``score[t, s] = sum_h weights[t, h] * relu(q[t, h] . k[s] * scale)`` for the causal positions
    ``s <= pos(t)`` of t's sequence. Returns int32 ``[T, topk]``: positions of the highest scores
    (order unspecified), padded with ``-1`` when the causal context has fewer than ``topk``
    positions (then every causal position is returned). Ties may be broken either way.
    """
    op = "lightning_indexer"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, Hi, Di = q.shape
    check_tensor(op, "weights", weights, ndim=2, shape=[T, Hi])
    check_tensor(op, "k_cache", k_cache, ndim=3, shape=[None, None, Di])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    starts, lens = check_varlen(op, cu_seqlens_q, seq_lens, T)
    if topk < 1:
        fail(op, "topk", ">= 1", topk)
    bs = k_cache.shape[1]
    flat = k_cache.reshape(-1, Di)
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    q_lens = [t1 - t0 for t0, t1 in zip(starts[:-1], starts[1:], strict=True)]
    if T and max(q_lens) <= 8 and len(lens) * max(lens) * (Di + max(q_lens) * Hi) <= (1 << 25):
        # Decode (few new tokens per sequence): one batched product over all sequences, keys
        # padded to the longest context; padding lies beyond every query's position, so it is masked.
        _indexer_batched(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, q_lens, lens, scale, out)
        return out
    for b in range(len(lens)):  # prefill: one iteration per sequence, not per token
        t0, t1, L = starts[b], starts[b + 1], lens[b]
        n = t1 - t0
        if n == 0:
            continue
        pos = torch.arange(L, device=q.device)
        zeros = torch.zeros(L, dtype=torch.long, device=q.device)
        keys = flat[positions_to_slots(block_table[b : b + 1], zeros, pos, bs)]
        keys = keys.float()
        k = min(topk, L)
        step = chunk_rows(n, Hi * L)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            qc = q[t0 + c0 : t0 + c1].float()
            logits = torch.relu(torch.einsum("thd,sd->ths", qc, keys) * scale)
            score = torch.einsum("ths,th->ts", logits, weights[t0 + c0 : t0 + c1].float())
            qpos = torch.arange(L - n + c0, L - n + c1, device=q.device)
            score.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
            vals, idx = score.topk(k, dim=-1)
            idx = idx.to(torch.int32).masked_fill_(vals == float("-inf"), -1)
            out[t0 + c0 : t0 + c1, :k] = idx
    return out


def _indexer_batched(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    q_lens: list[int],
    lens: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    """``lightning_indexer`` for batches with few new tokens per sequence (decode): sequences are
    padded to ``[B, max new tokens]`` queries and ``[B, max context]`` keys and scored at once."""
    T, Hi, Di = q.shape
    B, n_max, L_max = len(lens), max(q_lens), max(lens)
    if T == B and n_max == 1:  # pure decode: one token per sequence, nothing to pad
        seq_idx, row = torch.arange(B, device=q.device), torch.zeros(B, dtype=torch.long, device=q.device)
        qpos = seq_lens.long() - 1
        q_pad, w_pad = q.float().unsqueeze(1), weights.float().unsqueeze(1)
    else:
        seq_idx, qpos = token_positions(cu_seqlens_q, seq_lens)
        row = torch.arange(T, device=q.device) - cu_seqlens_q.long()[seq_idx]  # token's place in its sequence
        q_pad = torch.zeros((B, n_max, Hi, Di), dtype=torch.float32, device=q.device)
        q_pad[seq_idx, row] = q.float()
        w_pad = torch.zeros((B, n_max, Hi), dtype=torch.float32, device=q.device)
        w_pad[seq_idx, row] = weights.float()
    pos = torch.arange(L_max, device=q.device)
    seqs = torch.arange(B, device=q.device)
    slots = positions_to_slots(block_table, seqs, pos.expand(B, L_max), k_cache.shape[1])
    keys = k_cache.reshape(-1, Di)[slots].float()  # [B, L_max, Di]
    logits = torch.relu(torch.einsum("bnhd,bsd->bnhs", q_pad, keys) * scale)
    score = torch.einsum("bnhs,bnh->bns", logits, w_pad)[seq_idx, row]  # [T, L_max]
    score.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
    vals, idx = score.topk(min(out.shape[1], L_max), dim=-1)
    out[:, : idx.shape[1]] = idx.to(torch.int32).masked_fill_(vals == float("-inf"), -1)


def sparse_mla_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention over a paged latent cache, restricted to the given positions.

    ``q``: ``[T, H, Dk]`` with ``Dk = kv_lora_rank + rope_dim`` (absorbed ``q_nope @ W_uk``
    concatenated with the roped ``q_pe``); ``kv_cache``: ``[num_blocks, block_size, Dk]``, one
    latent head shared by all query heads (MQA), row = ``[c (kv_lora_rank), k_pe (rope_dim)]``;
    ``indices``: int32 ``[T, K]`` positions within each token's sequence, ``-1`` = unused (as
    ``lightning_indexer`` returns; duplicates are not allowed); ``scale``: softmax scale;
    ``v_dim``: the value width, the first ``v_dim`` columns of each row (``kv_lora_rank``).

    ``p = softmax_k(q[t, h] . kv[idx_k] * scale)`` over valid ``k``;
    returns ``(out, lse)``: ``out[t, h] = sum_k p_k kv[idx_k][:v_dim]`` as ``[T, H, v_dim]`` in
    ``q.dtype`` and ``lse[t, h] = log(sum_k exp(q . kv * scale))`` fp32 ``[T, H]`` (natural log).
    A token with no valid index gets ``out = 0`` and ``lse = -inf``. Softmax is computed in fp32.
    """
    op = "sparse_mla_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, H, Dk = q.shape
    check_tensor(op, "kv_cache", kv_cache, ndim=3, shape=[None, None, Dk])
    check_tensor(op, "indices", indices, ndim=2, dtypes=INDEX_DTYPES, shape=[T, None])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_varlen(op, cu_seqlens_q, seq_lens, T)
    if not 0 < v_dim <= Dk:
        fail(op, "v_dim", f"0 < v_dim <= {Dk}", v_dim)
    bs = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, Dk)
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens)
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    K = indices.shape[1]
    step = chunk_rows(T, K * (Dk + H))
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        idx = indices[c0:c1]
        valid = idx >= 0
        kv = flat[positions_to_slots(block_table, seq_idx[c0:c1], idx, bs)].float()  # [t, K, Dk]
        s = torch.einsum("thd,tkd->thk", q[c0:c1].float(), kv) * scale
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # [t, H]
        p = torch.exp(s - m.unsqueeze(-1)).nan_to_num_(0.0)
        out[c0:c1] = torch.einsum("thk,tkd->thd", p, kv[..., :v_dim]).to(q.dtype)
        lse[c0:c1] = m
    return out, lse
