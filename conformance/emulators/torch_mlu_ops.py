"""CPU emulation of the ``torch_mlu_ops`` (tmo) functions the Cambricon adapters call.

Follows the Python API of torch_mlu_ops 1.12.1+torch2.11.0, ``torch_mlu_ops/_ops.py`` (read from the
public mirror miznchimaki/domesticated_torch_mlu_ops @9fbf7df, 2026-11-30): signatures, the "Math:"
blocks and the "Type:"/"Note:" limits of ``fused_rms_norm`` (limits "the same as fused_layer_norm"),
``apply_rotary``, ``moe_sigmoid_topk`` and ``group_gemm``. No torch_mlu_ops test suite is public (the
mirror ships the package without its tests), so the reference each function follows is the vendor's
own "Math:" block in its ``_ops.py`` docstring: ``fused_rms_norm`` (``x1 = x + bias + residual``,
``rmsnorm(x1) * gamma + beta``), ``apply_rotary`` (``input_rot * sin + input * cos`` over the rotary
dims; "cross" = GPT-J pairs, fold = NeoX halves), ``moe_sigmoid_topk`` (sigmoid, biased choice,
groups by top-2 sum with a bias, weights from the unbiased sigmoid) and ``group_gemm`` (per-group
``a_i @ b_i^T``); tests/test_emulators_vendor_refs.py checks vectors derived by hand from those blocks.
The kernels are opaque custom ops (``hwlayer_emu::tmo_*``): their value-reading checks run inside, so
FakeTensorMode sees only the adapter's code.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    store_output_before_norm: bool,
    quant_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dynamic_quant: bool = False,
    store_output_after_norm: bool = False,
    quant_type: torch.dtype = torch.int8,
    scale_type: torch.dtype = torch.float,
    mx_quant: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``x1 = x (+ bias) (+ residual)``; ``normed = rmsnorm(x1) * gamma (+ beta)``; returns ``normed``, or
    ``(normed, x1)`` with ``store_output_before_norm``. Types: x float/half/bfloat16, the rest "same as x"."""
    if quant_scale is not None or dynamic_quant or mx_quant or store_output_after_norm:
        raise NotImplementedError("emulator covers the unquantised fused_rms_norm")
    check(x.dtype in FLOAT_TYPES, "fused_rms_norm: x must be float, half or bfloat16")
    for name, t in (("residual", residual), ("gamma", gamma), ("beta", beta), ("bias", bias)):
        check(t is None or t.dtype == x.dtype, f"fused_rms_norm: {name} must have x's dtype")
    check(residual is None or residual.shape == x.shape, "fused_rms_norm: residual shape is x's")
    check(gamma is None or (gamma.dim() == 1 and gamma.shape[0] == x.shape[-1]), "fused_rms_norm: gamma shape is (C)")
    normed, x1 = _rms(x, residual, gamma, beta, bias, float(eps))
    if out is not None:
        out.copy_(normed)
        normed = out
    return (normed, x1) if store_output_before_norm else normed


def _rms_impl(x: torch.Tensor, residual: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x1 = x.to(torch.float32, copy=True)  # a new tensor: a custom op's output may not alias its input
    if bias is not None:
        x1 = x1 + bias.float()
    if residual is not None:
        x1 = x1 + residual.float()
    x1 = x1.to(x.dtype)
    xf = x1.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gamma is not None:
        normed = normed * gamma.float()
    if beta is not None:
        normed = normed + beta.float()
    return normed.to(x.dtype), x1


_rms = opaque("tmo_fused_rms_norm", _rms_impl, lambda x, residual, gamma, beta, bias, eps: (torch.empty_like(x),
                                                                                            torch.empty_like(x)))


def apply_rotary(
    input: torch.Tensor,
    sin_cache: torch.Tensor,
    cos_cache: torch.Tensor,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    interleaved: bool,
    discrete: bool,
    dynamic_ntk: bool,
    max_seqlen: int,
    output: torch.Tensor | None = None,
    is_inverse: bool = False,
) -> torch.Tensor:
    """``input_rot * sin_cache[position_ids] + input * cos_cache[position_ids]`` over the first
    ``rotary_dim`` columns, in place into ``output`` (default: ``input``). Types float/half/bfloat16,
    caches in input's dtype, int32 ids; head_size 2..256, rotary_dim even and <= head_size."""
    check(input.dtype in FLOAT_TYPES, "apply_rotary: input must be float, half or bfloat16")
    check(sin_cache.dtype == cos_cache.dtype == input.dtype, "apply_rotary: sin/cos caches have input's dtype")
    check(
        input.dim() in (3, 4),
        "apply_rotary: input is (batch, seq, head_num, head_size) or (total_seq, head_num, head_size)",
    )
    head_size, rot = input.shape[-1], sin_cache.shape[-1]
    check(2 <= head_size <= 256, f"apply_rotary: head_size must be between 2 and 256, got {head_size}")
    check(2 <= rot <= head_size and rot % 2 == 0, "apply_rotary: rope_dim even, between 2 and head_size")
    check(
        not dynamic_ntk and sin_cache.dim() == 2 and cos_cache.shape == sin_cache.shape,
        "apply_rotary: without dynamic_ntk the caches are (rotary_seq_len, rotary_dim)",
    )
    if not discrete or input.dim() != 3:
        raise NotImplementedError("emulator covers pack mode with discrete position_ids")
    check(
        position_ids is not None and position_ids.dtype == torch.int32 and position_ids.shape == (input.shape[0],),
        "apply_rotary: discrete position_ids are int32 (total_seq)",
    )
    check(cu_seqlens is None or cu_seqlens.dtype == torch.int32, "apply_rotary: cu_seqlens int32 (batch + 1)")
    target = input if output is None else output
    target.copy_(_rotary(input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved, is_inverse))
    return target


def _rotary_impl(input: torch.Tensor, sin_cache: torch.Tensor, cos_cache: torch.Tensor, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor | None, interleaved: bool, is_inverse: bool) -> torch.Tensor:
    check(cu_seqlens is None or int(cu_seqlens[-1]) == input.shape[0], "apply_rotary: cu_seqlens ends at total_seq")
    rot = sin_cache.shape[-1]
    sign = -1.0 if is_inverse else 1.0
    sin = (sign * sin_cache[position_ids.long()].float())[:, None, :]
    cos = cos_cache[position_ids.long()].float()[:, None, :]
    x = input.float()
    x_rot = x[..., :rot]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    result = x.clone()
    result[..., :rot] = rotated * sin + x_rot * cos
    return result.to(input.dtype)


_rotary = opaque("tmo_apply_rotary", _rotary_impl,
                 lambda input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved, is_inverse:
                 torch.empty_like(input))


def moe_sigmoid_topk(
    input: torch.Tensor,
    topk: int,
    normalize: bool = False,
    num_expert_group: int = -1,
    topk_group: int = 0,
    mask: torch.Tensor | None = None,
    normed_by: str = "topk_logit",
    route_scale: float = 1.0,
    score_bias: torch.Tensor | None = None,
    reduce_weight: torch.Tensor | None = None,
    expert_id: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstring's Math: sigmoid, ``score_bias`` for choice, groups scored by top-2 sum (with a
    bias) or max (without), weights from the unbiased sigmoid, optional ``topk_logit`` normalisation,
    times ``route_scale``. ``score_bias`` must have input's number of dims; input contiguous."""
    check(
        input.dtype in FLOAT_TYPES and input.is_contiguous(), "moe_sigmoid_topk: contiguous float/half/bfloat16 input"
    )
    check(
        mask is None or (mask.dtype == input.dtype and mask.dim() == input.dim()), "moe_sigmoid_topk: mask like input"
    )
    check(
        normed_by in ("topk_logit", "sigmoid_logit"),
        f"moe_sigmoid_topk: normed_by must be topk_logit or sigmoid_logit, got {normed_by!r}",
    )
    check(
        score_bias is None
        or (
            isinstance(score_bias, torch.Tensor) and score_bias.dim() == input.dim() and score_bias.dtype in FLOAT_TYPES
        ),
        "moe_sigmoid_topk: score_bias shape is (..., expert_num) with input's number of dims",
    )
    if num_expert_group > 1:
        check(input.shape[-1] % num_expert_group == 0 and 1 <= topk_group <= num_expert_group,
              "moe_sigmoid_topk: group arguments")
    weights, ids = _sigmoid_topk(input, topk, normalize, num_expert_group, topk_group, mask, normed_by,
                                 float(route_scale), score_bias)
    rw = reduce_weight if reduce_weight is not None else torch.empty(weights.shape, dtype=torch.float32)
    ei = expert_id if expert_id is not None else torch.empty(ids.shape, dtype=torch.int32)
    rw.copy_(weights)
    ei.copy_(ids)
    return rw, ei


def _sigmoid_topk_impl(input: torch.Tensor, topk: int, normalize: bool, num_expert_group: int, topk_group: int,
                       mask: torch.Tensor | None, normed_by: str, route_scale: float,
                       score_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    E = input.shape[-1]
    sig = torch.sigmoid(input.float())
    if num_expert_group <= 1:
        if mask is not None:
            sig = sig * mask.float()
        original = sig
        choice = sig + score_bias.float() if score_bias is not None else sig
        ids = choice.topk(topk, dim=-1).indices
    else:
        original = sig
        choice = sig + score_bias.float() if score_bias is not None else sig
        grouped = choice.view(*choice.shape[:-1], num_expert_group, E // num_expert_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if score_bias is not None else grouped.amax(-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, keep, True)
        choice = grouped.masked_fill(~gmask[..., None], float("-inf")).reshape(choice.shape)
        ids = choice.topk(topk, dim=-1).indices
    weights = original.gather(-1, ids)
    if normalize:
        denom = weights.sum(-1, keepdim=True) if normed_by == "topk_logit" else original.sum(-1, keepdim=True)
        weights = weights / denom
    return (weights * route_scale).float(), ids.to(torch.int32)


def _sigmoid_topk_fake(input, topk, normalize, num_expert_group, topk_group, mask, normed_by, route_scale, score_bias):
    shape = (*input.shape[:-1], topk)
    return input.new_empty(shape, dtype=torch.float32), input.new_empty(shape, dtype=torch.int32)


_sigmoid_topk = opaque("tmo_moe_sigmoid_topk", _sigmoid_topk_impl, _sigmoid_topk_fake)


def group_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    group_list: torch.Tensor,
    expand_idx: torch.Tensor | None,
    c: torch.Tensor | None,
    alpha: torch.Tensor | None,
    beta: torch.Tensor | None,
    max_in_group_list: int,
    bias: torch.Tensor | None = None,
    d: torch.Tensor | None = None,
    trans_a: bool | None = False,
    trans_b: bool | None = True,
    tile_config: dict | None = None,
    idx_offset: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``d[rows of i] = a[rows of i] @ b[i]^T`` (trans_b) for ``(m_list, k) x (experts, n, k)``;
    ``max_in_group_list`` is "Maximum possible value in group_list" (required). Types half/bfloat16/
    float, b same as a, group_list int32."""
    if expand_idx is not None or c is not None or alpha is not None or beta is not None or bias is not None or trans_a:
        raise NotImplementedError("emulator covers plain (m_list, k) x (experts, n, k) group_gemm")
    check(a.dtype in FLOAT_TYPES and b.dtype == a.dtype, "group_gemm: a half/bfloat16/float, b same as a")
    check(group_list.dtype == torch.int32 and group_list.dim() == 1, "group_gemm: group_list is int32 (experts)")
    check(
        a.dim() == 2 and b.dim() == 3 and group_list.shape[0] == b.shape[0], "group_gemm: a (m, k), b (experts, n, k)"
    )
    k_axis = 2 if trans_b else 1
    check(b.shape[k_axis] == a.shape[1], "group_gemm: k of a and b differ")
    result = _group_gemm(a, b, group_list, int(max_in_group_list), bool(trans_b), output_dtype or a.dtype)
    if d is not None:
        d.copy_(result)
        return d
    return result


def _group_gemm_impl(a: torch.Tensor, b: torch.Tensor, group_list: torch.Tensor, max_in_group_list: int,
                     trans_b: bool, output_dtype: torch.dtype) -> torch.Tensor:
    counts = [int(v) for v in group_list.tolist()]
    check(sum(counts) == a.shape[0], "group_gemm: group_list must sum to a's rows")
    check(max(counts, default=0) <= max_in_group_list, "group_gemm: max_in_group_list below a value in group_list")
    n = b.shape[1] if trans_b else b.shape[2]
    out = torch.empty(a.shape[0], n, dtype=output_dtype)
    start = 0
    for i, m in enumerate(counts):
        w = b[i].float().T if trans_b else b[i].float()
        out[start : start + m] = (a[start : start + m].float() @ w).to(out.dtype)
        start += m
    return out


_group_gemm = opaque(
    "tmo_group_gemm", _group_gemm_impl,
    lambda a, b, group_list, max_in_group_list, trans_b, output_dtype: a.new_empty(
        a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=output_dtype))


def install(module: types.ModuleType) -> None:
    fill(
        module,
        "torch_mlu_ops 1.12.1+torch2.11.0 _ops.py (mirror miznchimaki/domesticated_torch_mlu_ops @9fbf7df)",
        "1.12.1+emulated",
        fused_rms_norm,
        apply_rotary,
        moe_sigmoid_topk,
        group_gemm,
    )
