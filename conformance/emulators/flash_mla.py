"""CPU emulation of FlashMLA's ``flash_mla_sparse_fwd`` (sparse prefill), in three API generations.

* current (``install_current``): deepseek-ai/FlashMLA 9241ae3 (2026-04-29),
  ``flash_mla/flash_mla_interface.py`` -- ``(q, kv, indices, sm_scale, d_v=512, attn_sink=None,
  topk_length=None)``; checks from ``csrc/api/sparse_fwd.h`` (d_qk 576/512, d_v 512, bf16/bf16/int32,
  shapes, last-dim contiguity, ``h_q`` exactly 64 or 128); semantics from ``tests/ref.py``
  (``ref_sparse_attn_fwd``): natural-log ``lse``, a query with no valid index gets ``out = 0`` and
  ``lse = +inf``. Since commit 082094b (2026-01-16); ``__version__`` stayed "1.0.0".
* legacy (``install_legacy``): FlashMLA before 082094b -- ``(q, kv, indices, sm_scale, d_v=512)``,
  "lse: 2-based log-sum-exp", heads a multiple of 64 (SM90 ``B_H = 64``).
* MACA (``install_maca``): MetaX-MACA/mcFlashMLA c2dbf6e (2026-07-06),
  ``flash_mla/flash_mla_interface.py`` -- ``(q, kv, indices, sm_scale, d_v=512,
  indices_all_valid_per_q=None)``, "lse: 2-based log-sum-exp", heads a multiple of 64.

All three process the top-k in blocks of ``B_TOPK = 64`` (``csrc/sm90/prefill/sparse/config.h``;
``num_topk_blocks = topk / B_TOPK`` in ``phase1.cuh``): index columns past the last whole block are
ignored, so a caller must pad top-k to a multiple of 64.
"""

from __future__ import annotations

import math
import types

import torch

from ._common import check, fill

B_TOPK = 64


def _sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, heads_ok, base2):
    check(q.dim() == 3 and kv.dim() == 3 and indices.dim() == 3, "sparse_prefill_fwd: q, kv, indices must be 3-D")
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[2]
    check(d_qk in (576, 512), f"Invalid d_qk: {d_qk}")
    check(d_v == 512, f"Invalid d_v{d_v}")
    check(
        q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16 and indices.dtype == torch.int32,
        "sparse_prefill_fwd: q, kv bfloat16 and indices int32",
    )
    check(kv.shape[2] == d_qk and indices.shape[:2] == (s_q, h_kv), "sparse_prefill_fwd: shape mismatch")
    check(
        q.stride(-1) == 1 and kv.stride(-1) == 1 and indices.stride(-1) == 1,
        "sparse_prefill_fwd: last dim must be contiguous",
    )
    check(h_kv == 1, "sparse_prefill_fwd: one kv head (MQA)")
    check(heads_ok(h_q), f"Unsupported h_q: {h_q}")
    if topk_length is not None:
        check(
            topk_length.dtype == torch.int32 and topk_length.shape == (s_q,),
            "sparse_prefill_fwd: topk_length int32 [s_q]",
        )
    used = topk // B_TOPK * B_TOPK  # whole 64-wide blocks only
    idx = indices[:, 0, :used].long()
    invalid = (idx < 0) | (idx >= s_kv)
    if topk_length is not None:
        invalid |= torch.arange(used)[None, :] >= topk_length.long()[:, None]
    gathered = kv[idx.clamp(0, max(s_kv - 1, 0)), 0].float()  # [s_q, used, d_qk]
    P = torch.einsum("shd,skd->shk", q.float(), gathered) * sm_scale
    P = P.masked_fill(invalid[:, None, :], float("-inf"))
    lse = torch.logsumexp(P, dim=-1) if used else torch.full((s_q, h_q), float("-inf"))
    max_logits = P.amax(dim=-1) if used else torch.full((s_q, h_q), float("-inf"))
    lonely = lse == float("-inf")
    p = torch.exp(P - lse.masked_fill(lonely, float("inf")).unsqueeze(-1))
    out = torch.einsum("shk,skd->shd", p, gathered[..., :d_v]).to(torch.bfloat16)
    lse = lse.masked_fill(lonely, float("inf"))
    if base2:
        lse = lse * math.log2(math.e)
        max_logits = max_logits * math.log2(math.e)
    return out, max_logits, lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Current FlashMLA: natural-log lse, h_q in {64, 128}."""
    check(attn_sink is None, "emulator: attn_sink is not emulated")
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, lambda h: h in (64, 128), base2=False)


def _legacy_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA before 082094b: base-2 lse, heads a multiple of 64."""
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, None, lambda h: h % 64 == 0, base2=True)


def _maca_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    indices_all_valid_per_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MetaX mcFlashMLA: base-2 lse, heads a multiple of 64."""
    if indices_all_valid_per_q is not None:
        check(
            indices_all_valid_per_q.dtype == torch.bool and indices_all_valid_per_q.shape == (q.shape[0], 1),
            "sparse_prefill_fwd: indices_all_valid_per_q is bool [s_q, 1]",
        )
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, None, lambda h: h % 64 == 0, base2=True)


def install_current(module: types.ModuleType) -> None:
    fill(module, "deepseek-ai/FlashMLA 9241ae3 (2026-04-29)", "1.0.0", flash_mla_sparse_fwd)


def install_legacy(module: types.ModuleType) -> None:
    _legacy_flash_mla_sparse_fwd.__name__ = "flash_mla_sparse_fwd"
    fill(module, "deepseek-ai/FlashMLA before 082094b (2026-01-16)", "1.0.0", _legacy_flash_mla_sparse_fwd)


def install_maca(module: types.ModuleType) -> None:
    _maca_flash_mla_sparse_fwd.__name__ = "flash_mla_sparse_fwd"
    fill(module, "MetaX-MACA/mcFlashMLA c2dbf6e (2026-07-06)", "1.0.0+maca", _maca_flash_mla_sparse_fwd)
