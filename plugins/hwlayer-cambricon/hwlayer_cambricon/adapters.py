"""hwlayer ops on torch_mlu_ops (``tmo``): each adapter converts arguments, calls tmo, converts back.

Written against the Python API of torch_mlu_ops 1.12.1+torch2.11.0 (``torch_mlu_ops/_ops.py``:
signatures, "Math:", "Type:" and "Note:" sections of ``fused_rms_norm``, ``apply_rotary``,
``moe_sigmoid_topk`` and ``group_gemm``; read from the public mirror
miznchimaki/domesticated_torch_mlu_ops @9fbf7df) and Cambricon's integrations (dlinfer, vllm-mlu);
NOT run on hardware. CI runs the adapters against CPU emulators of that API (hwlayer's
``conformance/emulators/torch_mlu_ops.py``, ``pytest conformance --backend cambricon --emulated``).
Each adapter sits behind a ``supports_*`` guard and every declined call runs hwlayer's generic torch
implementation. Optional arguments are passed by keyword so a positional slip (``mask`` where the
scaling factor was meant) cannot happen.

fp32: the 1.12.1 docstrings list "float, half, bfloat16" for ``fused_rms_norm`` (limits "the same as
fused_layer_norm") and ``apply_rotary``, and "half, bfloat16, float" for ``group_gemm``, so fp32 is
accepted (a review quoting the TORCH_MLU_OPS manual as fp16/bf16-only for the first two is not
borne out by this release's own API docs).
"""

from __future__ import annotations

from types import ModuleType

import torch

from hwlayer import plugin
from hwlayer.ops.layout import groups_covering_rows

from . import convert

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *HALF_DTYPES)


_import = plugin.lazy_import  # (module, "") or (None, one-line reason)


def tmo() -> ModuleType:
    mod, why = _import("torch_mlu_ops")
    if mod is None:
        raise RuntimeError(why)
    return mod


def device_type() -> str:
    """``mlu``, or ``cpu`` under hwlayer's test-only emulation of this backend."""
    return plugin.device_type("cambricon", "mlu")


def _common(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> bool | str:
    """Checks every adapter shares: tmo importable, tensor on an MLU, dtype, contiguous."""
    _, why = _import("torch_mlu_ops")
    if why:
        return why
    if x.device.type != device_type():
        return f"tensor on {x.device.type}, torch_mlu_ops needs mlu tensors"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} not supported by this tmo kernel"
    if not x.is_contiguous():
        return "non-contiguous input"
    return True


# ---- rms_norm: tmo.fused_rms_norm(x, residual, gamma, beta, bias, eps, store_output_before_norm,
#      quant_scale=None, out=None, ...); gamma/residual "same as x"


def supports_rms_norm(x, weight, eps, residual=None) -> bool | str:
    ok = _common(x)
    if ok is not True:
        return ok
    if residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()):
        return "residual must match x's dtype and be contiguous"
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x dtype {x.dtype}"
    return True


def rms_norm(x, weight, eps, residual=None):
    rows = convert.rms_norm_rows(x)
    if residual is None:
        y = tmo().fused_rms_norm(rows, None, weight, None, None, eps, False)
        return y.view(x.shape)
    # store_output_before_norm=True returns (normed, x + residual): hwlayer's (y, new residual).
    y, summed = tmo().fused_rms_norm(rows, convert.rms_norm_rows(residual), weight, None, None, eps, True)
    return y.view(x.shape), summed.view(x.shape)


# ---- rope: tmo.apply_rotary(input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved,
#      discrete, dynamic_ntk, max_seqlen, output=None, is_inverse=False); in place into input


def supports_rope(x, positions, cos_sin_cache, interleaved, *, meta=None) -> bool | str:
    ok = _common(x)
    if ok is not True:
        return ok
    if not 2 <= x.shape[-1] <= 256:
        return f"head size {x.shape[-1]}: apply_rotary takes 2..256"
    return True


def rope(x, positions, cos_sin_cache, interleaved, *, meta=None):
    if meta is not None and meta.rope_cos is not None and meta.cos_sin_cache is cos_sin_cache:
        # The step's rope rows (gathered once per step for every layer): token t reads row t.
        cos, sin = convert.rows_from_meta(meta.rope_cos, meta.rope_sin, interleaved)
        positions = torch.arange(x.shape[0], device=x.device)
    else:
        cos, sin = convert.rope_tables(cos_sin_cache, interleaved)  # built once per cos/sin cache
    position_ids, cu_seqlens, max_seqlen = convert.packed_rope_args(positions)
    # apply_rotary wants the caches in input's dtype; cos/sin rounded to bf16/fp16 would move the
    # result beyond the contract (which rotates with fp32 tables), so it runs on an fp32 copy (float
    # is a documented input type). The copy also keeps the in-place op off the caller's tensor.
    packed = (x if x.dim() == 3 else x.unsqueeze(1)).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    out = tmo().apply_rotary(packed, sin, cos, position_ids, cu_seqlens,
                             interleaved, True, False, max_seqlen)  # discrete ids, no dynamic NTK
    out = packed if out is None else out
    return out.to(x.dtype).view(x.shape)


# ---- moe_route: tmo.moe_sigmoid_topk(input, topk, normalize=False, num_expert_group=-1, topk_group=0,
#      mask=None, normed_by="topk_logit", route_scale=1.0, score_bias=None, ...) -> (weights, ids)


def supports_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize,
                       routed_scaling_factor) -> bool | str:
    ok = _common(router_logits)
    if ok is not True:
        return ok
    if correction_bias is not None and correction_bias.device != router_logits.device:
        return "correction_bias on another device"
    num_expert_group, _ = convert.routing_group_args(n_group, topk_group)
    if num_expert_group > 1 and correction_bias is None:
        # tmo scores a group by its max without a score_bias, by its top-2 sum with one; the contract
        # always uses the top-2 sum.
        return "grouped routing without a correction bias: tmo ranks groups by max, the contract by top-2 sum"
    return True


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    num_expert_group, groups_kept = convert.routing_group_args(n_group, topk_group)
    # score_bias: "Shape is (..., expert_num), the dimension must be the same as input".
    bias = correction_bias.float().unsqueeze(0) if correction_bias is not None else None
    weights, ids = tmo().moe_sigmoid_topk(router_logits, top_k, normalize=renormalize,
                                          num_expert_group=num_expert_group, topk_group=groups_kept,
                                          route_scale=routed_scaling_factor, score_bias=bias)
    return weights.float(), ids.to(torch.int32)


# ---- grouped_gemm: tmo.group_gemm(a, b, group_list, expand_idx, c, alpha, beta, max_in_group_list,
#      bias=None, d=None, trans_a=False, trans_b=True, ...); max_in_group_list is required


def supports_grouped_gemm(x, w, group_sizes) -> bool | str:
    ok = _common(x)  # "a: half, bfloat16, float"
    if ok is not True:
        return ok
    if w.dtype != x.dtype or not w.is_contiguous():
        return "w must be contiguous with x's dtype"
    return True


def grouped_gemm(x, w, group_sizes):
    # w is [E, N, K] (nn.Linear layout) = "(experts, n, k)" with trans_b=True. max_in_group_list is
    # "Maximum possible value in group_list": the row count bounds it without reading the counts.
    # group_gemm wants counts covering every row: grouped_gemm's padding rows join the last group.
    counts = convert.group_counts(groups_covering_rows(group_sizes, x.shape[0]))
    return tmo().group_gemm(x, w, counts, None, None, None, None, x.shape[0])
