"""Mixture-of-experts ops: moe_route (tie-aware, grouped, biased), moe_permute / moe_unpermute
(dropped ids, idle experts), grouped_gemm (empty groups) and the fused_experts composite."""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, randn
from .checks import UNIT_ROUNDOFF, Tolerance

ROUTE_CASES = {
    # name: (tokens, experts, top_k, n_group, topk_group, renormalize, scaling factor, bias?)
    "grouped-biased": (16, 32, 4, 4, 2, True, 2.5, True),
    "all-groups-biased": (8, 16, 3, 4, 4, True, 1.0, True),
    "ungrouped-no-bias": (8, 16, 3, 1, 1, False, 1.0, False),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_moe_route(checker, dtype, device, case):
    ck = checker("moe_route", case)
    gen = generator("moe_route", case, dtype)
    T, E, top_k, n_group, topk_group, renormalize, factor, with_bias = ROUTE_CASES[case]
    logits = randn(gen, (T, E), ck.dtype, device, scale=2.0)
    bias = randn(gen, (E,), torch.float32, device, scale=0.4) if with_bias else None
    scores, choice, _ = golden.route_choice_scores(logits, bias, n_group, topk_group)
    if with_bias:  # the bias must matter, or using the biased score for weights would go unnoticed
        _, unbiased, _ = golden.route_choice_scores(logits, None, n_group, topk_group)
        changed = (choice.topk(top_k).indices.sort().values != unbiased.topk(top_k).indices.sort().values).any(-1)
        assert int(changed.sum()) >= T // 4, "test data: the correction bias changes too few selections"

    weights, ids = ck.fn(logits, bias, top_k, n_group, topk_group, renormalize, factor)
    ck.shape_dtype("weights", weights, (T, top_k), torch.float32)
    ck.shape_dtype("ids", ids, (T, top_k), torch.int32)
    chosen = ids.cpu().tolist()
    # ids: the best eligible choice scores (ties within tolerance may swap); weights: sigmoid
    # scores of exactly the ids returned, never the biased choice score.
    ck.topk("ids", chosen, list(choice), top_k)
    ck.close("weights", weights, golden.route_weights(scores, chosen, renormalize, factor), k=top_k)
    if case == "grouped-biased":
        ck.time(logits, bias, top_k, n_group, topk_group, renormalize, factor)


def _topk_ids(case: str) -> tuple[torch.Tensor, int]:
    """Assignments with dropped ids (-1 and an id past the last expert, as another EP rank's
    expert would be) and experts 2 and 5 receiving nothing."""
    if case == "nothing-kept":
        return torch.full((4, 2), -1, dtype=torch.int32), 6
    gen = generator("moe_ids", case)
    E, T, k = 8, 10, 3
    pool = torch.tensor([0, 1, 3, 4, 6, 7])
    ids = pool[torch.randint(0, len(pool), (T, k), generator=gen)]
    ids[2, 1], ids[5, 0], ids[7, 2] = -1, 9, -1
    ids[9] = -1  # a token with no kept slot: unpermute gives it zeros
    return ids.to(torch.int32 if case == "int32-ids" else torch.int64), E


@pytest.mark.parametrize("case", ["dropped-ids", "int32-ids", "nothing-kept"])
def test_moe_permute(checker, dtype, device, case):
    ck = checker("moe_permute", case)
    ids, E = _topk_ids(case)
    x = randn(generator("moe_permute", case, dtype), (ids.shape[0], 16), ck.dtype, device)
    sizes, order = golden.moe_permute(ids, E)
    x_sorted, group_sizes, got_order = ck.fn(x, ids.to(device), E)
    rows, kept = ids.numel(), len(order)  # every assignment has a row; the dropped ones come last
    ck.shape_dtype("group_sizes", group_sizes, (E,), torch.int64)
    ck.shape_dtype("order", got_order, (rows,), torch.int64)
    ck.shape_dtype("x_sorted", x_sorted, (rows, 16), ck.dtype)
    ck.exact("group_sizes", group_sizes, torch.tensor(sizes))
    ck.exact("order", got_order, torch.tensor(order + [-1] * (rows - kept), dtype=torch.int64))
    ck.exact("x_sorted", x_sorted[:kept], x.cpu()[[a // ids.shape[1] for a in order]])
    if case == "dropped-ids":
        ck.time(x, ids.to(device), E)


@pytest.mark.parametrize("case", ["dropped-ids", "nothing-kept"])
def test_moe_unpermute(checker, dtype, device, case):
    ck = checker("moe_unpermute", case)
    gen = generator("moe_unpermute", case, dtype)
    ids, E = _topk_ids(case)
    T, k = ids.shape
    _, order = golden.moe_permute(ids, E)
    # moe_permute's layout: kept rows, then one row per dropped assignment (order -1, any content:
    # NaN here, which must not reach the output)
    rows = order + [-1] * (ids.numel() - len(order))
    y = randn(gen, (len(rows), 16), ck.dtype, device)
    y[len(order):] = float("nan")
    topk_weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)
    order_t = torch.tensor(rows, dtype=torch.int64, device=device)
    out = ck.fn(y, order_t, topk_weights, T)
    ck.shape_dtype("out", out, (T, 16), ck.dtype)
    tol = ck.tol
    if ck.dtype_name != "fp32":
        # The fp32 weights may be rounded to the dtype before the product (Ascend's
        # npu_moe_token_unpermute takes bf16 probs): u |w| |y| per slot, summed over the slots.
        per_token = golden.moe_unpermute(y[: len(order)].abs(), order, topk_weights.abs(), T)
        extra = UNIT_ROUNDOFF[ck.dtype_name] * float(per_token.max()) if per_token.numel() else 0.0
        tol = Tolerance(tol.atol + extra, tol.rtol, tol.atol_per_k, tol.override_reason)
    ck.close("out", out, golden.moe_unpermute(y[: len(order)], order, topk_weights, T), k=k, tol=tol)
    if case == "dropped-ids":
        ck.time(y, order_t, topk_weights, T)


GEMM_CASES = {
    "empty-groups": [3, 0, 5, 0, 0, 4],
    "one-group": [0, 0, 7, 0],
    "leading-trailing-empty": [0, 2, 3, 0],
    "no-rows": [0, 0, 0],
    "padding-rows": [2, 0, 3],  # 4 more rows than the groups hold (moe_permute's dropped rows)
}
PADDING_ROWS = {"padding-rows": 4}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_grouped_gemm(checker, dtype, device, case):
    ck = checker("grouped_gemm", case)
    gen = generator("grouped_gemm", case, dtype)
    sizes = GEMM_CASES[case]
    K, N = 48, 24
    M = sum(sizes) + PADDING_ROWS.get(case, 0)
    x = randn(gen, (M, K), ck.dtype, device)
    w = randn(gen, (len(sizes), N, K), ck.dtype, device, scale=K**-0.5)
    group_sizes = torch.tensor(sizes, dtype=torch.int64, device=device)
    out = ck.fn(x, w, group_sizes)
    ck.shape_dtype("out", out, (M, N), ck.dtype)
    ck.close("out", out[: sum(sizes)], golden.grouped_gemm(x[: sum(sizes)], w, sizes), k=K)  # padding: unspecified
    if case == "empty-groups":
        ck.time(x, w, group_sizes)


@pytest.mark.parametrize("case", ["dropped-ids", "idle-experts", "nothing-kept"])
def test_fused_experts(checker, dtype, device, case):
    ck = checker("fused_experts", case)
    gen = generator("fused_experts", case, dtype)
    ids, E = _topk_ids("dropped-ids")
    if case == "idle-experts":  # every token on experts 1 and 6 only
        ids = torch.where(ids >= 0, torch.where(ids % 2 == 0, 1, 6), ids)
    if case == "nothing-kept":  # every id dropped (all experts on other ranks): zeros
        ids = torch.full_like(ids, -1)
    T, k = ids.shape
    D, inter = 32, 16
    x = randn(gen, (T, D), ck.dtype, device)
    w13 = randn(gen, (E, 2 * inter, D), ck.dtype, device, scale=D**-0.5)
    w2 = randn(gen, (E, D, inter), ck.dtype, device, scale=inter**-0.5)
    topk_weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)
    out = ck.fn(x, w13, w2, topk_weights, ids.to(device))
    ck.shape_dtype("out", out, (T, D), ck.dtype)
    ck.close("out", out, golden.fused_experts(x, w13, w2, topk_weights, ids), k=D)
    if case == "dropped-ids":
        ck.time(x, w13, w2, topk_weights, ids.to(device))
