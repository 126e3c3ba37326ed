"""CPU emulation of DeepGEMM's MQA-logits entry points used by the indexer adapters.

* NVIDIA (``install_nvidia``): deepseek-ai/DeepGEMM 54e2261 (2026-06-23), ``csrc/apis/attention.hpp``:
  legacy ``fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True,
  max_seqlen_k=0)`` with ``kv = (kv_fp8 [N, D] e4m3, kv_scale fp32 [N])``; checks: q e4m3
  contiguous ``[M, H, D]`` with H in {32, 64} (SM90) and D in {32, 64, 128}, weights fp32 ``[M, H]``,
  int32 contiguous ranges. Semantics from DeepGEMM's own test reference
  ``tests/test_attention.py::ref_fp8_mqa_logits`` (at 54e2261): ``score = einsum("mhd,nd->hmn", q, k)``,
  ``logits = (score.relu() * weights.T[..., None]).sum(0)``, ``-inf`` outside ``[ks, ke)`` (with
  ``k = kv_fp8 * kv_scale``; the kernel cleans with ``clean_logits``). tests/test_emulators_vendor_refs.py
  checks the emulator against vectors derived from that reference.
* MACA (``install_maca``): the same plus ``bf16_mqa_logits(q, kv, weights, cu_seqlen_ks,
  cu_seqlen_ke)`` as vLLM-metax 3aadf08 (2026-08-05) calls it (``vllm_metax/utils/deep_gemm.py``,
  ``registry/custom_ops/layers/sparse_attn_indexer/bf16.py``): bf16 q ``[M, H, D]``, bf16 keys
  ``[N, D]`` (no scale), fp32 weights, fp32 logits ``[M, N]``.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque


def _logits_impl(
    q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None, weights: torch.Tensor, ks: torch.Tensor,
    ke: torch.Tensor, clean: bool,
) -> torch.Tensor:
    """``ref_fp8_mqa_logits`` (DeepGEMM tests/test_attention.py), over key chunks to bound memory."""
    kf = k.float() if k_scale is None else k.float() * k_scale[:, None]
    qf, w = q.float(), weights.float()
    logits = torch.empty(q.shape[0], k.shape[0], dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, q.shape[0] * q.shape[1]))
    for n0 in range(0, k.shape[0], step):
        n1 = min(k.shape[0], n0 + step)
        score = torch.einsum("mhd,nd->hmn", qf, kf[n0:n1])
        logits[:, n0:n1] = (score.relu() * w.transpose(0, 1).unsqueeze(-1)).sum(dim=0)
    if clean:
        cols = torch.arange(k.shape[0])
        inside = (cols[None, :] >= ks.long()[:, None]) & (cols[None, :] < ke.long()[:, None])
        logits = logits.masked_fill(~inside, float("-inf"))
    return logits


def _logits_fake(q, k, k_scale, weights, ks, ke, clean):
    return q.new_empty(q.shape[0], k.shape[0], dtype=torch.float32)


# The kernel: an opaque custom op (FakeTensorMode sees its output shape, not its internals).
_logits_op = opaque("deep_gemm_mqa_logits", _logits_impl, _logits_fake)


def _logits(q, k, weights, ks, ke, clean, k_scale=None):
    return _logits_op(q, k, k_scale, weights, ks, ke, clean)


def _check_ranges(seq_len: int, ks: torch.Tensor, ke: torch.Tensor) -> None:
    for name, t in (("cu_seq_len_k_start", ks), ("cu_seq_len_k_end", ke)):
        check(
            t.shape == (seq_len,) and t.is_contiguous() and t.dtype == torch.int32,
            f"{name}: contiguous int32 [seq_len]",
        )


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    check(
        q.dim() == 3 and q.is_contiguous() and q.dtype == torch.float8_e4m3fn,
        "fp8_mqa_logits: q is contiguous e4m3 [M, H, D]",
    )
    seq_len, num_heads, head_dim = q.shape
    check(num_heads in (32, 64), f"fp8_mqa_logits: num_heads must be 32 or 64 on SM90, got {num_heads}")
    check(head_dim in (32, 64, 128), f"fp8_mqa_logits: head_dim must be 32, 64 or 128, got {head_dim}")
    kv_fp8, kv_sf = kv
    check(
        kv_fp8.dim() == 2
        and kv_fp8.shape[1] == head_dim
        and kv_fp8.is_contiguous()
        and kv_fp8.dtype == torch.float8_e4m3fn,
        "fp8_mqa_logits: kv is contiguous e4m3 [N, D]",
    )
    check(
        kv_sf.shape == (kv_fp8.shape[0],) and kv_sf.is_contiguous() and kv_sf.dtype == torch.float32,
        "fp8_mqa_logits: kv scale is contiguous fp32 [N]",
    )
    check(
        weights.shape == (seq_len, num_heads) and weights.stride(1) == 1 and weights.dtype == torch.float32,
        "fp8_mqa_logits: weights fp32 [M, H]",
    )
    _check_ranges(seq_len, cu_seq_len_k_start, cu_seq_len_k_end)
    check(max_seqlen_k == 0 or not clean_logits, "fp8_mqa_logits: clean_logits is not supported with max_seqlen_k")
    check(max_seqlen_k == 0, "emulator: compressed logits (max_seqlen_k > 0) are not emulated")
    return _logits(q, kv_fp8, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, kv_sf)


def bf16_mqa_logits(
    q: torch.Tensor,
    kv: torch.Tensor,
    weights: torch.Tensor,
    cu_seqlen_ks: torch.Tensor,
    cu_seqlen_ke: torch.Tensor,
) -> torch.Tensor:
    check(
        q.dim() == 3 and q.dtype == torch.bfloat16 and q.is_contiguous(),
        "bf16_mqa_logits: q is contiguous bf16 [M, H, D]",
    )
    check(
        isinstance(kv, torch.Tensor) and kv.dim() == 2 and kv.dtype == torch.bfloat16 and kv.shape[1] == q.shape[2],
        "bf16_mqa_logits: kv is a bf16 [N, D] tensor (no scale tuple)",
    )
    check(weights.shape == q.shape[:2] and weights.dtype == torch.float32, "bf16_mqa_logits: weights fp32 [M, H]")
    _check_ranges(q.shape[0], cu_seqlen_ks, cu_seqlen_ke)
    return _logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean=True)


def install_nvidia(module: types.ModuleType) -> None:
    fill(module, "deepseek-ai/DeepGEMM 54e2261 (2026-06-23)", "2.x", fp8_mqa_logits)


def install_maca(module: types.ModuleType) -> None:
    fill(module, "MACA deep_gemm as vLLM-metax 3aadf08 (2026-08-05) calls it", "maca", fp8_mqa_logits, bf16_mqa_logits)
