"""hwlayer ops on Moore Threads' mate library: argument conversion, the mate call, conversion back.

Written against mate's FlashMLA- and DeepGEMM-compatible API (``mate.flashmla``,
``mate.deep_gemm``, ``mate.moe_fused_gate``) as documented by the vendor and used by vllm-musa,
NOT run on hardware. Every adapter is behind a ``supports_*`` guard; declined calls run hwlayer's
generic torch implementation. Details no source confirmed are marked "unverified".
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

from . import convert

# Whether mate's flash_mla_sparse_fwd reports lse in base 2 (unverified; FlashMLA's interface
# documents a natural-log lse). Conformance on hardware settles it: lse is compared to the golden.
LSE_IS_LOG2 = False


@cache
def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a runtime that fails to initialise
        return None, f"{name} is not importable ({type(exc).__name__}: {exc})"


def _module(name: str) -> ModuleType:
    mod, why = _import(name)
    if mod is None:
        raise RuntimeError(why)
    return mod


def _common(x: torch.Tensor, module: str, dtypes: tuple[torch.dtype, ...]) -> bool | str:
    _, why = _import(module)
    if why:
        return why
    if x.device.type != "musa":
        return f"tensor on {x.device.type}, mate needs musa tensors"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} not supported by this mate kernel"
    return True


# ---- sparse_mla_attention: mate.flashmla.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v) -> (out, max_logits, lse)


def supports_sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim):
    ok = _common(q, "mate.flashmla", (torch.bfloat16,))
    if ok is not True:
        return ok
    if q.shape[-1] != 576 or v_dim != 512:
        return f"head dims {q.shape[-1]}/{v_dim}: the sparse kernel is built for 576/512 (DeepSeek MLA)"
    if q.shape[1] not in (64, 128):
        return f"{q.shape[1]} query heads: the sparse kernel takes 64 or 128 (pad heads first)"
    if indices.shape[1] % 64:
        return f"top-k {indices.shape[1]} not a multiple of 64 (kernel block; unverified for mate)"
    if kv_cache.dtype != torch.bfloat16:
        return f"kv_cache dtype {kv_cache.dtype}: the prefill kernel takes a bf16 latent cache"
    return True


def sparse_mla_attention(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim):
    kv_indices = convert.sparse_kv_indices(indices, block_table, cu_seqlens_q, seq_lens, kv_cache.shape[1])
    out, _max_logits, lse = _module("mate.flashmla").flash_mla_sparse_fwd(
        q=q.contiguous(), kv=convert.flat_kv(kv_cache), indices=kv_indices, sm_scale=scale, d_v=v_dim
    )
    lse = lse.float() * (0.6931471805599453 if LSE_IS_LOG2 else 1.0)  # ln 2: base-2 -> natural log
    return convert.empty_rows_to_contract(out.to(q.dtype), lse, kv_indices)


# ---- lightning_indexer: mate.deep_gemm.{bf16,fp8}_mqa_logits(q, k, weights, ks, ke) -> logits [T, N]


def _fp8_indexer_enabled() -> bool:
    return os.environ.get("HWLAYER_MUSA_FP8_INDEXER", "") not in ("", "0")


def supports_lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                               max_seqlen_q=None, max_seqlen_k=None):
    ok = _common(q, "mate.deep_gemm", (torch.bfloat16, torch.float16, torch.float32))
    if ok is not True:
        return ok
    if scale <= 0:
        return "scale must be positive (it is folded into the head weights)"
    dg = _module("mate.deep_gemm")
    if not hasattr(dg, "bf16_mqa_logits") and not _fp8_indexer_enabled():
        return ("mate.deep_gemm has no bf16_mqa_logits; fp8_mqa_logits is lossy (top-k may change), "
                "enable it with HWLAYER_MUSA_FP8_INDEXER=1")
    return True


def lightning_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                      max_seqlen_q=None, max_seqlen_k=None):
    keys = convert.gather_sequence_keys(k_cache, block_table, seq_lens)
    ks, ke, _ = convert.indexer_key_ranges(cu_seqlens_q, seq_lens)
    # relu(q.k * scale) = scale * relu(q.k) for scale > 0: fold the scale into the head weights.
    head_weights = (weights.float() * scale).contiguous()
    dg = _module("mate.deep_gemm")
    bf16_logits = getattr(dg, "bf16_mqa_logits", None)
    if bf16_logits is not None:  # signature as MACA deep_gemm's (unverified for mate)
        logits = bf16_logits(q.to(torch.bfloat16).contiguous(), keys.to(torch.bfloat16).contiguous(),
                             head_weights, ks, ke)
    else:  # DeepGEMM fp8_mqa_logits(q, (kv, kv_scales), weights, cu_seq_len_k_start, cu_seq_len_k_end)
        k_fp8, k_scale = convert.fp8_quantize_rows(keys)
        logits = dg.fp8_mqa_logits(q.to(torch.float8_e4m3fn).contiguous(), (k_fp8, k_scale), head_weights, ks, ke)
    return convert.topk_positions_from_logits(logits, ks, ke, topk)


# ---- grouped_gemm: mate.deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
#      (or mate.gemm.ragged_m_moe_gemm_16bit(a, b, m_indices, d, alignment_m=...))


def supports_grouped_gemm(x, w, group_sizes):
    ok = _common(x, "mate.deep_gemm", (torch.bfloat16,))
    if ok is not True:
        return ok
    if w.dtype != torch.bfloat16 or not w.is_contiguous():
        return "w must be a contiguous bf16 [E, N, K] tensor"
    if _grouped_gemm_entry() is None:
        return "this mate has neither deep_gemm.m_grouped_bf16_gemm_nt_contiguous nor gemm.ragged_m_moe_gemm_16bit"
    return True


def _grouped_gemm_entry():
    """The DeepGEMM-named entry if mate.deep_gemm has it, else mate.gemm's ragged-M kernel, which a
    DeepGEMM-compatibility wrapper over mate calls as ``(a, b, m_indices, d, alignment_m=...)``."""
    dg, _ = _import("mate.deep_gemm")
    fn = getattr(dg, "m_grouped_bf16_gemm_nt_contiguous", None) if dg is not None else None
    if fn is not None:
        return lambda a, w, d, m_indices, alignment: fn(a, w, d, m_indices)
    gemm, _ = _import("mate.gemm")
    ragged = getattr(gemm, "ragged_m_moe_gemm_16bit", None) if gemm is not None else None
    if ragged is not None:
        return lambda a, w, d, m_indices, alignment: ragged(a, w, m_indices, d, alignment_m=alignment)
    return None


def grouped_gemm(x, w, group_sizes):
    dg = _module("mate.deep_gemm")
    alignment_fn = getattr(dg, "get_mk_alignment_for_contiguous_layout", None)
    alignment = int(alignment_fn()) if alignment_fn is not None else convert.DEFAULT_GROUP_ALIGNMENT
    source_rows, m_indices = convert.contiguous_layout(group_sizes.to(x.device), alignment)
    a = convert.pad_rows(x.contiguous(), source_rows)
    d = torch.empty(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    _grouped_gemm_entry()(a, w, d, m_indices, alignment)
    return convert.unpad_rows(d, source_rows)


# ---- moe_route: mate.moe_fused_gate(logits, bias, num_expert_group, topk_group, topk, ...) -> (weights, ids)


def supports_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize,
                       routed_scaling_factor):
    ok = _common(router_logits, "mate", (torch.float32, torch.bfloat16, torch.float16))
    if ok is not True:
        return ok
    if not hasattr(_module("mate"), "moe_fused_gate"):
        return "this mate has no moe_fused_gate"
    if not renormalize:
        return "moe_fused_gate always renormalises the top-k weights; renormalize=False goes to the generic path"
    if correction_bias is None:
        return "moe_fused_gate needs a correction bias"
    E = router_logits.shape[1]
    if E & (E - 1) or E // max(n_group, 1) > 32:
        # GLM-5 (256 experts, n_group=1) lands here: 256 experts in one group exceeds the kernel's
        # 32-experts-per-group limit (sgl-kernel-style moe_fused_gate constraint, unverified for mate).
        return f"{E} experts in {n_group} group(s): kernel needs a power-of-two count and <= 32 experts per group"
    return True


def moe_route(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    weights, ids = _module("mate").moe_fused_gate(
        router_logits.float().contiguous(), correction_bias.float().contiguous(), n_group, topk_group, top_k,
        num_fused_shared_experts=0, routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=True,
    )
    return weights.float(), ids.to(torch.int32)
