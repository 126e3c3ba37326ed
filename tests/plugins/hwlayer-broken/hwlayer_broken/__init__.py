"""Deliberately broken hwlayer backends (device cpu), for tests/test_broken_ops.py.

Each op below contains one porting mistake; the conformance suite must reject each. Backend
``broken`` (classic mistakes):

* sparse_mla_attention: softmax scale ``Dk^-0.5`` instead of the ``scale`` argument;
* rope: always NeoX halves, even when asked for interleaved (GPT-J) pairs;
* lightning_indexer: no causal mask (a query may select future positions);
* moe_route: weights taken from the biased choice score instead of the sigmoid score;
* sample: top-p off by one (the token whose mass crosses top_p is dropped).

Subtly wrong ones, which pass small well-conditioned cases:

* ``broken-numerics``: sparse_mla_attention and sample exponentiate without subtracting the max
  (fine for logits near 10, inf/inf beyond ~88); rms_norm accumulates the mean square in the
  input dtype, element by element (a bf16 accumulator: within the old tolerance at width 64, far
  off at 6144).
* ``broken-eps``: rms_norm and layer_norm drop eps (invisible unless the mean square is near eps);
  sample applies top-k / top-p to the untempered distribution, then the temperature (same support
  at T = 1, a wrong one far from it: some support tokens are never drawn).
* ``broken-topk``: sample ignores top_k on rows that also set top_p < 1 (draws outside the support).

And one that is right but only partly native, for the provenance test:

* ``partial``: a correct rms_norm whose ``supports()`` declines widths above 1024; those calls
  run the generic fallback, and the report must say so.
"""

from __future__ import annotations

from typing import Callable

import torch

from hwlayer import Backend, hookimpl
from hwlayer import ops as generic

HWLAYER_HOOKSPEC_VERSION = "1.0"


def sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim):
    wrong_scale = q.shape[-1] ** -0.5  # bug: ignores the scale argument
    # a 1.x implementation returns (out, lse); the 2.0 generic gives the lse when asked
    return generic.sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, wrong_scale, v_dim,
                                        return_lse=True)


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


def _sample(logits, temperature, top_k, top_p, generators, *, bug: str):
    """The generic sampler's algorithm (sort, top-k, softmax, top-p, exponential race) with one bug."""
    B, V = logits.shape
    logits = logits.float()
    greedy_ids = logits.argmax(-1)
    greedy = temperature <= 0
    t = temperature.float().clamp(min=1e-5).unsqueeze(1)
    scaled = logits if bug == "temperature-after-top-p" else logits / t
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V).unsqueeze(0)
    use_k = (top_k > 0) & (top_k < V)
    if bug == "top_k-ignored-with-top_p":
        use_k = use_k & (top_p >= 1.0)
    k = torch.where(use_k, top_k.long(), V).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    if bug == "no-max-subtraction":
        e = sorted_logits.exp()
        probs = e / e.sum(-1, keepdim=True)
    else:
        probs = sorted_logits.softmax(-1)
    mass = probs.cumsum(-1)
    if bug == "top-p-off-by-one":
        drop = (mass > top_p.float().unsqueeze(1)) & (ranks > 0)  # drops the token that crosses top_p
    else:
        drop = (mass - probs) >= top_p.float().unsqueeze(1)
    probs = probs.masked_fill(drop, 0.0)
    if bug == "temperature-after-top-p":
        kept = sorted_logits.masked_fill(probs == 0, float("-inf")) / t
        probs = kept.softmax(-1)
    noise = torch.empty_like(probs)
    for b, g in enumerate(generators or [None] * B):
        noise[b].exponential_(generator=g)
    sampled = sorted_ids.gather(1, (probs / noise).argmax(-1, keepdim=True)).squeeze(1)
    return torch.where(greedy, greedy_ids, sampled)


def sample_top_p_off_by_one(logits, temperature, top_k, top_p, generators=None):
    return _sample(logits, temperature, top_k, top_p, generators, bug="top-p-off-by-one")


def sample_no_max_subtraction(logits, temperature, top_k, top_p, generators=None):
    return _sample(logits, temperature, top_k, top_p, generators, bug="no-max-subtraction")


def sample_temperature_after_top_p(logits, temperature, top_k, top_p, generators=None):
    return _sample(logits, temperature, top_k, top_p, generators, bug="temperature-after-top-p")


def sample_top_k_ignored_with_top_p(logits, temperature, top_k, top_p, generators=None):
    return _sample(logits, temperature, top_k, top_p, generators, bug="top_k-ignored-with-top_p")


def sparse_mla_attention_no_max(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim):
    """Gather, exponentiate the raw logits, normalise: right for small logits only."""
    T, H, Dk = q.shape
    bs = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, Dk).float()
    seq_idx = torch.repeat_interleave(torch.arange(seq_lens.numel()), (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long())
    out = torch.zeros(T, H, v_dim, dtype=torch.float32)
    lse = torch.full((T, H), float("-inf"))
    for t in range(T):
        pos = indices[t][indices[t] >= 0].long()
        if pos.numel() == 0:
            continue
        rows = flat[block_table[seq_idx[t], pos // bs].long() * bs + pos % bs]
        e = (q[t].float() @ rows.T * scale).exp()  # bug: no max subtraction
        total = e.sum(-1, keepdim=True)
        out[t] = (e / total) @ rows[:, :v_dim]
        lse[t] = total.squeeze(-1).log()
    return out.to(q.dtype), lse


def rms_norm_input_dtype_accumulator(x, weight, eps, residual=None):
    """Sums the squares into an accumulator of x's dtype, one column at a time (a half-precision
    register): at width 64 the sum stays small enough to be nearly exact; at 6144 it stalls once
    it is 256x the terms (bf16 keeps 8 significant bits)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    acc = torch.zeros(xf.shape[:-1], dtype=x.dtype)
    sq = xf.pow(2)
    for c in range(x.shape[-1]):
        acc = (acc.float() + sq[..., c]).to(x.dtype)  # bug: rounded to x.dtype every step
    y = xf * torch.rsqrt(acc.float().unsqueeze(-1) / x.shape[-1] + eps) * weight.float()
    return (y.to(x.dtype), x) if residual is not None else y.to(x.dtype)


def rms_norm_without_eps(x, weight, eps, residual=None):
    return generic.rms_norm(x, weight, 0.0, residual=residual)  # bug: eps dropped


def layer_norm_without_eps(x, weight, bias, eps):
    return generic.layer_norm(x, weight, bias, 0.0)  # bug: eps dropped


def rms_norm_correct(x, weight, eps, residual=None):
    return generic.rms_norm(x, weight, eps, residual=residual)


def rms_norm_narrow_only(x, weight, eps, residual=None):
    return True if x.shape[-1] <= 1024 else f"width {x.shape[-1]} above 1024"


# backend -> {op: implementation}
BACKENDS = {
    "broken": {"sparse_mla_attention": sparse_mla_attention, "rope": rope, "lightning_indexer": lightning_indexer,
               "moe_route": moe_route, "sample": sample_top_p_off_by_one},
    "broken-numerics": {"sparse_mla_attention": sparse_mla_attention_no_max, "sample": sample_no_max_subtraction,
                        "rms_norm": rms_norm_input_dtype_accumulator},
    "broken-eps": {"rms_norm": rms_norm_without_eps, "layer_norm": layer_norm_without_eps,
                   "sample": sample_temperature_after_top_p},
    "broken-topk": {"sample": sample_top_k_ignored_with_top_p},
}


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    for name in (*BACKENDS, "partial"):
        register(Backend(name=name, vendor="test", device_type="cpu", dist_backend="gloo", priority=-100,
                         verified="never: deliberately wrong (or partial), for tests"))


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    for backend, ops in BACKENDS.items():
        for op, fn in ops.items():
            register(op, fn, backend=backend)
    register("rms_norm", rms_norm_correct, backend="partial", supports=rms_norm_narrow_only)
