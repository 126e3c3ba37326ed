"""CPU emulation of Hygon ``lightop.norm`` as Hygon's vLLM plugin (vllm_hcu) calls it.

Source: vllm_hcu's RMSNorm override (Hygon, 2026; the ``HcuRMSNorm.forward_hip`` module of the
vllm_hcu plugin as indexed by the code search, read 2026-11-30): ``from lightop.norm import
fused_add_rms_norm, rmsnorm_forward_autograd``; ``fused_add_rms_norm(x, residual, weight, eps)``
works in place and returns nothing (the plugin returns ``x, residual`` afterwards);
``rmsnorm_forward_autograd(x, weight, eps, training)`` returns the normalised tensor; and
"lightop's HCU RMSNorm kernel currently rejects reductions narrower than one wave"
(``_LIGHTOP_RMSNORM_MIN_COLS = 64``): widths under 64 raise here. No lightop test or source is
public; the arithmetic is the reference vllm_hcu's override replaces (vLLM ``RMSNorm.forward_native``:
fp32 variance, normalised value cast to the input dtype, times the weight), checked in
tests/test_emulators_vendor_refs.py.

``lightop.op.moe_fused_gate(input, bias, num_expert_group, topk_group, topk, num_fused_shared_experts,
routed_scaling_factor)`` as vllm_hcu calls it (HYGON-AI/vllm-plugin-das@13272b6
``vllm_hcu/model_executor/layers/fused_moe/router_runtime.py``: ``from lightop import op``, seven
positional arguments, shared experts 0, returns ``(topk_weights, topk_ids)``). Its semantics are fixed,
"sigmoid scoring followed by renormalization" (``fused_moe/lightop_routing.py``@5a61c48); the routed
scaling factor is not applied to the output (vllm_hcu hands the weights to vLLM's router unchanged, and
vLLM's DeepSeek MoE scales the output itself). The arithmetic is the biased grouped top-k of the
sgl-kernel ``moe_fused_gate`` this positional ABI matches (the reference mate's emulator follows,
:func:`.mate._fused_gate_impl`, renormalized, unscaled). No lightop source or test is public.

The int8 contiguous grouped experts of vllm_hcu's ``DeepGemmExperts`` (HYGON-AI/vllm-plugin-das@a38f27d
``vllm_hcu/model_executor/layers/fused_moe/experts/deep_gemm_moe.py``, the Channel-INT8 branch of
``apply``): ``lightop.gemm_ops.m_grouped_w8a8_gemm_nt_contig_asm((a, a_scale), (w, w_scale), out,
m_indices)``, ``lightop.activation.fuse_silu_mul_quant(h, output=..., expert_ids=m_indices)`` between
the two GEMMs, activations quantised per token by ``lightop.quant.per_token_quant_int8``. vllm_hcu
imports the GEMM as a drop-in for the DCU DeepGEMM's ``deepgemm.m_grouped_i8_gemm_nt_contiguous``
(``if has_deep_gemm(): from deepgemm import m_grouped_i8_gemm_nt_contiguous else: from lightop import
m_grouped_w8a8_gemm_nt_contig_asm as m_grouped_i8_gemm_nt_contiguous``, @06845d2), whose kernel wrapper
is public (``csrc/py_itfs_cu/asm_m_grouped_w8a8_gemm_nt_contiguous.cu``, read through the code index:
ASM kernel ``DeepGemm_W8A8_I8_MARLIN_PERCHANNEL_ASM_TN_MT256X256X128``, mode 1000; ``input`` (M, K),
``b_qweight`` (E, N // 16, K * 16), ``a_scale`` (M), ``b_scale`` (E, N), ``m_indices``, bf16/fp16
output). What this emulator follows:

* the weight layout: the "Marlin2" layout vllm_hcu packs the int8 expert stacks it hands this GEMM with
  (DeepEP's ``DeepGemmExperts``): ``weight8bit_nt_kpack2_marlin2`` (@13272b6
  ``vllm_hcu/model_executor/layers/quantization/int8_runtime.py``; per expert in
  ``compressed_tensors/compressed_tensors_moe_marlin.py``@1ec73b3; vllm_hcu's tests check it against a
  reference permutation and an inverse): ``[E, N/16, 16, K/64, 4, 16]`` -> permute ``(0, 3, 1, 4, 2,
  5)`` -> ``(E, N/16, K*16)``, i.e. 64-column blocks of K outermost, then 16-row tiles of N, then the
  block's four 16x16 tiles. :func:`marlin2_unpack` inverts it. A different, older pairing is public
  too: the DCU DeepGEMM's contiguous int8 test and yuguo-Jack/DeepGEMM@142c2fa
  ``megamoe/dcu_megamoe_opt/tests/test_mega_moe_int8_baseline.py`` (``INT8_WEIGHT_LAYOUT =
  "legacy_n16_flat"``) pack with ``weight8bit_nt_kpack2_marlin`` (16x16 tiles, no 64-wide K group) for
  the DCU DeepGEMM's ``m_grouped_i8_gemm_nt_contiguous``; a weight in that layout computes wrong here
  (tests/test_backends_hygon.py), as it would on a kernel expecting Marlin2;
* the arithmetic and the row layout: the DCU DeepGEMM contiguous int8 test's reference ``torch_gemm``
  (read through the code index, no repository named): ``out[m, n] = a_scale[m] *
  b_scale[e, n] * sum_k a[m, k] w[e, n, k]`` with ``e = m_indices[m]``, rows with ``m_indices == -1``
  skipped, each expert's rows padded to a multiple of 256 (the DCU DeepGEMM README: "contiguous接口input
  按照256的倍数对齐"), so no 256-row tile holds two experts (checked here); a tile whose first row is
  -1 is refused: the kernel is ASSUMED to take a tile's expert from its first row, as DCU integrations
  that bound the rows on the host "sanitize every empty 256-row tile head before DeepGEMM reads it"
  (yuguo-Jack/DeepGEMM@142c2fa ``megamoe/dcu_megamoe_opt/tests/test_mega_moe_int8_baseline.py``);
* kernel limits beyond the layout (N % 16, K % 64) are not public: N a multiple of 256 and K of 128 are
  ASSUMED from the 256x256x128 macro tile and the public shapes (the smallest any public test runs:
  N=256, K=128, vllm_hcu's ``test_contiguous_channel_int8_deepgemm_matches_dequantized_reference``);
* ``fuse_silu_mul_quant``: ``silu(h[:, :I]) * h[:, I:]`` in fp32, then the per-token int8 quantisation
  below, returning ``(int8 [M, I], fp32 scales [M, 1])`` (vllm_hcu's HCU tests of its siblings
  ``fuse_silu_mul_fp8_quant`` / ``fuse_silu_mul_clamp_quant``: gate first, ``q * scale`` against
  ``silu(gate) * up``); rows whose ``expert_ids`` is -1 are padding and are not written;
* ``per_token_quant_int8(x) -> (int8, fp32 [..., 1])``: ``absmax / 127`` (floor 1e-10), round half to
  even, as vllm_hcu's own HCU per-token int8 kernel (``fused_moe/int8_quant_runtime.py``@13272b6:
  ``nearbyint(x * 127 / absmax)``); lightop's replaces LMSlim's with "compatible INT8 quantization
  signatures" (vllm_hcu's LightOp migration notes). No lightop source or test of these three is public.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque
from .mate import _fused_gate_impl

MIN_COLS = 64


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check(
        x.shape[-1] >= MIN_COLS,
        f"lightop rms norm: reduction width {x.shape[-1]} is narrower than one wave ({MIN_COLS})",
    )
    check(
        x.dtype == residual.dtype == weight.dtype, "lightop fused_add_rms_norm: x, residual and weight share one dtype"
    )
    check(x.is_contiguous() and residual.is_contiguous(), "lightop fused_add_rms_norm: contiguous x and residual")
    _fused_add(x, residual, weight, float(eps))


def _fused_add_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.copy_((x.float() + residual.float()).to(x.dtype))
    x.copy_(_norm(residual, weight, eps))


def rmsnorm_forward_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    check(
        x.shape[-1] >= MIN_COLS,
        f"lightop rms norm: reduction width {x.shape[-1]} is narrower than one wave ({MIN_COLS})",
    )
    check(x.dtype == weight.dtype, "lightop rmsnorm_forward_autograd: x and weight share one dtype")
    return _rmsnorm(x, weight, float(eps))


def _rmsnorm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, weight, eps)


# The kernels, opaque to FakeTensorMode (their fakes only describe the outputs).
_fused_add = opaque("lightop_fused_add_rms_norm", _fused_add_impl, lambda x, residual, weight, eps: None,
                    mutates_args=("x", "residual"))
_rmsnorm = opaque("lightop_rmsnorm_forward", _rmsnorm_impl, lambda x, weight, eps: torch.empty_like(x))


def install_package(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop as used by vllm_hcu", "0.0.0+emulated")


def install_norm(module: types.ModuleType) -> None:
    fill(
        module, "Hygon lightop.norm as used by vllm_hcu", "0.0.0+emulated", fused_add_rms_norm, rmsnorm_forward_autograd
    )


def moe_fused_gate(
    input: torch.Tensor,
    bias: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    num_fused_shared_experts: int = 0,
    routed_scaling_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    check(input.dim() == 2 and bias.dim() == 1 and bias.shape[0] == input.shape[1],
          "lightop moe_fused_gate: input [T, E], bias [E]")
    check(input.dtype == bias.dtype, "lightop moe_fused_gate: input and bias share one dtype")
    E = input.shape[1]
    check(num_expert_group > 0 and E % num_expert_group == 0, "lightop moe_fused_gate: experts divisible into groups")
    check(0 < topk_group <= num_expert_group and 0 < topk <= E,
          "lightop moe_fused_gate: topk_group / topk out of range")
    check(num_fused_shared_experts == 0, "emulator: fused shared experts are not emulated")
    return _gate(input, bias, num_expert_group, topk_group, topk)


def _gate_impl(input: torch.Tensor, bias: torch.Tensor, num_expert_group: int, topk_group: int,
               topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_gate_impl(input, bias, num_expert_group, topk_group, topk, 1.0, True, False)


_gate = opaque("lightop_moe_fused_gate", _gate_impl,
               lambda input, bias, g, tg, topk: (input.new_empty(input.shape[0], topk, dtype=torch.float32),
                                                 input.new_empty(input.shape[0], topk, dtype=torch.int32)))


def install_op(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop.op as vllm_hcu@13272b6 calls it", "0.0.0+emulated", moe_fused_gate)


# ---- int8 contiguous grouped experts (lightop.gemm_ops / lightop.activation / lightop.quant)

TILE_M = 256  # rows of one contiguous-layout tile: every expert's rows padded to a multiple of it
TILE, K_GROUP = 16, 4  # Marlin2: 16x16 tiles, K tiles in groups of 4 (64 columns)


def marlin2_unpack(packed: torch.Tensor) -> torch.Tensor:
    """``(E, N/16, K*16)`` Marlin2 storage -> the logical ``[E, N, K]``: the inverse of vllm_hcu's
    ``weight8bit_nt_kpack2_marlin2`` (storage order ``[E, K/64, N/16, 4, 16 rows of N, 16 columns of K]``),
    so ``w[e, n, k]`` is at ``(((k // 64) * (N / 16) + n // 16) * 4 + k % 64 // 16) * 256 + n % 16 * 16 + k % 16``."""
    E, nt, k16 = packed.shape
    kb = k16 // (TILE * TILE * K_GROUP)
    blocks = packed.reshape(E, kb, nt, K_GROUP, TILE, TILE)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(E, nt * TILE, kb * K_GROUP * TILE)


def m_grouped_w8a8_gemm_nt_contig_asm(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                      d: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
    x, a_scale = a
    w, b_scale = b
    check(x.dtype == torch.int8 and x.dim() == 2 and x.is_contiguous(), "lightop contig asm: input int8 [M, K]")
    check(w.dtype == torch.int8 and w.dim() == 3 and w.is_contiguous(),
          "lightop contig asm: b_qweight int8 (E, N // 16, K * 16)")
    M, K = x.shape
    E, N = w.shape[0], w.shape[1] * TILE
    check(w.shape[2] == K * TILE,
          f"lightop contig asm: b_qweight (E, N // 16, K * 16) with K={K}, got {list(w.shape)}")
    check(N % 256 == 0 and K % 128 == 0, f"lightop contig asm: N % 256 and K % 128 (assumed tile limits), got {N}, {K}")
    check(M % TILE_M == 0, f"lightop contig asm: rows padded to a multiple of {TILE_M}, got {M}")
    check(a_scale.dtype == torch.float32 and a_scale.numel() == M, "lightop contig asm: a_scale fp32 (M)")
    check(b_scale.dtype == torch.float32 and b_scale.numel() == E * N, "lightop contig asm: b_scale fp32 (E, N)")
    check(d.dtype in (torch.bfloat16, torch.float16) and tuple(d.shape) == (M, N) and d.is_contiguous(),
          "lightop contig asm: output bf16/fp16 (M, N)")
    check(m_indices.dtype == torch.int32 and tuple(m_indices.shape) == (M,), "lightop contig asm: m_indices int32 (M)")
    _contig_gemm(x, a_scale.reshape(M).contiguous(), w, b_scale.reshape(E, N).contiguous(), d, m_indices)
    return d


def _contig_gemm_impl(x: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, b_scale: torch.Tensor, d: torch.Tensor,
                      m_indices: torch.Tensor) -> None:
    tiles = m_indices.view(-1, TILE_M).long()
    valid = tiles >= 0
    first = torch.where(valid, tiles, tiles.max(dim=1, keepdim=True).values).min(dim=1, keepdim=True).values
    check(bool((~valid | (tiles == first)).all()), "lightop contig asm: a 256-row tile holds rows of two experts")
    check(bool(valid[:, 0].all()), "lightop contig asm: a 256-row tile's first row has m_indices -1 (assumed unsafe)")
    weights = marlin2_unpack(w)
    for e in m_indices[m_indices >= 0].unique().tolist():
        check(e < w.shape[0], f"lightop contig asm: m_indices names expert {e} of {w.shape[0]}")
        rows = (m_indices == e).nonzero().squeeze(1)
        acc = x.index_select(0, rows).double() @ weights[e].double().t()  # exact int32 accumulation
        d.index_copy_(0, rows, (acc.float() * a_scale[rows, None] * b_scale[e][None, :]).to(d.dtype))


_contig_gemm = opaque("lightop_m_grouped_w8a8_gemm_nt_contig_asm", _contig_gemm_impl,
                      lambda x, a_scale, w, b_scale, d, m_indices: None, mutates_args=("d",))


def _int8_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = v.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    return torch.round(v / s).clamp(-127, 127).to(torch.int8), s


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check(x.dtype in (torch.bfloat16, torch.float16, torch.float32), "lightop per_token_quant_int8: float input")
    return _quant(x)


def _quant_impl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _int8_rows(x.float())


_quant = opaque("lightop_per_token_quant_int8", _quant_impl,
                lambda x: (torch.empty_like(x, dtype=torch.int8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)))


def fuse_silu_mul_quant(input: torch.Tensor, output: torch.Tensor | None = None,
                        expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check(input.dim() == 2 and input.shape[1] % 2 == 0 and input.dtype in (torch.bfloat16, torch.float16),
          "lightop fuse_silu_mul_quant: input bf16/fp16 [M, 2I]")
    M, inter = input.shape[0], input.shape[1] // 2
    if output is None:
        output = input.new_empty(M, inter, dtype=torch.int8)
    check(output.dtype == torch.int8 and tuple(output.shape) == (M, inter),
          "lightop fuse_silu_mul_quant: output int8 [M, I]")
    if expert_ids is None:
        expert_ids = torch.zeros(M, dtype=torch.int32, device=input.device)
    check(tuple(expert_ids.shape) == (M,), "lightop fuse_silu_mul_quant: expert_ids (M)")
    scales = input.new_empty(M, 1, dtype=torch.float32)
    _silu_quant(input, output, scales, expert_ids)
    return output, scales


def _silu_quant_impl(input: torch.Tensor, output: torch.Tensor, scales: torch.Tensor, expert_ids: torch.Tensor) -> None:
    gate, up = input.float().chunk(2, dim=-1)
    q, s = _int8_rows(torch.nn.functional.silu(gate) * up)
    rows = (expert_ids >= 0).nonzero().squeeze(1)  # padding rows (-1) are not written
    output.index_copy_(0, rows, q.index_select(0, rows))
    scales.index_copy_(0, rows, s.index_select(0, rows))


_silu_quant = opaque("lightop_fuse_silu_mul_quant", _silu_quant_impl, lambda input, output, scales, expert_ids: None,
                     mutates_args=("output", "scales"))


def install_gemm_ops(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop.gemm_ops as vllm_hcu@a38f27d calls it", "0.0.0+emulated",
         m_grouped_w8a8_gemm_nt_contig_asm)


def install_activation(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop.activation as vllm_hcu@a38f27d calls it", "0.0.0+emulated", fuse_silu_mul_quant)


def install_quant(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop.quant as vllm_hcu calls it", "0.0.0+emulated", per_token_quant_int8)
