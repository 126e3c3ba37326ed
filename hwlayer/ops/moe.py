"""Mixture of experts: ``moe_route`` (noaux_tc), ``moe_permute`` / ``moe_unpermute``, ``grouped_gemm``,
``silu_and_mul`` and the ``fused_experts`` composite built from them."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail, fp32_scalar, value_checks


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-5 / DeepSeek-V3 ``noaux_tc`` routing.

    ``router_logits``: ``[T, E]`` (``x @ W_gate^T``, computed in fp32). ``s = sigmoid(logits)``;
    the choice score ``s + correction_bias`` (``[E]``, may be None) is used for selection only.
    When ``n_group > 1`` experts form ``n_group`` equal groups, each group scored by the sum of its
    top-2 choice scores, and only the best ``topk_group`` groups stay eligible. ``ids`` = the
    ``top_k`` best eligible choice scores; ``weights = s[ids]`` (never the biased score), divided
    by ``sum + 1e-20`` if ``renormalize``, then times ``routed_scaling_factor``.
    Returns ``(weights fp32 [T, top_k], ids int32 [T, top_k])``; order within a row unspecified.
    """
    op = "moe_route"
    check_tensor(op, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E = router_logits.shape
    if correction_bias is not None:
        check_tensor(op, "correction_bias", correction_bias, ndim=1, shape=[E])
    if not 1 <= top_k <= E:
        fail(op, "top_k", f"1 <= top_k <= {E}", top_k)
    if n_group < 1 or E % n_group:
        fail(op, "n_group", f"a divisor of the expert count {E}", n_group)
    if not 1 <= topk_group <= n_group:
        fail(op, "topk_group", f"1 <= topk_group <= n_group ({n_group})", topk_group)
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=choice.device)
        group_mask.scatter_(1, keep, torch.ones_like(keep, dtype=torch.bool))  # a tensor source: traceable
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + fp32_scalar(1e-20))
    return weights * fp32_scalar(routed_scaling_factor), ids.to(torch.int32)


def moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token rows by expert.

    ``x``: ``[T, D]``; ``topk_ids``: int ``[T, k]``; an id outside ``[0, num_experts)`` (for
    example ``-1``, or an expert owned by another rank after subtracting an offset) is dropped.
    Returns ``(x_sorted [T*k, D], group_sizes int64 [num_experts], order int64 [T*k])``: every
    assignment has a row, so the sizes never depend on the data (no host read, graph-capturable).
    The first ``M = sum(group_sizes)`` rows are the kept assignments sorted by expert (stable in
    token order) with ``order[j] = t * k + slot`` naming the assignment row ``j`` came from; the
    remaining rows are the dropped assignments, ``order == -1``, contents unspecified.
    """
    op = "moe_permute"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # dropped sort last
    # counts by scatter-add, not bincount: bincount's output size depends on the largest id
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    perm = torch.argsort(key, stable=True)
    order = torch.where(key.index_select(0, perm) < num_experts, perm, -1)
    return x.index_select(0, perm // k), counts[:num_experts], order


def moe_unpermute(
    y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Inverse of ``moe_permute`` with the routing weights applied.

    ``y``: ``[M, D]`` expert outputs in permuted order; ``order``: ``[M]`` from ``moe_permute``
    (rows with ``order == -1`` are dropped assignments and are ignored, whatever ``y`` holds
    there, NaN included); ``topk_weights``: ``[num_tokens, k]``. Returns ``[num_tokens, D]`` in
    ``y.dtype`` with ``out[t] = sum over kept slots of topk_weights[t, slot] * y[row]``,
    accumulated in fp32; tokens with no kept slot get zeros.
    """
    op = "moe_unpermute"
    check_tensor(op, "y", y, ndim=2)
    check_tensor(op, "order", order, ndim=1, dtypes=INDEX_DTYPES, shape=[y.shape[0]])
    check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=[num_tokens, None])
    k = topk_weights.shape[1]
    kept = order >= 0
    order = order.long().clamp(min=0)
    w = topk_weights.reshape(-1).float().index_select(0, order)
    rows = torch.where(kept.unsqueeze(1), y.float() * w.unsqueeze(1), 0.0)
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, order // k, rows)
    return out.to(y.dtype)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Per-expert matmul on rows grouped by expert.

    ``x``: ``[M, K]`` with rows of expert ``e`` contiguous and experts in order;
    ``w``: ``[E, N, K]`` (nn.Linear layout, "NT"); ``group_sizes``: int ``[E]`` row counts, on the
    device, with ``sum <= M`` (Ascend wants these as ``group_list_type=1``): rows past the sum are
    padding (``moe_permute``'s dropped assignments) and their output rows are unspecified (the
    generic writes zeros). Returns ``[M, N]`` in ``x.dtype``: ``out[rows of e] = x[rows of e] @
    w[e]^T``. Experts with no rows cost nothing. Implementations must not need the sizes on the host.
    """
    op = "grouped_gemm"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w", w, ndim=3, shape=[None, None, x.shape[1]])
    check_tensor(op, "group_sizes", group_sizes, ndim=1, dtypes=INDEX_DTYPES, shape=[w.shape[0]])
    M, N = x.shape[0], w.shape[1]
    if value_checks() and int(group_sizes.sum()) > M:
        fail(op, "group_sizes", f"counts summing to at most {M} rows", int(group_sizes.sum()))
    if M == 0 or w.shape[0] == 0:
        return x.new_zeros(M, N)
    ends = group_sizes.long().cumsum(0)
    rows = torch.arange(M, device=x.device)
    padding = rows >= ends[-1:]  # rows past the last group
    expert = torch.searchsorted(ends, rows, right=True).clamp_(max=w.shape[0] - 1)
    if _gather_per_row(M, w.shape[0], M * N * x.shape[1]):
        # Few rows (decode): every row multiplies its own expert's gathered weight, one bmm.
        out = torch.bmm(w.to(x.dtype).index_select(0, expert), x.unsqueeze(2)).squeeze(2)
        return out.masked_fill_(padding.unsqueeze(1), 0)
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and (N * x.element_size()) % 16 == 0
    if hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and aligned:
        # torch >= 2.8: one call with device-side group offsets (CPU kernel: fp32/bf16/fp16; it
        # wants 16-byte aligned row strides). Not used on accelerators, where torch's kernel has
        # narrower requirements (bf16, SM90): vendors register their own grouped GEMM.
        out = torch._grouped_mm(x, w.to(x.dtype).transpose(-2, -1), offs=ends.to(torch.int32))
        return out.masked_fill_(padding.unsqueeze(1), 0)
    # Many rows and no grouped matmul in this torch: one matmul per expert over all rows, the
    # rows of other experts masked out (E x the flops, but no host read of the sizes).
    out = x.new_zeros(M, N)
    for e in range(w.shape[0]):
        out = torch.where((expert == e).unsqueeze(1) & ~padding.unsqueeze(1), x @ w[e].t().to(x.dtype), out)
    return out


# Elements of the gathered per-row weights [M, N, K] the decode path of grouped_gemm may build.
_GATHER_BUDGET = 1 << 24
# ... and below which the copies cost less than the grouped path's ~60 more torch calls whatever the rows.
_GATHER_SMALL = 1 << 18


def _gather_per_row(rows: int, experts: int, elements: int) -> bool:
    """Whether one gathered copy of its expert's weights per row beats sorting the rows by expert.
    It does while the copies are small (a small model's decode: host calls dominate), or while the
    rows are few next to the experts (batch-1 decode: each row a different expert, one bmm). Past
    that the grouped path reads each expert's weights once; bench/bench_ep.py's model (D = 2I = 512,
    32 experts) decoded batch 8 5x faster that way, and a fixed-capacity EP buffer, mostly padding
    rows, stopped copying weights for every padding row."""
    return elements <= _GATHER_SMALL or (rows <= experts // 8 and elements <= _GATHER_BUDGET)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: ``x``: ``[..., 2I]`` -> ``silu(x[..., :I]) * x[..., I:]`` (gate first,
    then up; Ascend ``npu_swiglu``), in ``x.dtype``."""
    check_tensor("silu_and_mul", "x", x, dtypes=FLOAT_DTYPES)
    if x.shape[-1] % 2:
        fail("silu_and_mul", "x", "an even last dim", x.shape[-1])
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_experts_factory(plan: Any) -> Callable:
    # The reference plan (no part overridden; traced or not) takes a shorter road for few tokens; a
    # plan with any part overridden always runs the composite, so the override serves.
    generic_parts = all(inspect.unwrap(getattr(plan, name)) is fn for name, fn in (
        ("moe_permute", moe_permute), ("grouped_gemm", grouped_gemm), ("silu_and_mul", silu_and_mul),
        ("moe_unpermute", moe_unpermute)))

    def fused_experts(
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Routed experts, the composite: ``sum_k w_k * W2_e (silu(W1_e x) * W3_e x)``.

        ``x``: ``[T, D]``; ``w13``: ``[E, 2I, D]`` (gate rows then up rows per expert);
        ``w2``: ``[E, D, I]``; ``topk_weights``/``topk_ids``: ``[T, k]`` from ``moe_route``
        (ids outside ``[0, E)`` contribute nothing). Returns ``[T, D]`` in ``x.dtype``. The
        default runs ``moe_permute -> grouped_gemm -> silu_and_mul -> grouped_gemm ->
        moe_unpermute`` through the plan, so overriding a part speeds this up too.
        """
        check_tensor("fused_experts", "w13", w13, ndim=3, shape=[None, None, x.shape[-1]])
        check_tensor("fused_experts", "w2", w2, ndim=3, shape=[w13.shape[0], x.shape[-1], w13.shape[1] // 2])
        n = topk_ids.numel()
        if generic_parts and _gather_per_row(n, w13.shape[0], n * w13.shape[1] * x.shape[-1]):
            return _experts_per_assignment(x, w13, w2, topk_weights, topk_ids)
        xs, sizes, order = plan.moe_permute(x, topk_ids, w13.shape[0])
        h = plan.silu_and_mul(plan.grouped_gemm(xs, w13, sizes))
        y = plan.grouped_gemm(h, w2, sizes)
        return plan.moe_unpermute(y, order, topk_weights, x.shape[0])

    return fused_experts


def _experts_per_assignment(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_experts`` for few tokens (decode): every (token, slot) assignment multiplies its own
    expert's gathered weights, the math of ``grouped_gemm``'s few-rows path without sorting the rows
    by expert and back (about 30 torch calls instead of 90: on a decode step the host's work is the cost)."""
    check_tensor("fused_experts", "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])
    check_tensor("fused_experts", "topk_weights", topk_weights, ndim=2, shape=list(topk_ids.shape))
    (T, k), E, D = topk_ids.shape, w13.shape[0], x.shape[1]
    ids = topk_ids.reshape(-1)
    safe = ids.clamp(0, E - 1)  # a dropped assignment computes with expert 0 or E-1, then weighs nothing
    kept = safe == ids
    w13, w2 = (w13, w2) if w13.dtype == x.dtype else (w13.to(x.dtype), w2.to(x.dtype))
    xs = x.unsqueeze(1).expand(T, k, D).reshape(T * k, D, 1)
    h = torch.bmm(w13.index_select(0, safe), xs).squeeze(2)  # [T*k, 2I]
    y = torch.bmm(w2.index_select(0, safe), silu_and_mul(h).unsqueeze(2)).squeeze(2)  # [T*k, D]
    # fp32 weighted sum over each token's slots; where(), not a multiply, so a dropped row adds nothing even if NaN
    y = torch.where(kept.unsqueeze(1), y.float() * topk_weights.reshape(-1, 1).float(), 0.0)
    return y.view(T, k, D).sum(1).to(x.dtype)
