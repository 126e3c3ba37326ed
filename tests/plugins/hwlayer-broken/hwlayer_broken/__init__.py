"""A deliberately broken hwlayer backend (``broken``, device cpu), for tests/test_broken_ops.py.

Each op below contains one classic porting mistake; the conformance suite must reject each:

* sparse_mla_attention: softmax scale ``Dk^-0.5`` instead of the ``scale`` argument;
* rope: always NeoX halves, even when asked for interleaved (GPT-J) pairs;
* lightning_indexer: no causal mask (a query may select future positions);
* moe_route: weights taken from the biased choice score instead of the sigmoid score.
"""

from __future__ import annotations

from typing import Callable

import torch

from hwlayer import Backend, hookimpl
from hwlayer import ops as generic

HWLAYER_HOOKSPEC_VERSION = "1.0"


def sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim):
    wrong_scale = q.shape[-1] ** -0.5  # bug: ignores the scale argument
    return generic.sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, wrong_scale, v_dim)


def rope(x, positions, cos_sin_cache, interleaved):
    return generic.rope(x, positions, cos_sin_cache, False)  # bug: NeoX layout regardless


def lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale):
    T, _, Di = q.shape
    bs = k_cache.shape[1]
    flat = k_cache.reshape(-1, Di).float()
    out = torch.full((T, topk), -1, dtype=torch.int32)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, L in enumerate(lens):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        pos = torch.arange(L)
        keys = flat[block_table[b, pos // bs].long() * bs + pos % bs]
        logits = torch.relu(torch.einsum("thd,sd->ths", q[t0:t1].float(), keys) * scale)
        score = torch.einsum("ths,th->ts", logits, weights[t0:t1].float())  # bug: no causal mask
        k = min(topk, L)
        out[t0:t1, :k] = score.topk(k, dim=-1).indices.to(torch.int32)
    return out


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    T, E = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(T, n_group, E // n_group)
        keep = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1).indices
    weights = choice.gather(1, ids)  # bug: the biased choice score
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(Backend(name="broken", vendor="test", device_type="cpu", dist_backend="gloo", priority=-100,
                     verified="never: deliberately wrong, for tests"))


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    for fn in (sparse_mla_attention, rope, lightning_indexer, moe_route):
        register(fn.__name__, fn, backend="broken")
