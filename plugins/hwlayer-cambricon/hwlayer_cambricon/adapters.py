"""hwlayer ops on torch_mlu_ops (``tmo``): each adapter converts arguments, calls tmo, converts back.

Written against the torch_mlu_ops API as used by Cambricon's own integrations (dlinfer's camb
vendor ops, vllm-mlu), NOT run on hardware: signatures change between tmo releases, so each
adapter sits behind a ``supports_*`` guard and every declined call runs hwlayer's generic torch
implementation. Positional argument orders below are the ones those call sites use; keyword
names marked "unverified" were seen in only one source.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

import torch

from . import convert

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *HALF_DTYPES)


@cache
def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a vendor runtime that fails to initialise
        return None, f"{name} is not importable ({type(exc).__name__}: {exc})"


def tmo() -> ModuleType:
    mod, why = _import("torch_mlu_ops")
    if mod is None:
        raise RuntimeError(why)
    return mod


def _common(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> bool | str:
    """Checks every adapter shares: tmo importable, tensor on an MLU, dtype, contiguous."""
    _, why = _import("torch_mlu_ops")
    if why:
        return why
    if x.device.type != "mlu":
        return f"tensor on {x.device.type}, torch_mlu_ops needs mlu tensors"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} not supported by this tmo kernel"
    if not x.is_contiguous():
        return "non-contiguous input"
    return True


# ---- rms_norm: tmo.fused_rms_norm(x, residual, gamma, beta, bias, eps, store_output_before_norm, quant_scale)


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
        y = tmo().fused_rms_norm(rows, None, weight, None, None, eps, False, None)
        return y.view(x.shape)
    # store_output_before_norm=True returns (normed, x + residual): hwlayer's (y, new residual).
    y, summed = tmo().fused_rms_norm(rows, convert.rms_norm_rows(residual), weight, None, None, eps, True, None)
    return y.view(x.shape), summed.view(x.shape)


# ---- rope: tmo.apply_rotary(x, sin, cos, position_ids, cu_seqlens, interleaved, discrete, dynamic_ntk, max_seqlen)


def supports_rope(x, positions, cos_sin_cache, interleaved) -> bool | str:
    ok = _common(x)
    if ok is not True:
        return ok
    if x.dim() not in (2, 3) or x.shape[-1] % 2:
        return f"x shape {tuple(x.shape)}: need [T, D] or [T, H, D] with even D"
    return True


def rope(x, positions, cos_sin_cache, interleaved):
    cos, sin = convert.rope_full_tables(cos_sin_cache, interleaved)
    position_ids, cu_seqlens, max_seqlen = convert.packed_rope_args(positions)
    packed = (x if x.dim() == 3 else x.unsqueeze(1)).clone()  # tmo may rotate in place; the contract returns new
    out = tmo().apply_rotary(packed, sin.to(x.dtype), cos.to(x.dtype), position_ids, cu_seqlens,
                             interleaved, True, False, max_seqlen)
    out = packed if out is None else out
    return out.view(x.shape)


# ---- moe_route: tmo.moe_sigmoid_topk(logits, top_k, renormalize, num_expert_group, topk_group,
#                                      routed_scaling_factor, e_score_correction_bias) -> (weights, ids)


def supports_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize,
                       routed_scaling_factor) -> bool | str:
    ok = _common(router_logits)
    if ok is not True:
        return ok
    if correction_bias is not None and correction_bias.device != router_logits.device:
        return "correction_bias on another device"
    return True


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    num_expert_group, groups_kept = convert.routing_group_args(n_group, topk_group)
    bias = correction_bias.float() if correction_bias is not None else None
    weights, ids = tmo().moe_sigmoid_topk(router_logits, top_k, renormalize, num_expert_group, groups_kept,
                                          routed_scaling_factor, bias)
    return weights.float(), ids.to(torch.int32)


# ---- grouped_gemm: tmo.group_gemm(a, b, m_list, expand_idx=None, c=None, alpha=None, beta=None)


def supports_grouped_gemm(x, w, group_sizes) -> bool | str:
    ok = _common(x, HALF_DTYPES)  # fp32 grouped GEMM in tmo: unverified, so declined
    if ok is not True:
        return ok
    if w.dtype != x.dtype or not w.is_contiguous():
        return "w must be contiguous with x's dtype"
    return True


def grouped_gemm(x, w, group_sizes):
    # w is [E, N, K] (nn.Linear layout); dlinfer passes the same layout without trans flags.
    return tmo().group_gemm(x, w, convert.group_counts(group_sizes), expand_idx=None, c=None, alpha=None, beta=None)
