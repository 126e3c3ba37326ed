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
* NVIDIA paged (``install_nvidia``), the same commit: legacy ``fp8_paged_mqa_logits(q, kv_cache, weights,
  context_lens, block_table, schedule_meta, max_context_len, clean_logits=False, indices=None)`` (a
  wrapper of ``fp8_fp4_paged_mqa_logits`` with fp32 logits), ``get_paged_mqa_logits_metadata(context_lens,
  block_kv, num_sms, indices=None)`` and ``get_num_sms()``. Checks from ``csrc/apis/attention.hpp``'s
  DG_HOST_ASSERTs (SM90: q e4m3 contiguous ``[B, next_n, H, D]`` with H in {32, 64}, D in {32, 64, 128};
  the fused cache uint8 ``[num_blocks, 64, 1, D + 4]`` with ``stride(1) == D + 4``, ``stride(3) == 1``;
  weights fp32 contiguous ``[B * next_n, H]``; int32 ``block_table`` ``[B, *]`` and 2-D ``context_lens``
  ``[B, next_n]``; ``schedule_meta`` int32 ``[num_sms + 1, 2]``; ``clean_logits`` must be False with 2-D
  context lens). The fused cache holds per block its rows' FP8 codes, then their fp32 scales (the
  host code's "Derive FP8 values and SF tensor"). Semantics from ``tests/test_attention.py::
  ref_paged_mqa_logits`` (2-D context lens): row ``(b, j)`` at key position ``k < context_lens[b, j]``
  is ``sum_h relu(q[b, j, h] . kv[k]) * weights[b * next_n + j, h]`` with ``kv = codes * scale``; columns
  at or past the context length are left unwritten (emulated as a huge value, so an adapter that does
  not mask them fails). The schedule follows ``scheduler/sm90_paged_mqa_logits.cuh`` (non-varlen,
  ``SPLIT_KV`` 256 as ``csrc/jit_kernels/impls/sm90_fp8_mqa_logits.hpp`` sets it); the logits do not
  depend on it. The real op returns a slice of a 1024-byte-aligned buffer; the emulator returns it
  contiguous.
* MACA (``install_maca``): the same plus ``bf16_mqa_logits(q, kv, weights, cu_seqlen_ks,
  cu_seqlen_ke)`` as vLLM-metax 3aadf08 (2026-08-05) calls it (``vllm_metax/utils/deep_gemm.py``,
  ``registry/custom_ops/layers/sparse_attn_indexer/bf16.py``): bf16 q ``[M, H, D]``, bf16 keys
  ``[N, D]`` (no scale), fp32 weights, fp32 logits ``[M, N]``.
* MACA paged (``install_maca``): ``bf16_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables,
  schedule_metadata, max_model_len, clean_logits=True)`` and ``get_paged_mqa_logits_metadata(context_lens,
  block_kv, num_sms)`` as vLLM-metax 6162d93 calls them (``vllm_metax/utils/deep_gemm.py``: bf16 q
  ``[B, next_n, H, D]``, fp32 weights ``[B * next_n, H]``, int32 context lens ``[B]`` (plain decode) or
  ``[B, next_n]``, int32 block table, fp32 logits ``[B * next_n, max_model_len]``, always called with
  ``clean_logits=True``; ``customized/layers/sparse_attn_indexer/bf16.py`` passes the bf16 indexer cache
  ``[blocks, bs, D]`` as ``kv_cache.unsqueeze(-2)``, ``[blocks, bs, 1, D]``, no scales;
  ``v1/attention/backends/mla/indexer.py``: blocks of 64, the schedule from
  ``get_paged_mqa_logits_metadata(seq_lens, 64, num_compute_units)`` into an int32 ``[num_sms + 1, 2]``
  buffer). Semantics: DeepGEMM 54e2261 ``tests/test_attention.py::ref_paged_mqa_logits`` with bf16 keys
  (no scale): with 1-D context lens token ``j`` of row ``b`` sees keys ``k <= context_lens[b] - next_n + j``,
  with 2-D ones ``k < context_lens[b, j]``; ``-inf`` elsewhere (the reference's fill; the kernel cleans).
  The MACA schedule's layout is not published; the emulator returns DeepGEMM's SM90 one at the width asked
  for (the logits do not depend on it).
* DCU (``install_dcu``): the Hygon DCU build as HYGON-AI/vllm-plugin-das (vllm_hcu) reaches it through
  vLLM's ``vllm.utils.deep_gemm`` wrappers (``vllm_hcu/model_executor/layers/sparse_attn_indexer.py``
  @058761f: ``fp8_fp4_mqa_logits`` for prefill chunks over keys gathered from the FP8 cache,
  ``fp8_fp4_paged_mqa_logits`` for decode over the FP8 paged cache ``[blocks, bs, 1, D + 4]``), i.e.
  DeepGEMM 54e2261's ``fp8_fp4_*`` entries: FP8 q (an FP4 ``(q, sf)`` pair is not emulated),
  ``logits_dtype`` fp32. The DCU build's source and tests are not public: its checks (heads, head dims,
  blocks of 64) and semantics are assumed to be the upstream ones above (``ref_fp8_mqa_logits`` /
  ``ref_paged_mqa_logits``), not verified on the DCU build.
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


NUM_SMS = 132  # an H100 / H200 SXM (the emulation declares sm90)
SPLIT_KV = 256  # csrc/jit_kernels/impls/sm90_fp8_mqa_logits.hpp: ``constexpr int split_kv = 256``
UNWRITTEN = 1e30  # what the emulated kernel leaves past each row's context length (clean_logits=False)


def get_num_sms() -> int:
    return NUM_SMS


def _schedule_impl(context_lens: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``sm90_paged_mqa_logits_metadata`` (non-varlen): split each row's keys into SPLIT_KV segments and
    give each SM an equal share, as ``(q_atom_idx, kv_split_idx)`` starts; the last row is the end."""
    batch_size, next_n = context_lens.shape
    segs = [-(-int(c) // SPLIT_KV) for c in context_lens[:, -1].tolist()]  # the last next_n entry per row
    prefix = torch.tensor(segs).cumsum(0).tolist() if segs else []
    atoms = -(-next_n // (2 if next_n >= 2 else 1))
    total = (prefix[-1] if prefix else 0) * atoms
    q, r = divmod(total, num_sms)
    pivot = num_sms - r
    out = torch.zeros(num_sms + 1, 2, dtype=torch.int32)
    for sm in range(num_sms):
        start = sm * q + (sm - pivot if sm > pivot else 0)
        q_idx = next((i for i, p in enumerate(prefix) if p * atoms > start), batch_size)
        before = prefix[q_idx - 1] * atoms if q_idx > 0 else 0
        n_q = (prefix[q_idx] - (prefix[q_idx - 1] if q_idx > 0 else 0)) if q_idx < batch_size else 0
        offset = start - before
        out[sm] = torch.tensor([q_idx * atoms + (offset // n_q if n_q else 0), offset % n_q if n_q else 0])
    out[num_sms] = torch.tensor([batch_size * atoms, 0])
    return out


def _schedule_fake(context_lens: torch.Tensor, num_sms: int) -> torch.Tensor:
    return context_lens.new_empty(num_sms + 1, 2, dtype=torch.int32)


_schedule_op = opaque("deep_gemm_paged_mqa_logits_metadata", _schedule_impl, _schedule_fake)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int,
                                  indices: torch.Tensor | None = None) -> torch.Tensor:
    check(context_lens.dim() == 2, "get_paged_mqa_logits_metadata: only 2-D context lens are supported")
    check(context_lens.dtype == torch.int32 and context_lens.is_contiguous(),
          "get_paged_mqa_logits_metadata: context_lens contiguous int32")
    check(indices is None, "get_paged_mqa_logits_metadata: varlen indices need SM100")
    check(block_kv == 64, f"get_paged_mqa_logits_metadata: block_kv must be 64 on SM90, got {block_kv}")
    return _schedule_op(context_lens, num_sms)


def _paged_impl(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                block_table: torch.Tensor, max_context_len: int) -> torch.Tensor:
    """``ref_paged_mqa_logits`` (DeepGEMM tests/test_attention.py, 2-D context lens) on the fused cache."""
    B, next_n, H, D = q.shape
    nb, bs = kv_cache.shape[:2]
    flat = kv_cache.reshape(nb, bs * (D + 4))
    codes = flat[:, : bs * D].reshape(nb, bs, D).view(torch.float8_e4m3fn).float()
    scales = flat[:, bs * D:].contiguous().view(torch.float32)  # [nb, bs]
    keys = codes * scales.unsqueeze(-1)
    return _ref_paged_logits(q, keys, weights, block_table, max_context_len, UNWRITTEN,
                             lambda b, j: int(context_lens[b, j]))


def _ref_paged_logits(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, block_table: torch.Tensor,
                      width: int, fill: float, context) -> torch.Tensor:
    """The loop of DeepGEMM 54e2261 ``tests/test_attention.py::ref_paged_mqa_logits`` over dequantized
    keys ``[blocks, bs, D]``: row ``(b, j)`` scores its first ``context(b, j)`` keys, the rest stay ``fill``."""
    B, next_n, _, D = q.shape
    bs = keys.shape[1]
    logits = torch.full((B * next_n, width), fill, dtype=torch.float32)
    for b in range(B):
        for j in range(next_n):
            ctx = context(b, j)
            if ctx == 0:
                continue
            blocks = block_table[b, : -(-ctx // bs)].long()
            k = keys.index_select(0, blocks).reshape(-1, D)[:ctx]  # [ctx, D]
            s = (q[b, j].float() @ k.t()).relu()  # [H, ctx]
            logits[b * next_n + j, :ctx] = (s * weights[b * next_n + j].float().unsqueeze(1)).sum(0)
    return logits


def _paged_fake(q, kv_cache, weights, context_lens, block_table, max_context_len):
    return q.new_empty(q.shape[0] * q.shape[1], max_context_len, dtype=torch.float32)


_paged_op = opaque("deep_gemm_fp8_paged_mqa_logits", _paged_impl, _paged_fake)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    check(q.dim() == 4 and q.is_contiguous() and q.dtype == torch.float8_e4m3fn,
          "fp8_paged_mqa_logits: q is contiguous e4m3 [batch, next_n, heads, head_dim]")
    B, next_n, H, D = q.shape
    check(next_n >= 1 and H in (32, 64), f"fp8_paged_mqa_logits: num_heads must be 32 or 64 on SM90, got {H}")
    check(D in (32, 64, 128), f"fp8_paged_mqa_logits: head_dim must be 32, 64 or 128, got {D}")
    check(kv_cache.dim() == 4 and kv_cache.dtype == torch.uint8, "fp8_paged_mqa_logits: kv_cache is uint8 4-D")
    nb, bs, heads_kv, width = kv_cache.shape
    check(bs == 64, f"fp8_paged_mqa_logits: block_kv must be 64 on SM90, got {bs}")
    check(heads_kv == 1 and width == D + 4, "fp8_paged_mqa_logits: kv_cache [blocks, block_kv, 1, head_dim + 4]")
    check(kv_cache.stride(1) == width and kv_cache.stride(3) == 1 and kv_cache.stride(0) % 4 == 0,
          "fp8_paged_mqa_logits: kv_cache strides (fused FP8 rows then fp32 scales per block)")
    check(weights.shape == (B * next_n, H) and weights.is_contiguous() and weights.dtype == torch.float32,
          "fp8_paged_mqa_logits: weights contiguous fp32 [batch * next_n, heads]")
    check(block_table.dim() == 2 and block_table.shape[0] == B and block_table.stride(1) == 1
          and block_table.dtype == torch.int32, "fp8_paged_mqa_logits: block_table int32 [batch, max_blocks]")
    check(indices is None, "fp8_paged_mqa_logits: varlen indices need SM100")
    check(schedule_meta.shape == (NUM_SMS + 1, 2) and schedule_meta.is_contiguous()
          and schedule_meta.dtype == torch.int32, "fp8_paged_mqa_logits: schedule_meta int32 [num_sms + 1, 2]")
    check(context_lens.shape == (B, next_n) and context_lens.is_contiguous() and context_lens.dtype == torch.int32,
          "fp8_paged_mqa_logits: context_lens contiguous int32 [batch, next_n] (only 2-D is supported)")
    check(not clean_logits, "fp8_paged_mqa_logits: clean_logits is not supported with 2-D context lens")
    return _paged_op(q, kv_cache, weights, context_lens, block_table, max_context_len)


def install_nvidia(module: types.ModuleType) -> None:
    fill(module, "deepseek-ai/DeepGEMM 54e2261 (2026-06-23)", "2.x", fp8_mqa_logits, fp8_paged_mqa_logits,
         get_paged_mqa_logits_metadata, get_num_sms)



# ---- MACA: bf16 paged MQA logits (vLLM-metax 6162d93 decode) --------------------------------------------


def _maca_schedule_impl(context_lens: torch.Tensor, num_sms: int) -> torch.Tensor:
    return _schedule_impl(context_lens.view(context_lens.shape[0], -1)[:, -1:].contiguous(), num_sms)


_maca_schedule_op = opaque("maca_deep_gemm_paged_mqa_logits_metadata", _maca_schedule_impl, _schedule_fake)


def _maca_get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    check(context_lens.dim() in (1, 2) and context_lens.dtype == torch.int32 and context_lens.is_contiguous(),
          "get_paged_mqa_logits_metadata: context_lens contiguous int32 [batch] or [batch, next_n]")
    check(block_kv == 64, f"get_paged_mqa_logits_metadata: block_kv must be 64 (vLLM-metax's indexer), got {block_kv}")
    check(isinstance(num_sms, int) and num_sms > 0, f"get_paged_mqa_logits_metadata: num_sms > 0, got {num_sms}")
    return _maca_schedule_op(context_lens, num_sms)


_maca_get_paged_mqa_logits_metadata.__name__ = "get_paged_mqa_logits_metadata"


def _bf16_paged_impl(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                     block_table: torch.Tensor, max_model_len: int) -> torch.Tensor:
    """``ref_paged_mqa_logits`` (DeepGEMM 54e2261 tests/test_attention.py) with bf16 keys and no scale."""
    B, next_n, H, D = q.shape
    bs = kv_cache.shape[1]
    keys = kv_cache.float().reshape(kv_cache.shape[0], bs, D)

    def context(b: int, j: int) -> int:
        ctx = int(context_lens[b, j]) if context_lens.dim() == 2 else int(context_lens[b]) - next_n + j + 1
        return min(max(ctx, 0), max_model_len)

    return _ref_paged_logits(q, keys, weights, block_table, max_model_len, float("-inf"), context)


def _bf16_paged_fake(q, kv_cache, weights, context_lens, block_table, max_model_len):
    return q.new_empty(q.shape[0] * q.shape[1], max_model_len, dtype=torch.float32)


_bf16_paged_op = opaque("maca_deep_gemm_bf16_paged_mqa_logits", _bf16_paged_impl, _bf16_paged_fake)


def bf16_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    schedule_metadata: torch.Tensor,
    max_model_len: int,
    clean_logits: bool = True,
) -> torch.Tensor:
    check(q.dim() == 4 and q.is_contiguous() and q.dtype == torch.bfloat16,
          "bf16_paged_mqa_logits: q is contiguous bf16 [batch, next_n, heads, head_dim]")
    B, next_n, H, D = q.shape
    check(kv_cache.dim() == 4 and kv_cache.dtype == torch.bfloat16,
          "bf16_paged_mqa_logits: kv_cache is bf16 [blocks, block_size, 1, head_dim] (the cache's unsqueeze(-2))")
    nb, bs, heads_kv, width = kv_cache.shape
    check(bs == 64, f"bf16_paged_mqa_logits: block_size must be 64, got {bs}")
    check(heads_kv == 1 and width == D and kv_cache.stride(3) == 1 and kv_cache.stride(1) == D,
          "bf16_paged_mqa_logits: kv_cache [blocks, block_size, 1, head_dim], rows contiguous")
    check(weights.shape == (B * next_n, H) and weights.is_contiguous() and weights.dtype == torch.float32,
          "bf16_paged_mqa_logits: weights contiguous fp32 [batch * next_n, heads]")
    check(block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.stride(1) == 1
          and block_tables.dtype == torch.int32, "bf16_paged_mqa_logits: block_tables int32 [batch, max_blocks]")
    check(context_lens.shape in ((B,), (B, next_n)) and context_lens.is_contiguous()
          and context_lens.dtype == torch.int32, "bf16_paged_mqa_logits: context_lens contiguous int32 [batch] or "
          "[batch, next_n]")
    check(schedule_metadata.dim() == 2 and schedule_metadata.shape[1] == 2 and schedule_metadata.is_contiguous()
          and schedule_metadata.dtype == torch.int32, "bf16_paged_mqa_logits: schedule_metadata int32 [num_sms + 1, 2]")
    check(clean_logits, "emulator: vLLM-metax always calls bf16_paged_mqa_logits with clean_logits=True")
    return _bf16_paged_op(q, kv_cache, weights, context_lens, block_tables, max_model_len)


def install_maca(module: types.ModuleType) -> None:
    fill(module, "MACA deep_gemm as vLLM-metax 3aadf08 (2026-08-05) and 6162d93 call it", "maca", fp8_mqa_logits,
         bf16_mqa_logits, bf16_paged_mqa_logits, _maca_get_paged_mqa_logits_metadata)


# ---- Hygon DCU: DeepGEMM's fp8_fp4_* entries, as vllm_hcu@058761f calls them through vllm.utils.deep_gemm


def fp8_fp4_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
    logits_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    check(isinstance(q, torch.Tensor), "emulator: FP4 queries ((q, sf) pairs) are not emulated")
    check(logits_dtype == torch.float32, "emulator: only fp32 logits are emulated")
    return fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k)


def fp8_fp4_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    logits_dtype: torch.dtype = torch.float32,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    check(isinstance(q, torch.Tensor), "emulator: FP4 queries ((q, sf) pairs) are not emulated")
    check(logits_dtype == torch.float32, "emulator: only fp32 logits are emulated")
    return fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                                clean_logits, indices)


def install_dcu(module: types.ModuleType) -> None:
    fill(module, "Hygon DCU deep_gemm as vllm_hcu (HYGON-AI/vllm-plugin-das@058761f) calls it", "2.x+dcu",
         fp8_fp4_mqa_logits, fp8_fp4_paged_mqa_logits, get_paged_mqa_logits_metadata, get_num_sms)
