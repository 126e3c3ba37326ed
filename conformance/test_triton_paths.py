"""Cases shaped to pick each launch path of the Triton tier, checked against float64 goldens.

They run on every backend like the other cases (the shapes are ordinary: a decode step with many
selected rows, a long prefill, a one-token and a many-token MoE). Where the Triton tier serves the
op (``--backend triton``, or a backend that inherits it), each case also asserts which kernel path
ran, from the tier's host-side launch counter, so a path that silently stopped being chosen fails:

* ``sparse_mla_attention``: split-K decode (T=1 or 2 tokens, 128-256 selected rows: the keys are
  split across programs, then merged through their lse) vs one-pass prefill (136 tokens: the
  (token, head tile) programs alone fill the interpreter's stand-in device and a 132-SM H200);
* ``fused_experts``: the fused expert-block kernels, with no ``moe_permute`` / ``moe_unpermute``
  round trip, for a decode token and for a prefill batch;
* ``lightning_indexer`` as a captured decode step calls it: host-side ``max_seqlen_q`` / ``max_seqlen_k``
  with ``max_seqlen_k`` the block table's whole capacity, far past every context (the tiles beyond a
  token's position must only produce ``-inf``, and the selection stays the top-k of the real context).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from . import golden
from .cases import generator, paged_batch, randn

LATENT, ROPE_DIM = 32, 8
INDEX_HEADS, INDEX_DIM = 4, 32
BLOCK_SIZE = 8
SCALE = 0.09


@contextlib.contextmanager
def triton_paths(plan, op: str, expected: dict[str, int], untouched: tuple[str, ...] = ()) -> Iterator[None]:
    """When the Triton tier served ``op`` in the block, its launch counter must have moved by
    exactly ``expected`` (and the ops in ``untouched`` must not have been called at all)."""
    from hwlayer.backends.triton.adapters import LAUNCHES

    launches, calls = dict(LAUNCHES), plan.call_counts()
    yield
    served = {tier for (name, tier), n in plan.call_counts().items() if name == op and n != calls.get((name, tier), 0)}
    by_triton = "inherited:triton" in served or (plan.backend.name == "triton" and "native" in served)
    if not by_triton:
        return  # another implementation served it: the golden checks are the whole test
    moved = {k: n - launches.get(k, 0) for k, n in LAUNCHES.items() if n != launches.get(k, 0)}
    assert moved == expected, f"{op}: expected Triton launch path {expected}, got {moved}"
    after = plan.call_counts()
    for other in untouched:
        extra = {key: n - calls.get(key, 0) for key, n in after.items() if key[0] == other and n != calls.get(key, 0)}
        assert not extra, f"{op}: the fused path must not call {other}, but it did: {extra}"


ATTENTION_PATH_CASES = {
    # name: (query counts, context lengths, indices per token (>= 128: enough to split), heads, q scale)
    "decode-split-k": ([1], [300], 256, 16, 3.0),
    # the second sequence has 30 positions: its last splits hold only -1 (lse -inf partials)
    "decode-batch-split-k": ([1, 1], [200, 30], 128, 16, 3.0),
    # large logits (q x12): the online softmax must subtract its running max
    "long-prefill": ([100, 36], [100, 300], 136, 2, 12.0),
}
SPLIT = {"sparse_mla_split": 1, "sparse_mla_merge": 1}
ONE_PASS = {"sparse_mla_prefill": 1}


def _expected_attention_path(device: torch.device, num_tokens: int) -> dict[str, int]:
    """The tier's documented rule: split the keys only while the (token, head tile) programs (here
    one head tile per token: <= 16 heads) do not fill the device, i.e. number fewer than its SMs
    (8 under the interpreter). 136 tokens fill an H200 (132 SMs), not a B200 (148)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return ONE_PASS if num_tokens >= sms else SPLIT


def _indexer_like(gen: torch.Generator, q_lens: list[int], seq_lens: list[int], K: int) -> torch.Tensor:
    """Per token, distinct causal positions in random order, then ``-1`` padding at the end: the
    layout ``lightning_indexer`` returns when the context is shorter than K."""
    rows = []
    for n, L in zip(q_lens, seq_lens, strict=True):
        for i in range(n):
            pos = L - n + i
            take = min(K, pos + 1)
            rows.append(torch.randperm(pos + 1, generator=gen)[:take].tolist() + [-1] * (K - take))
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("case", list(ATTENTION_PATH_CASES))
def test_sparse_mla_attention_paths(checker, plan, dtype, device, case):
    ck = checker("sparse_mla_attention", case)
    gen = generator("sparse_mla_attention_paths", case, dtype)
    q_lens, seq_lens, K, heads, q_scale = ATTENTION_PATH_CASES[case]
    batch = paged_batch(gen, q_lens, seq_lens, BLOCK_SIZE)
    T, Dk = batch.num_tokens, LATENT + ROPE_DIM
    q = randn(gen, (T, heads, Dk), ck.dtype, device, scale=q_scale)
    kv_cache = randn(gen, (batch.num_blocks, BLOCK_SIZE, Dk), ck.dtype, device)
    indices = _indexer_like(gen, q_lens, seq_lens, K)
    block_table, cu, lens = batch.tensors(device)

    with triton_paths(plan, "sparse_mla_attention", _expected_attention_path(q.device, T)):
        out, lse = ck.fn(q, kv_cache, indices.to(device), block_table, cu, lens, SCALE, LATENT, return_lse=True)
    ck.shape_dtype("out", out, (T, heads, LATENT), ck.dtype)
    ck.shape_dtype("lse", lse, (T, heads), torch.float32)
    g_out, g_lse = golden.sparse_mla_attention(q, kv_cache, indices, batch.block_table, batch.cu_seqlens_q,
                                               seq_lens, SCALE, LATENT)
    ck.close("lse", lse, g_lse, k=Dk)
    ck.close("out", out, g_out, k=Dk)


MOE_PATH_CASES = {
    # name: (tokens, experts, top_k, hidden, intermediate)
    "decode-one-token": (1, 16, 8, 64, 32),
    "prefill-batch": (48, 8, 4, 32, 48),
}


@pytest.mark.parametrize("case", list(MOE_PATH_CASES))
def test_fused_experts_paths(checker, plan, dtype, device, case):
    ck = checker("fused_experts", case)
    gen = generator("fused_experts_paths", case, dtype)
    T, E, k, D, inter = MOE_PATH_CASES[case]
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, -1] = -1  # a dropped slot (an expert of another EP rank)
    x = randn(gen, (T, D), ck.dtype, device)
    w13 = randn(gen, (E, 2 * inter, D), ck.dtype, device, scale=D**-0.5)
    w2 = randn(gen, (E, D, inter), ck.dtype, device, scale=inter**-0.5)
    topk_weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)
    with triton_paths(plan, "fused_experts", {"fused_moe": 1}, untouched=("moe_permute", "moe_unpermute")):
        out = ck.fn(x, w13, w2, topk_weights, ids.to(device))
    ck.shape_dtype("out", out, (T, D), ck.dtype)
    ck.close("out", out, golden.fused_experts(x, w13, w2, topk_weights, ids), k=D)


INDEXER_BOUND_CASES = {
    # name: (query counts, context lengths, topk, spare table columns): max_seqlen_k = table capacity
    "decode-capacity-bound": ([1, 1, 1], [9, 70, 33], 16, 20),
    "mixed-capacity-bound": ([1, 6], [41, 6], 16, 12),
}


@pytest.mark.parametrize("case", list(INDEXER_BOUND_CASES))
def test_lightning_indexer_with_static_bounds(checker, dtype, device, case):
    ck = checker("lightning_indexer", case)
    gen = generator("lightning_indexer_bounds", case, dtype)
    q_lens, seq_lens, topk, spare = INDEXER_BOUND_CASES[case]
    batch = paged_batch(gen, q_lens, seq_lens, BLOCK_SIZE, spare_blocks=spare)
    # widen the table to every block (as a runner's static table): the bound covers positions no sequence has
    table = torch.cat([batch.block_table, torch.zeros(len(seq_lens), spare, dtype=torch.int32)], dim=1)
    T = batch.num_tokens
    q = randn(gen, (T, INDEX_HEADS, INDEX_DIM), ck.dtype, device)
    weights = randn(gen, (T, INDEX_HEADS), torch.float32, device, scale=INDEX_HEADS**-0.5)
    k_cache = randn(gen, (batch.num_blocks, BLOCK_SIZE, INDEX_DIM), ck.dtype, device)
    _, cu, lens = batch.tensors(device)
    capacity = table.shape[1] * BLOCK_SIZE
    assert capacity > 2 * max(seq_lens)
    out = ck.fn(q, weights, k_cache, table.to(device), cu, lens, topk, INDEX_DIM**-0.5, max(q_lens), capacity)
    ck.shape_dtype("indices", out, (T, topk), torch.int32)
    scores = golden.indexer_scores(q, weights, k_cache, batch.block_table, batch.cu_seqlens_q, seq_lens,
                                   INDEX_DIM**-0.5)
    ck.topk("indices", out.cpu().tolist(), scores, topk, reduction=INDEX_HEADS * INDEX_DIM)
