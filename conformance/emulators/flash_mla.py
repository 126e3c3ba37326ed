"""CPU emulation of FlashMLA's ``flash_mla_sparse_fwd`` (sparse prefill), in three API generations.

Semantics follow FlashMLA's own test reference, ``tests/ref.py::ref_sparse_attn_fwd``
(deepseek-ai/FlashMLA, stored at a123d0b): an index ``< 0`` or ``>= s_kv`` (or past ``topk_length``)
is invalid; ``P = q @ kv^T * sm_scale`` masked to ``-inf``; ``lse = logsumexp(P)`` (natural log);
``max_logits = max(P)``; a query with no valid index gets ``out = 0`` and ``lse = +inf``
(``lonely_q_mask``). tests/test_emulators_vendor_refs.py checks this emulator against vectors derived
from that reference by hand.

* current (``install_current``): deepseek-ai/FlashMLA 9241ae3 (2026-04-29),
  ``flash_mla/flash_mla_interface.py`` -- ``(q, kv, indices, sm_scale, d_v=512, attn_sink=None,
  topk_length=None)``; checks from ``csrc/api/sparse_fwd.h`` (``sparse_attn_prefill_interface``):
  the GPU must be sm90a or sm100f ("Sparse Attention Forward Kernel is only supported on SM90a and
  SM100f architectures"; the emulated capability is ``hwlayer_emulation.CUDA_CAPABILITY``, 9.0 unless
  a test sets another), d_qk 576/512, d_v 512, bf16/bf16/int32, shapes, last-dim contiguity, ``h_q``
  exactly 64 or 128; and from the kernels: ``topk > 0`` and, on SM90, ``topk % (2 * B_TOPK) == 0``
  with B_TOPK 64 (``csrc/sm90/prefill/sparse/phase1.cuh``, ``KernelTemplate::run``: ``KU_ASSERT``);
  SM100 kernels take multiples of their B_TOPK (64 for 64 heads, 128 for 128). A partial last block
  raises here, as the kernel's assert does, instead of being silently dropped.
* legacy (``install_legacy``): FlashMLA before 082094b -- ``(q, kv, indices, sm_scale, d_v=512)``,
  "lse: 2-based log-sum-exp", heads a multiple of 64 (SM90 ``B_H = 64``); the same top-k rule is
  assumed (not checked against that generation's kernel).
* MACA (``install_maca``): MetaX-MACA/mcFlashMLA c2dbf6e (2026-07-06),
  ``flash_mla/flash_mla_interface.py`` -- ``(q, kv, indices, sm_scale, d_v=512,
  indices_all_valid_per_q=None)``, heads a multiple of 64, partial top-k blocks handled. Its lse is
  the NATURAL log: the kernel writes ``row_max * softmax_scale + __logf(sum)`` with the natural
  ``softmax_scale`` (``csrc/flash_kernel/feature/softmax.h:450``, ``Softmax::normalize_softmax_lse``;
  an empty row gets ``+inf``), although the interface docstring says "2-based"; the kernel wins. No
  NVIDIA architecture rule.
* DCU (``install_dcu``): the Hygon DCU build as HYGON-AI/vllm-plugin-das (vllm_hcu) calls it --
  ``flash_mla.flash_mla_interface.flash_mla_sparse_fwd(q, kv, indices, sm_scale, topk_length=...)``
  (``vllm_hcu/v1/attention/ops/flashmla.py``@0e048c7 imports it from ``flash_mla.flash_mla_interface``;
  ``v1/attention/backends/mla/flashmla_sparse.py``@063db5d passes ``topk_length`` and feeds the returned
  lse to vLLM's cross-rank (DCP) merge, which takes a natural-log lse). The DCU kernel's source is not
  public (no Hygon FlashMLA repository found), so its lse base is the NATURAL log on that evidence, not
  checked in a kernel. Heads 64 or 128 (vLLM's ``FlashMLASparseImpl``, which vllm_hcu subclasses, pads
  to those); top-k in whole blocks of 128 and no architecture rule (both assumed, not verified).

The kernel itself is an opaque custom op (``hwlayer_emu::flash_mla_sparse_prefill``) with a fake
kernel: the argument checks above run on shapes only, so FakeTensorMode sees just the adapter.
"""

from __future__ import annotations

import math
import sys
import types

import torch

from ._common import check, fill, opaque

B_TOPK = 64
SM90_TOPK_MULTIPLE = 2 * B_TOPK  # phase1.cuh: KU_ASSERT(params.topk % (2*B_TOPK) == 0)


def _capability() -> tuple[int, int]:
    return getattr(sys.modules.get("hwlayer_emulation"), "CUDA_CAPABILITY", (9, 0))


def _prefill_impl(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
    topk_length: torch.Tensor | None, base2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ref_sparse_attn_fwd`` (FlashMLA tests/ref.py), in chunks of query rows to bound memory."""
    s_q, h_q, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[2]
    out = torch.empty(s_q, h_q, d_v, dtype=torch.bfloat16)
    lse = torch.empty(s_q, h_q, dtype=torch.float32)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, topk * d_qk))
    for r0 in range(0, s_q, step):
        r1 = min(s_q, r0 + step)
        idx = indices[r0:r1, 0].long()
        invalid = (idx < 0) | (idx >= s_kv)
        if topk_length is not None:
            invalid |= torch.arange(topk)[None, :] >= topk_length[r0:r1].long()[:, None]
        gathered = kv[idx.masked_fill(invalid, 0), 0].float()  # [rows, topk, d_qk]
        P = torch.bmm(q[r0:r1].float(), gathered.transpose(1, 2)) * sm_scale
        P.masked_fill_(invalid[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(P, dim=-1)
        lonely = row_lse == float("-inf")
        p = torch.exp(P - row_lse.masked_fill(lonely, float("inf")).unsqueeze(-1))
        out[r0:r1] = torch.bmm(p, gathered[..., :d_v]).to(torch.bfloat16)
        max_logits[r0:r1] = P.amax(dim=-1)
        lse[r0:r1] = row_lse.masked_fill(lonely, float("inf"))
    if base2:
        lse, max_logits = lse * math.log2(math.e), max_logits * math.log2(math.e)
    return out, max_logits, lse


def _prefill_fake(q, kv, indices, sm_scale, d_v, topk_length, base2):
    s_q, h_q, _ = q.shape
    return (q.new_empty(s_q, h_q, d_v, dtype=torch.bfloat16), q.new_empty(s_q, h_q, dtype=torch.float32),
            q.new_empty(s_q, h_q, dtype=torch.float32))


_prefill = opaque("flash_mla_sparse_prefill", _prefill_impl, _prefill_fake)


def _sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, heads_ok, topk_multiple, base2, nvidia):
    if nvidia:
        cap = _capability()
        check(cap == (9, 0) or cap[0] == 10,
              "Sparse Attention Forward Kernel is only supported on SM90a and SM100f architectures.")
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
    check(topk > 0, "KU_ASSERT(params.topk > 0)")
    multiple = topk_multiple(h_q)
    check(multiple is None or topk % multiple == 0, f"KU_ASSERT(params.topk % {multiple} == 0): topk is {topk}")
    if topk_length is not None:
        check(
            topk_length.dtype == torch.int32 and topk_length.shape == (s_q,),
            "sparse_prefill_fwd: topk_length int32 [s_q]",
        )
    return _prefill(q, kv, indices, float(sm_scale), int(d_v), topk_length, base2)


def _nvidia_topk_multiple(h_q: int) -> int:
    """SM90: 2 * B_TOPK = 128 (phase1.cuh); SM100: the kernel's B_TOPK (64 for 64 heads, 128 for 128)."""
    if _capability()[0] == 10:
        return 64 if h_q == 64 else 128
    return SM90_TOPK_MULTIPLE


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Current FlashMLA: natural-log lse, h_q in {64, 128}, sm90a/sm100f, top-k in whole blocks."""
    check(attn_sink is None, "emulator: attn_sink is not emulated")
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, lambda h: h in (64, 128),
                           _nvidia_topk_multiple, base2=False, nvidia=True)


def _legacy_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA before 082094b: base-2 lse, heads a multiple of 64."""
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, None, lambda h: h % 64 == 0, _nvidia_topk_multiple,
                           base2=True, nvidia=True)


def _maca_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    indices_all_valid_per_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MetaX mcFlashMLA: natural-log lse (softmax.h:450), heads a multiple of 64, any top-k > 0."""
    if indices_all_valid_per_q is not None:
        check(
            indices_all_valid_per_q.dtype == torch.bool and indices_all_valid_per_q.shape == (q.shape[0], 1),
            "sparse_prefill_fwd: indices_all_valid_per_q is bool [s_q, 1]",
        )
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, None, lambda h: h % 64 == 0, lambda h: None,
                           base2=False, nvidia=False)


def install_current(module: types.ModuleType) -> None:
    fill(module, "deepseek-ai/FlashMLA 9241ae3 (2026-04-29)", "1.0.0", flash_mla_sparse_fwd)


def install_legacy(module: types.ModuleType) -> None:
    _legacy_flash_mla_sparse_fwd.__name__ = "flash_mla_sparse_fwd"
    fill(module, "deepseek-ai/FlashMLA before 082094b (2026-01-16)", "1.0.0", _legacy_flash_mla_sparse_fwd)


def install_maca(module: types.ModuleType) -> None:
    _maca_flash_mla_sparse_fwd.__name__ = "flash_mla_sparse_fwd"
    fill(module, "MetaX-MACA/mcFlashMLA c2dbf6e (2026-07-06)", "1.0.0+maca", _maca_flash_mla_sparse_fwd)


def _dcu_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hygon DCU FlashMLA as vllm_hcu calls it: natural-log lse, h_q 64 or 128, top-k in blocks of 128."""
    check(attn_sink is None, "emulator: attn_sink is not emulated")
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, lambda h: h in (64, 128),
                           lambda h: SM90_TOPK_MULTIPLE, base2=False, nvidia=False)


def install_dcu_package(module: types.ModuleType) -> None:
    fill(module, "Hygon DCU flash_mla as vllm_hcu (HYGON-AI/vllm-plugin-das) imports it", "1.0.0+dcu")


def install_dcu_interface(module: types.ModuleType) -> None:
    _dcu_flash_mla_sparse_fwd.__name__ = "flash_mla_sparse_fwd"
    fill(module, "Hygon DCU flash_mla.flash_mla_interface as vllm_hcu@0e048c7 imports it", "1.0.0+dcu",
         _dcu_flash_mla_sparse_fwd)
