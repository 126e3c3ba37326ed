"""CPU emulation of the Moore Threads ``mate`` functions the MUSA adapters call.

MooreThreads/mate 3f58cc3 (2026-05-26):
* ``mate/moe_fused_gate.py`` -- ``moe_fused_gate(input, bias, num_expert_group, topk_group, topk,
  num_fused_shared_experts, routed_scaling_factor, renormalize, apply_routed_scaling_factor_on_output,
  num_token_non_padded=0, ...)``; checks from ``csrc/moe_fused_gate.mu`` (fp16/bf16/fp32 input, bias of
  input's dtype, ``num_experts % 32 == 0``, divisible into groups, ``topk_group <= num_expert_group``,
  non-zero scaling factor); semantics from ``tests/test_fused_moe_gate.py::biased_grouped_topk_impl``
  (renormalize False and True, 256 experts in one group among the tested configurations).
* ``mate/flashmla.py`` -- ``flash_mla_sparse_fwd`` with FlashMLA's current signature (``topk_length``;
  natural-log lse per its docstring "log-sum-exp of attention scores"), asserting ``h_k == 1``;
  semantics FlashMLA's ``tests/ref.py::ref_sparse_attn_fwd`` (the API it mirrors; :mod:`.flash_mla`),
  top-k in whole blocks of 64 (a partial block raises; mate's own block rule is not verified).
* ``mate/deep_gemm.py`` -- ``fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end,
  clean_logits=False, max_seqlen_k=0)`` (no ``bf16_mqa_logits``): 32 or 64 heads of dim 32, 64 or 128
  (``csrc/deepgemm_attention.mu``), semantics DeepGEMM's ``ref_fp8_mqa_logits``; and
  ``fp8_paged_mqa_logits(q, fused_kv_cache, weights, context_lens, block_table, schedule_meta,
  max_context_len, clean_logits)`` (every argument required) with ``get_paged_mqa_logits_metadata(
  context_lens, block_kv, num_mps=0)`` ("block_kv ... must be 64 now"): DeepGEMM's fused FP8 cache
  ``(num_blocks, 64, 1, index_dim + 4)``, 1-D context lens (draft token j of request i sees ``[0,
  context_lens[i] - next_n + j]``) or 2-D (``[0, context_lens[i, j] - 1]``); semantics from mate's own
  ``tests/test_deep_gemm.py::ref_fp8_paged_mqa_logits`` (same commit),
  which also shows ``clean_logits=True`` writing ``-inf`` past the range (the docstring says "zero-fill":
  the test wins). The schedule's content (mate's kernel not read) follows DeepGEMM's SM90 scheduler;
  the logits do not depend on it. Heads / head dims as ``fp8_mqa_logits`` (same ``.mu``; assumed).
* ``m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices, alignment_m=128)`` ->
  ``mate/gemm.py::ragged_m_moe_gemm_16bit`` (per-row expert ids, -1 unused).
"""

from __future__ import annotations

import types

import torch

from . import deep_gemm as _dg
from . import flash_mla as _fm
from ._common import check, fill, opaque

SOURCE = "MooreThreads/mate 3f58cc3 (2026-05-26)"


def moe_fused_gate(
    input: torch.Tensor,
    bias: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    num_fused_shared_experts: int,
    routed_scaling_factor: float,
    renormalize: bool,
    apply_routed_scaling_factor_on_output: bool,
    num_token_non_padded: int = 0,
    static_index_map: torch.Tensor | None = None,
    dynamic_index_map: torch.Tensor | None = None,
    dynamic_index_map_valid: torch.Tensor | None = None,
    random_index: torch.Tensor | None = None,
    num_physical_experts: int = 0,
    map_policy: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    check(input.dim() == 2 and bias.dim() == 1, "moe_fused_gate: input 2-D, bias 1-D")
    check(input.dtype == bias.dtype, "input and bias should have the same dtype")
    check(
        input.dtype in (torch.float16, torch.bfloat16, torch.float32),
        "moe_fused_gate only supports fp16/bf16/fp32 input",
    )
    E = input.shape[1]
    check(bias.shape[0] == E, "bias shape must match input.shape[1]")
    topk_group = min(topk_group, num_expert_group)  # as the Python wrapper does
    check(
        num_expert_group > 0 and topk_group > 0 and topk > 0, "num_expert_group, topk_group and topk must be positive"
    )
    check(num_fused_shared_experts == 0, "emulator: fused shared experts are not emulated")
    check(E % num_expert_group == 0, "num_experts must be divisible by num_expert_group")
    check(topk <= E, "topk - num_fused_shared_experts must be <= num_experts")
    check(routed_scaling_factor != 0.0, "routed_scaling_factor must be non-zero")
    check(map_policy == 0, "emulator: expert index mapping is not emulated")
    check(E % 32 == 0, "num_experts must be a multiple of WARP_SIZE")
    return _fused_gate(input, bias, num_expert_group, topk_group, topk, float(routed_scaling_factor), renormalize,
                       apply_routed_scaling_factor_on_output)


def _fused_gate_impl(
    input: torch.Tensor, bias: torch.Tensor, num_expert_group: int, topk_group: int, topk: int,
    routed_scaling_factor: float, renormalize: bool, apply_routed_scaling_factor_on_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``biased_grouped_topk_impl`` of mate's tests/test_fused_moe_gate.py: sigmoid scores, biased for the
    choice, groups ranked by the sum of their top-2 biased scores, weights from the unbiased scores."""
    E = input.shape[1]
    scores = input.float().sigmoid()
    choice = scores + bias.float()
    grouped = choice.view(-1, num_expert_group, E // num_expert_group)
    group_scores = grouped.topk(min(2, E // num_expert_group), dim=-1).values.sum(-1)
    keep = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    gmask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()
    choice = grouped.masked_fill(~gmask[..., None], float("-inf")).view(-1, E)
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :topk]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if apply_routed_scaling_factor_on_output:
        weights = weights * routed_scaling_factor
    return weights.float(), ids.to(torch.int32)


def _fused_gate_fake(input, bias, num_expert_group, topk_group, topk, routed_scaling_factor, renormalize,
                     apply_routed_scaling_factor_on_output):
    return (input.new_empty(input.shape[0], topk, dtype=torch.float32),
            input.new_empty(input.shape[0], topk, dtype=torch.int32))


_fused_gate = opaque("mate_moe_fused_gate", _fused_gate_impl, _fused_gate_fake)


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert d_v == 512, "sprase prefill only support d_v 512"
    assert q.stride(-1) == 1, "q last dimension must be contiguous"
    assert kv.stride(-1) == 1, "kv last dimension must be contiguous"
    assert indices.stride(-1) == 1, "indices last dimension must be contiguous"
    assert q.shape[-1] == kv.shape[-1]
    assert q.shape[0] == indices.shape[0]
    assert kv.shape[1] == indices.shape[1] == 1
    check(attn_sink is None, "emulator: attn_sink is not emulated")
    return _fm._sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, lambda h: h in (64, 128),
                               lambda h: _fm.B_TOPK, base2=False, nvidia=False)


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = False,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    if max_seqlen_k > 0 and clean_logits:
        raise ValueError("max_seqlen_k is not supported with clean_logits")
    check(q.dtype == torch.float8_e4m3fn and q.dim() == 3, "fp8_mqa_logits: q is e4m3 (seq_len, heads, head_dim)")
    check(q.shape[1] in (32, 64), f"fp8_mqa_logits: num_heads must be 32 or 64, got {q.shape[1]}")
    check(q.shape[2] in (32, 64, 128), f"fp8_mqa_logits: head_dim must be 32, 64 or 128, got {q.shape[2]}")
    kv_fp8, kv_scale = kv
    check(
        kv_fp8.dtype == torch.float8_e4m3fn
        and kv_scale.dtype == torch.float32
        and kv_scale.shape == (kv_fp8.shape[0],),
        "fp8_mqa_logits: kv = (e4m3 (seq_len_kv, head_dim), fp32 (seq_len_kv,))",
    )
    check(
        weights.dtype == torch.float32 and weights.shape == q.shape[:2], "fp8_mqa_logits: weights fp32 (seq_len, heads)"
    )
    _dg._check_ranges(q.shape[0], cu_seq_len_k_start, cu_seq_len_k_end)
    check(max_seqlen_k == 0, "emulator: compressed logits (max_seqlen_k > 0) are not emulated")
    return _dg._logits(q, kv_fp8, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, kv_scale)


NUM_MPS = 56  # what the emulated device reports (mate reads multi_processor_count when num_mps is 0)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_mps: int = 0) -> torch.Tensor:
    check(block_kv == 64, f"get_paged_mqa_logits_metadata: block_kv must be 64 now, got {block_kv}")
    check(context_lens.dtype == torch.int32 and context_lens.dim() in (1, 2),
          "get_paged_mqa_logits_metadata: context_lens int32 (batch,) or (batch, next_n)")
    lens2d = context_lens if context_lens.dim() == 2 else context_lens.view(-1, 1)
    return _dg._schedule_op(lens2d.contiguous(), num_mps or NUM_MPS)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    fused_kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool,
) -> torch.Tensor:
    check(q.dim() == 4 and q.dtype == torch.float8_e4m3fn,
          "fp8_paged_mqa_logits: q is e4m3 (batch_size, next_n, heads, index_dim)")
    B, next_n, H, D = q.shape
    check(H in (32, 64), f"fp8_paged_mqa_logits: num_heads must be 32 or 64, got {H}")
    check(D in (32, 64, 128), f"fp8_paged_mqa_logits: head_dim must be 32, 64 or 128, got {D}")
    check(fused_kv_cache.dtype == torch.uint8 and fused_kv_cache.dim() == 4
          and fused_kv_cache.shape[1:] == (64, 1, D + 4),
          "fp8_paged_mqa_logits: fused_kv_cache uint8 (num_blocks, 64, 1, index_dim + 4)")
    check(weights.dtype == torch.float32 and weights.shape == (B * next_n, H),
          "fp8_paged_mqa_logits: weights fp32 (batch_size * next_n, heads)")
    check(context_lens.dtype == torch.int32 and context_lens.shape in ((B,), (B, next_n)),
          "fp8_paged_mqa_logits: context_lens int32 (batch_size,) or (batch_size, next_n)")
    check(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == B,
          "fp8_paged_mqa_logits: block_table int32 (batch_size, max_blocks)")
    check(schedule_meta.dtype == torch.int32 and schedule_meta.dim() == 2 and schedule_meta.shape[1] == 2,
          "fp8_paged_mqa_logits: schedule_meta int32 (num_mps + 1, 2) from get_paged_mqa_logits_metadata")
    if context_lens.dim() == 1:  # draft token j sees [0, context_lens[i] - next_n + j]
        context_lens = context_lens[:, None] - next_n + 1 + torch.arange(next_n, dtype=torch.int32)
    logits = _dg._paged_op(q, fused_kv_cache, weights, context_lens.contiguous(), block_table, max_context_len)
    if clean_logits:  # -inf past each row's range, as mate's test asserts
        past = torch.arange(max_context_len)[None, :] >= context_lens.reshape(-1, 1)
        logits = logits.masked_fill(past, float("-inf"))
    return logits


def ragged_m_moe_gemm_16bit(
    input_a: torch.Tensor,
    input_b: torch.Tensor,
    ragged_tokens_info: torch.Tensor,
    out: torch.Tensor,
    gemm_mode: str | None = "per_token",
    major_a_mode: str | None = "K",
    major_b_mode: str | None = "K",
    num_mp: int | None = None,
    alignment_m: int | None = None,
) -> None:
    """``per_token`` mode: row r of ``input_a`` uses expert ``ragged_tokens_info[r]`` (-1: unused, left
    untouched); ``out[r] = input_a[r] @ input_b[e]^T``. With ``alignment_m`` every aligned block of rows
    belongs to one expert (DeepGEMM's contiguous layout)."""
    check(gemm_mode == "per_token", "emulator covers gemm_mode='per_token'")
    check(
        input_a.dtype in (torch.float16, torch.bfloat16) and input_b.dtype == input_a.dtype,
        "ragged_m_moe_gemm_16bit: fp16/bf16",
    )
    check(
        input_a.dim() == 2 and input_b.dim() == 3 and input_b.shape[2] == input_a.shape[1],
        "ragged_m_moe_gemm_16bit: shapes",
    )
    check(
        ragged_tokens_info.shape == (input_a.shape[0],) and ragged_tokens_info.dtype == torch.int32,
        "ragged_m_moe_gemm_16bit: per-token int32 expert ids",
    )
    check(out.shape == (input_a.shape[0], input_b.shape[1]), "ragged_m_moe_gemm_16bit: out (total_tokens, out_hidden)")
    _ragged_gemm(input_a, input_b, ragged_tokens_info, out, int(alignment_m or 0))


def _ragged_gemm_impl(input_a: torch.Tensor, input_b: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                      alignment_m: int) -> None:
    ids = ids.long()
    if alignment_m:
        check(input_a.shape[0] % alignment_m == 0, f"contiguous layout: rows must be a multiple of {alignment_m}")
        blocks = ids.view(-1, alignment_m)
        first = blocks.max(dim=1).values
        check(
            bool(((blocks == first[:, None]) | (blocks < 0)).all()), "contiguous layout: an aligned block mixes experts"
        )
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows = ids == e
        out[rows] = (input_a[rows].float() @ input_b[e].float().T).to(out.dtype)


_ragged_gemm = opaque("mate_ragged_m_moe_gemm_16bit", _ragged_gemm_impl, lambda *args: None, mutates_args=("out",))


def m_grouped_bf16_gemm_nt_contiguous(
    a: torch.Tensor,
    b: torch.Tensor,
    d: torch.Tensor,
    m_indices: torch.Tensor,
    alignment_m: int = 128,
) -> None:
    ragged_m_moe_gemm_16bit(a, b, m_indices, d, alignment_m=alignment_m)


def install_package(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.0.0+emulated", moe_fused_gate)


def install_flashmla(module: types.ModuleType) -> None:
    fill(module, SOURCE + " mate/flashmla.py", "0.0.0+emulated", flash_mla_sparse_fwd)


def install_deep_gemm(module: types.ModuleType) -> None:
    fill(module, SOURCE + " mate/deep_gemm.py", "0.0.0+emulated", fp8_mqa_logits, fp8_paged_mqa_logits,
         get_paged_mqa_logits_metadata, m_grouped_bf16_gemm_nt_contiguous)


def install_gemm(module: types.ModuleType) -> None:
    fill(module, SOURCE + " mate/gemm.py", "0.0.0+emulated", ragged_m_moe_gemm_16bit)
