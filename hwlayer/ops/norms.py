"""Normalisation: ``rms_norm`` (optionally fused with the residual add) and ``layer_norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import FLOAT_DTYPES, check_tensor


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally fused with a residual add.

    ``x``: ``[..., D]`` float; ``weight``: ``[D]``. Computes in fp32
    ``weight * x * rsqrt(mean(x^2) + eps)`` and returns ``x.dtype``. With ``residual`` (same
    shape and dtype as ``x``) it first forms ``s = x + residual`` in ``x.dtype`` and returns
    ``(rms_norm(s), s)``: the normalised value and the new residual (vLLM ``fused_add_rms_norm``,
    Ascend ``npu_add_rms_norm``). Inputs are not modified.
    """
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("rms_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if residual is not None:
        check_tensor("rms_norm", "residual", residual, dtypes=(x.dtype,), shape=list(x.shape))
        x = x + residual
    # torch's rms_norm on the fp32 copy is x * rsqrt(mean(x^2) + eps) in one call; the weight is
    # applied here (promoted to fp32) so the one rounding to x.dtype comes last on every torch version.
    y = (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight).to(x.dtype)
    return (y, x) if residual is not None else y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, returned in ``x.dtype``. ``weight``/``bias``: ``[D]``
    (bias may be None). Used by the DSA indexer's key norm (eps 1e-6)."""
    check_tensor("layer_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("layer_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if bias is not None:
        check_tensor("layer_norm", "bias", bias, ndim=1, shape=[x.shape[-1]])
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)
