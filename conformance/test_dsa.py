"""DeepSeek Sparse Attention ops: lightning_indexer (tie-aware top-k) and sparse_mla_attention.

Batches are varlen over a paged cache with a shuffled block table and contexts spanning many
blocks: whole-prompt prefill, chunked prefill (context longer than the query count), one-token
decode, a sequence with no query tokens, and contexts shorter than ``topk`` (``-1`` padding).
Attention also runs with every logit near +120 and near -120, beyond fp32 exp's range, where only
a softmax that subtracts the running max stays finite.
"""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, paged_batch, randn
from .checks import Tolerance

INDEX_HEADS, INDEX_DIM = 4, 32
BLOCK_SIZE = 8

INDEXER_CASES = {
    # name: (query counts, context lengths incl. the queries, topk)
    "prefill-decode-chunked": ([5, 1, 7], [5, 40, 70], 16),
    "topk-exceeds-context": ([3, 2], [20, 50], 32),
    "decode-batch": ([1, 1, 1, 1], [9, 33, 1, 64], 16),
    "empty-sequence": ([2, 0, 3], [10, 7, 30], 8),
    # more than a handful of new tokens per sequence: the per-sequence prefill path
    "long-prefill": ([24, 12], [24, 45], 16),
}


@pytest.mark.parametrize("with_meta", [False, True], ids=["args", "meta"])
@pytest.mark.parametrize("case", list(INDEXER_CASES))
def test_lightning_indexer(checker, dtype, device, case, with_meta):
    """``meta``: called as a model calls it, with host sizes and the step's AttentionMetadata."""
    ck = checker("lightning_indexer", case + ("+meta" if with_meta else ""))
    gen = generator("lightning_indexer", case, dtype)
    q_lens, seq_lens, topk = INDEXER_CASES[case]
    batch = paged_batch(gen, q_lens, seq_lens, BLOCK_SIZE)
    T = batch.num_tokens
    q = randn(gen, (T, INDEX_HEADS, INDEX_DIM), ck.dtype, device)
    weights = randn(gen, (T, INDEX_HEADS), torch.float32, device, scale=INDEX_HEADS**-0.5)
    k_cache = randn(gen, (batch.num_blocks, BLOCK_SIZE, INDEX_DIM), ck.dtype, device)
    block_table, cu, lens = batch.tensors(device)
    scale = INDEX_DIM**-0.5

    if with_meta:
        out = ck.fn(q, weights, k_cache, block_table, cu, lens, topk, scale, max(q_lens), max(seq_lens),
                    meta=batch.meta(device))
    else:
        out = ck.fn(q, weights, k_cache, block_table, cu, lens, topk, scale)
    ck.shape_dtype("indices", out, (T, topk), torch.int32)
    scores = golden.indexer_scores(q, weights, k_cache, batch.block_table, batch.cu_seqlens_q, seq_lens, scale)
    ck.topk("indices", out.cpu().tolist(), scores, topk, reduction=INDEX_HEADS * INDEX_DIM)
    if case == "prefill-decode-chunked" and not with_meta:
        ck.time(q, weights, k_cache, block_table, cu, lens, topk, scale)


LATENT, ROPE_DIM, HEADS = 32, 8, 4
SCALE = 0.09  # deliberately not (LATENT + ROPE_DIM)^-0.5: the op must use the scale it is given

ATTENTION_CASES = {
    # name: (query counts, context lengths, indices per token)
    "varlen-prefill-with-padding": ([3, 1, 4], [3, 25, 30], 12),
    "decode": ([1, 1], [17, 40], 16),
    # logits around +120 / -120 (exp overflows / underflows fp32 beyond +-88 / -103): a softmax
    # without the running max subtraction gives inf/inf or 0/0; a correct one is unaffected
    "logits+120": ([2, 1], [20, 33], 16),
    "logits-120": ([2, 1], [20, 33], 16),
}
LOGIT_SHIFT = {"logits+120": 120.0, "logits-120": -120.0}


def _indices(gen: torch.Generator, q_lens: list[int], seq_lens: list[int], K: int) -> torch.Tensor:
    """Per token, distinct causal positions in random order with ``-1`` interspersed; the first
    token of the last sequence gets none at all (out 0, lse -inf)."""
    rows = []
    for b, (n, L) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for i in range(n):
            pos = L - n + i
            take = min(K - 2, pos + 1)
            row = torch.randperm(pos + 1, generator=gen)[:take].tolist() + [-1] * (K - take)
            if b == len(q_lens) - 1 and i == 0:
                row = [-1] * K
            perm = torch.randperm(K, generator=gen).tolist()
            rows.append([row[j] for j in perm])
    return torch.tensor(rows, dtype=torch.int32)


def _shifted_logits(ck, q: torch.Tensor, kv_cache: torch.Tensor, shift: float):
    """Every logit moved by ``shift`` with its spread (~2) kept: latent column 0 of every cache row
    is 4 and q's column 0 is ``shift / (4 * SCALE)`` (rounded to an even integer, exact in every
    dtype). The other entries are rounded to multiples of 1/16 within +-15.9 (8 significant bits:
    exact in bf16 and fp16 too), so every partial sum of q . k is a multiple of 2^-8 below 2^12 and
    exact in fp32 whatever the summation order: the dot products carry no rounding at all.

    What rounding is left is the contract's: logits ``scale * (q . k)`` formed in fp32 carry
    2^-24 |logit| each, which moves ``out`` by up to that times the value spread (2 max|v|) and
    ``lse`` by that much; the tolerance gets that term (x2 for an exp2-based softmax's
    ``log2(e)`` factor) on top of the op's entry.
    """
    grid = lambda t: (golden._f64(t) * 16).round().clamp(-254, 254) / 16
    kv = grid(kv_cache)
    kv[..., 0] = 4.0
    qq = grid(q)
    qq[..., 0] = 2 * round(shift / (4 * SCALE) / 2)
    q, kv_cache = qq.to(q.device, q.dtype), kv.to(kv_cache.device, kv_cache.dtype)
    v_max = float(kv[..., :LATENT].abs().max())
    logit_max = float((golden._f64(q) @ golden._f64(kv_cache).reshape(-1, kv.shape[-1]).T).abs().max()) * SCALE
    extra = 2 * 2.0**-24 * logit_max * 2 * v_max
    return q, kv_cache, Tolerance(ck.tol.atol + extra, ck.tol.rtol, ck.tol.atol_per_k, ck.tol.override_reason)


@pytest.mark.parametrize("with_meta", [False, True], ids=["args", "meta"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_sparse_mla_attention(checker, dtype, device, case, with_meta):
    ck = checker("sparse_mla_attention", case + ("+meta" if with_meta else ""))
    gen = generator("sparse_mla_attention", case, dtype)
    q_lens, seq_lens, K = ATTENTION_CASES[case]
    batch = paged_batch(gen, q_lens, seq_lens, BLOCK_SIZE)
    T, Dk = batch.num_tokens, LATENT + ROPE_DIM
    q = randn(gen, (T, HEADS, Dk), ck.dtype, device, scale=3.0)  # spread-out logits: a wrong scale shows
    kv_cache = randn(gen, (batch.num_blocks, BLOCK_SIZE, Dk), ck.dtype, device)
    tol = ck.tol
    if case in LOGIT_SHIFT:
        q, kv_cache, tol = _shifted_logits(ck, q, kv_cache, LOGIT_SHIFT[case])
    indices = _indices(gen, q_lens, seq_lens, K)
    block_table, cu, lens = batch.tensors(device)

    meta = {"meta": batch.meta(device)} if with_meta else {}
    out, lse = ck.fn(q, kv_cache, indices.to(device), block_table, cu, lens, SCALE, LATENT, **meta, return_lse=True)
    ck.shape_dtype("out", out, (T, HEADS, LATENT), ck.dtype)
    ck.shape_dtype("lse", lse, (T, HEADS), torch.float32)
    g_out, g_lse = golden.sparse_mla_attention(q, kv_cache, indices, batch.block_table, batch.cu_seqlens_q,
                                               seq_lens, SCALE, LATENT)
    # lse is fp32 from fp32 logits whatever the input dtype (products of dtype inputs are exact in
    # fp32): it gets the fp32 tolerance, not the output dtype's.
    lse_tol = ck.tolerance_of("fp32")
    if case in LOGIT_SHIFT:
        lse_tol = Tolerance(lse_tol.atol + tol.atol - ck.tol.atol, lse_tol.rtol, lse_tol.atol_per_k)
    ck.close("lse (fp32 tolerance)", lse, g_lse, k=Dk, tol=lse_tol)
    ck.close("out", out, g_out, k=Dk, tol=tol)
    # The model's call: the backend's own cache layout (hook specs 2.0), no lse asked for.
    paged = ck.plan.backend.layout().latent_cache(batch.num_blocks, BLOCK_SIZE, LATENT, ROPE_DIM, ck.dtype, device)
    paged.write(torch.arange(batch.num_blocks * BLOCK_SIZE, device=device), kv_cache.reshape(-1, Dk))
    out_only = ck.fn(q, paged, indices.to(device), block_table, cu, lens, SCALE, LATENT, **meta)
    ck.shape_dtype("out (backend layout)", out_only, (T, HEADS, LATENT), ck.dtype)
    ck.close("out (backend layout, no lse)", out_only, g_out, k=Dk, tol=tol)
    if case == "varlen-prefill-with-padding" and not with_meta:
        ck.time(q, kv_cache, indices.to(device), block_table, cu, lens, SCALE, LATENT)
