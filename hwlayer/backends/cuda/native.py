"""Native-library adapters for the CUDA family: our op contracts in, the library's convention out.

Written against the libraries' documented APIs and sources (cited per adapter) and NOT run on
hardware; CI runs them against CPU emulators of those APIs (``conformance/emulators``,
``pytest conformance --backend cuda|metax|hygon --emulated``). Every adapter sits behind a
``supports`` predicate that checks the library is importable and the call's shapes/dtypes are ones
the library takes; anything else goes to the Triton tier and then to generic torch. Libraries are
imported inside functions only.

Libraries and the ops they serve:

* FlashMLA ``flash_mla.flash_mla_sparse_fwd`` (NVIDIA SM90/SM100; MetaX ships a MACA build) for
  ``sparse_mla_attention``: our per-sequence positions + block table become FlashMLA's global slot
  ids over the flattened cache (``-1`` kept), top-k is padded to whole 128-wide blocks, heads are
  zero-padded to 64 or 128 (current API: exactly those; more than 128 heads decline), and the lse
  base is taken from the API generation: natural log when the signature has ``topk_length``
  (deepseek-ai/FlashMLA 082094b, 2026-01-16, ``tests/ref.py`` uses ``logsumexp``), base 2 before it
  (converted to natural log). MetaX's mcFlashMLA (c2dbf6e) returns a natural-log lse although its
  docstring says "2-based" (the kernel, ``csrc/flash_kernel/feature/softmax.h:450``, wins). NVIDIA
  FlashMLA runs only on sm90a / sm100f (checked before calling) and asserts ``topk > 0`` (an empty
  index tensor is answered without calling it).
* DeepGEMM for the ``lightning_indexer`` scoring: MACA's ``bf16_mqa_logits`` where the build has it
  (lossless; what vLLM-metax 3aadf08 uses); on NVIDIA ``fp8_paged_mqa_logits`` over the FP8 paged
  indexer cache that the cuda layout (:class:`DeepGemmLayout`) allocates under ``HWLAYER_FP8_INDEXER=1``
  (FP8 scoring can change which positions make the top-k, so it is opt-in): keys quantised once when
  written, read in place, the kernel's schedule built once per step (vLLM's design).
* vLLM's ``torch.ops._C.rms_norm`` / ``fused_add_rms_norm`` for ``rms_norm``, registered by
  ``vllm._C`` on NVIDIA and by ``mcoplib._C`` on MetaX (``import mcoplib`` alone registers nothing:
  mcoplib f722323 ``mcoplib/__init__.py``; vLLM-metax ``platform.py`` imports ``mcoplib._C``).
* Hygon ``lightop.norm`` for ``rms_norm``: ``fused_add_rms_norm`` (in place) with a residual,
  ``rmsnorm_forward_autograd`` without; widths under 64 decline (Hygon's vllm_hcu plugin:
  "lightop's HCU RMSNorm kernel currently rejects reductions narrower than one wave").
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Any

import torch

from hwlayer.ops import positions_to_slots, token_positions
from hwlayer.ops.cache import (
    AttentionLayout,
    Fp8IndexerLayout,
    Fp8PagedKV,
    PagedIndexerTables,
    PagedKV,
    tables_for_call,
)
from hwlayer.ops.layout import AttentionMetadata, sequence_key_slots
from hwlayer.plugin import emulation_note  # noqa: F401  (re-exported: the family's emulation switch)


@functools.cache
def importable(module: str) -> bool:
    """Whether ``module`` imports (cached). Imports it: call only from supports()/adapters."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        importlib.import_module(module)
        return True
    except Exception:
        return False


FAMILY = ("cuda", "hygon", "metax", "iluvatar", "kunlunxin")


def device_type() -> str:
    """``cuda``, or ``cpu`` while a CUDA-family backend is emulated in a test process."""
    marker = sys.modules.get("hwlayer_emulation")
    return "cpu" if getattr(marker, "BACKEND", None) in FAMILY else "cuda"


def _cuda_tensors(*tensors: Any) -> bool:
    dev = device_type()
    return all(isinstance(t, torch.Tensor) and t.device.type == dev for t in tensors)


# --------------------------------------------------------------------------------------------
# rms_norm through vLLM-compatible custom ops (torch.ops._C), registered by vllm._C or mcoplib


@functools.cache
def _vllm_c_ops(provider: str) -> Any:
    """``torch.ops._C`` once ``provider`` (``vllm._C`` or ``mcoplib._C``) registered it, else None."""
    if not importable(provider):
        return None
    ops = torch.ops._C
    return ops if hasattr(ops, "rms_norm") and hasattr(ops, "fused_add_rms_norm") else None


def _rms_norm_shape_ok(x: Any, weight: Any, residual: Any) -> bool | str:
    if not _cuda_tensors(x, weight) or (residual is not None and not _cuda_tensors(residual)):
        return "needs CUDA tensors"
    if weight.dtype != x.dtype:
        return "the custom op wants x and weight in one dtype"  # it templates both on one scalar type
    return True


def make_vllm_rms_norm(provider: str) -> tuple[Any, Any]:
    """(implementation, supports) of ``rms_norm`` over ``torch.ops._C`` registered by ``provider``."""

    def supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
        if _vllm_c_ops(provider) is None:
            return f"{provider} (torch.ops._C.rms_norm) is not importable"
        return _rms_norm_shape_ok(x, weight, residual)

    def rms_norm(
        x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = _vllm_c_ops(provider)
        if residual is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # the op checks out is contiguous
            ops.rms_norm(out, x.contiguous(), weight.contiguous(), eps)  # rms_norm(out, input, weight, epsilon)
            return out
        # fused_add_rms_norm works in place (input <- normed, residual <- input + residual) and wants
        # a contiguous residual; the contract leaves inputs untouched, so it works on copies.
        normed = x.clone(memory_format=torch.contiguous_format)
        summed = residual.clone(memory_format=torch.contiguous_format)
        ops.fused_add_rms_norm(normed, summed, weight.contiguous(), eps)
        return normed, summed

    rms_norm.__qualname__ = f"rms_norm[{provider}]"
    return rms_norm, supports


# --------------------------------------------------------------------------------------------
# rms_norm on Hygon through lightop


LIGHTOP_MIN_WIDTH = 64  # vllm_hcu: _LIGHTOP_RMSNORM_MIN_COLS, "narrower than one wave" is rejected


def lightop_rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if not importable("lightop.norm"):
        return "lightop is not importable"
    ok = _rms_norm_shape_ok(x, weight, residual)
    if ok is not True:
        return ok
    if x.shape[-1] < LIGHTOP_MIN_WIDTH:
        return f"lightop's RMSNorm rejects widths under {LIGHTOP_MIN_WIDTH} (one wave), got {x.shape[-1]}"
    return True


def lightop_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    from lightop import norm

    if residual is None:
        return norm.rmsnorm_forward_autograd(x.contiguous(), weight.contiguous(), eps, False)  # (x, w, eps, training)
    # In place, as vllm_hcu calls it (x <- normed, residual <- x + residual): work on copies.
    normed = x.clone(memory_format=torch.contiguous_format)
    summed = residual.clone(memory_format=torch.contiguous_format)
    norm.fused_add_rms_norm(normed, summed, weight.contiguous(), eps)
    return normed, summed


# --------------------------------------------------------------------------------------------
# sparse_mla_attention through FlashMLA


@functools.lru_cache(maxsize=8)  # per function object: supports() asks on every call
def flash_mla_natural_lse(fn: Any) -> bool:
    """Whether NVIDIA's ``flash_mla_sparse_fwd`` returns a natural-log lse. FlashMLA 082094b
    (2026-01-16) switched sparse prefill from base 2 to natural log and added ``topk_length`` in the
    same change, without bumping ``__version__``: the signature is the one reliable tell. (MetaX's
    mcFlashMLA is natural log whatever its docstring says: see :func:`make_flash_mla_sparse`.)"""
    try:
        return "topk_length" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a compiled function without a signature: the older API
        return False


def flash_mla_padded_heads(H: int, exact_64_or_128: bool, device: torch.device) -> int | None:
    """Heads after zero-padding for the sparse prefill kernel, or None if it cannot take H.
    Current NVIDIA API: exactly 64 or 128 (``csrc/api/sparse_fwd.h``: "Unsupported h_q"). Older API
    and MACA: a multiple of the kernel's head block (64; 128 on SM100+ for the older NVIDIA build)."""
    if exact_64_or_128:
        return 64 if H <= 64 else 128 if H <= 128 else None
    block = 128 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10 else 64
    return -(-H // block) * block


# FlashMLA's SM90 sparse prefill asserts ``topk % (2 * B_TOPK) == 0`` with B_TOPK 64 and ``topk > 0``
# (deepseek-ai/FlashMLA 9241ae3 ``csrc/sm90/prefill/sparse/phase1.cuh``, ``KernelTemplate::run``); the
# SM100 kernels take multiples of their B_TOPK (64 or 128). 128 satisfies every kernel.
FLASH_MLA_TOPK_ALIGN = 128


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``; under a test emulation (CPU tensors), the one the
    emulation declares (``hwlayer_emulation.CUDA_CAPABILITY``), else None."""
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]
    return getattr(sys.modules.get("hwlayer_emulation"), "CUDA_CAPABILITY", None)


def flash_mla_arch_supported(device: torch.device) -> bool | str:
    """NVIDIA FlashMLA's sparse prefill runs only on sm90a (capability 9.0) and the sm100f family
    (10.x): ``sparse_attn_prefill_interface`` raises otherwise (FlashMLA 9241ae3
    ``csrc/api/sparse_fwd.h``: "only supported on SM90a and SM100f architectures")."""
    cap = device_capability(device)
    if cap is None:
        return "no CUDA compute capability known for this device"
    if cap == (9, 0) or cap[0] == 10:
        return True
    return f"FlashMLA sparse prefill needs sm90a or sm100f; this device is sm{cap[0]}{cap[1]}"


def canonical_tensor(kv_cache: Any) -> torch.Tensor | None:
    """The canonical ``[blocks, bs, D]`` tensor of a cache argument (a :class:`PagedKV` or a bare tensor),
    or None when the backend's layout stores it otherwise (then the generic op serves)."""
    return kv_cache.canonical if isinstance(kv_cache, PagedKV) else kv_cache


def to_global_slots(
    indices: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    """Our per-sequence positions -> slot ids in the flattened ``[num_blocks * block_size]`` cache,
    int32, ``-1`` kept for unused entries (FlashMLA's convention for an invalid index). Device
    arithmetic only: the token count comes from ``indices`` (a host int), the tables from ``meta``
    when the step built them."""
    if meta is not None and meta.block_size == block_size:
        slots = meta.key_slots.index_select(0, meta.seq_idx).gather(1, indices.long().clamp(min=0))
    else:
        seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, indices.shape[0])
        slots = positions_to_slots(block_table, seq_idx, indices, block_size)
    return torch.where(indices >= 0, slots, -1).to(torch.int32)


def make_flash_mla_sparse(maca: bool = False, dcu: bool = False) -> tuple[Any, Any]:
    """(implementation, supports) of ``sparse_mla_attention`` over ``flash_mla.flash_mla_sparse_fwd``.

    ``maca=False``: NVIDIA FlashMLA. Architecture checked first (sm90a / sm100f); lse base and head
    rule from the API generation (:func:`flash_mla_natural_lse`). ``maca=True``: MetaX's mcFlashMLA
    (MetaX-MACA/mcFlashMLA c2dbf6e): heads a multiple of 64, and a natural-log lse -- its kernel
    writes ``row_max * softmax_scale + __logf(sum)`` with the natural ``softmax_scale``
    (``csrc/flash_kernel/feature/softmax.h:450``, ``normalize_softmax_lse``); only ``max_logits`` is
    scaled by ``M_LOG2E``. Its docstring's "2-based log-sum-exp" is wrong; the kernel wins.
    ``dcu=True``: Hygon's DCU build, ``flash_mla.flash_mla_interface.flash_mla_sparse_fwd`` as vllm_hcu
    calls it (``hygon.py`` says where): heads exactly 64 or 128, a natural-log lse (from vllm_hcu's use:
    the DCU kernel source is not public), no NVIDIA architecture check.
    """
    module = "flash_mla.flash_mla_interface" if dcu else "flash_mla"
    label = "DCU FlashMLA" if dcu else "FlashMLA"
    device_name = "DCU (cuda)" if dcu else "CUDA"

    def kernel() -> Any:
        return importlib.import_module(module).flash_mla_sparse_fwd

    def api(fn: Any) -> tuple[bool, bool]:  # (natural lse, heads exactly 64 or 128)
        if maca or dcu:
            return True, dcu
        natural = flash_mla_natural_lse(fn)
        return natural, natural

    def supports(
        q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float,
        v_dim: int, *, meta: Any = None, return_lse: bool = False,
    ) -> bool | str:
        kv = canonical_tensor(kv_cache)
        if kv is None:
            return f"{label} reads one contiguous [slots, 1, 576] latent cache (the canonical layout)"
        if not _cuda_tensors(q, kv, indices, block_table, cu_seqlens_q, seq_lens):
            return f"needs {device_name} tensors"
        if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
            return f"{label} sparse prefill takes bf16 q and kv"
        if q.shape[-1] != 576 or v_dim != 512:
            return f"{label} sparse prefill takes d_qk 576 with d_v 512"
        if not kv.is_contiguous():
            return f"{label} reads the cache as one flat [slots, 1, 576] tensor: needs it contiguous"
        if not importable(module):
            return f"{module} is not importable"
        if not (maca or dcu) and (ok := flash_mla_arch_supported(q.device)) is not True:
            return ok
        if flash_mla_padded_heads(q.shape[1], api(kernel())[1], q.device) is None:
            return f"{label} sparse prefill takes exactly 64 or 128 query heads; {q.shape[1]} cannot be padded to them"
        return True

    def sparse_mla_attention(
        q: torch.Tensor, kv_cache: PagedKV | torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int, *,
        meta: AttentionMetadata | None = None, return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        flash_mla_sparse_fwd = kernel()
        kv = canonical_tensor(kv_cache)
        T, H, Dk = q.shape
        if T == 0 or indices.shape[1] == 0:  # FlashMLA asserts topk > 0: no index, nothing to attend
            out = q.new_zeros(T, H, v_dim)
            return (out, torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)) if return_lse else out
        slots = to_global_slots(indices, block_table, cu_seqlens_q, seq_lens, kv.shape[1], meta)
        # Pad topk to whole kernel blocks (extra entries invalid) and heads to what the kernel takes (zero queries).
        topk_pad = -slots.shape[1] % FLASH_MLA_TOPK_ALIGN
        if topk_pad:
            slots = torch.nn.functional.pad(slots, (0, topk_pad), value=-1)
        natural, exact = api(flash_mla_sparse_fwd)
        heads = flash_mla_padded_heads(H, exact, q.device)
        q_in = q if heads == H else torch.nn.functional.pad(q, (0, 0, 0, heads - H))
        out, _max_logits, lse = flash_mla_sparse_fwd(
            q_in.contiguous(), kv.view(-1, 1, Dk), slots.unsqueeze(1).contiguous(), scale, d_v=v_dim
        )
        # Our contract: no valid index -> out 0, lse -inf (FlashMLA: +inf). Masked on the device, no branch.
        empty = (indices < 0).all(dim=1)
        out = out[:, :H].to(q.dtype).masked_fill(empty[:, None, None], 0.0)
        if not return_lse:  # the kernel's lse comes for free; converting it is only done when asked
            return out
        lse = lse[:, :H].float()
        if not natural:
            lse = lse * math.log(2.0)  # base-2 lse (FlashMLA before 082094b) -> natural
        return out, lse.masked_fill(empty[:, None], float("-inf"))

    name = "mcflashmla" if maca else "dcuflashmla" if dcu else "flashmla"
    sparse_mla_attention.__qualname__ = f"sparse_mla_attention[{name}]"
    supports.__qualname__ = f"sparse_mla_attention_supports[{name}]"
    return sparse_mla_attention, supports


flash_mla_sparse_attention, flash_mla_sparse_supports = make_flash_mla_sparse(maca=False)
maca_flash_mla_sparse_attention, maca_flash_mla_sparse_supports = make_flash_mla_sparse(maca=True)


# --------------------------------------------------------------------------------------------
# lightning_indexer scoring through DeepGEMM: MACA bf16 (lossless), or FP8 over the FP8 paged
# indexer cache (opt-in)


FP8_MAX = 448.0  # largest finite float8_e4m3fn
MQA_LOGITS_HEADS = (32, 64)  # SM90 (SM100 also takes 8 and 16); csrc/apis/attention.hpp DG_HOST_ASSERTs
MQA_LOGITS_HEAD_DIMS = (32, 64, 128)


def fp8_indexer_enabled() -> bool:
    return os.environ.get("HWLAYER_FP8_INDEXER", "").strip() not in ("", "0")


def _bf16_logits() -> Any:
    """MACA deep_gemm's lossless ``bf16_mqa_logits``, or None (NVIDIA DeepGEMM has no bf16 entry)."""
    return getattr(sys.modules.get("deep_gemm"), "bf16_mqa_logits", None)


def _paged_fp8_logits() -> Any:
    """DeepGEMM's ``fp8_paged_mqa_logits`` when ``deep_gemm`` imports and has it (with its metadata
    builder), else None. Imports deep_gemm: call from layouts, supports() and adapters only."""
    if not importable("deep_gemm"):
        return None
    dg = sys.modules["deep_gemm"]
    ok = all(hasattr(dg, f) for f in ("fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "get_num_sms"))
    return dg.fp8_paged_mqa_logits if ok else None


def paged_block_kv_ok(block_size: int, device: torch.device) -> bool | str:
    """The paged MQA-logits kernels take blocks of 64 tokens on SM90 and 32 or 64 on SM100
    (DeepGEMM 54e2261 ``get_paged_mqa_logits_metadata`` / ``fp8_fp4_paged_mqa_logits`` asserts)."""
    cap = device_capability(device)
    sizes = (32, 64) if cap is not None and cap[0] == 10 else (64,)
    return True if block_size in sizes else f"DeepGEMM's paged MQA logits take blocks of {sizes}, got {block_size}"


def paged_indexer_tables(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                         num_tokens: int, block_size: int, max_context_len: int,
                         meta: AttentionMetadata | None = None, *, maca: bool = False) -> PagedIndexerTables:
    """:class:`PagedIndexerTables` of a varlen batch: device arithmetic plus DeepGEMM's metadata kernel,
    nothing read back (``meta``'s token -> sequence map when given). ``maca=True``: MACA's
    ``bf16_paged_mqa_logits`` as vLLM-metax decodes: 1-D context lens ``[T]`` (its plain-decode
    ``seq_lens``), the schedule over the device's compute units, blocks of 64 only."""
    import deep_gemm

    if meta is not None:
        seq_idx = meta.seq_idx
        pos = meta.first_query_pos.index_select(0, seq_idx) + torch.arange(num_tokens, device=seq_idx.device) \
            - cu_seqlens_q.index_select(0, seq_idx)
    else:
        seq_idx, pos = token_positions(cu_seqlens_q, seq_lens, num_tokens)
    context = (pos + 1).to(torch.int32).view(num_tokens, 1)
    table = block_table.index_select(0, seq_idx).to(torch.int32)
    schedule = None
    if maca:
        context = context.view(num_tokens)
        if block_size == MACA_PAGED_BLOCK:
            schedule = deep_gemm.get_paged_mqa_logits_metadata(context, block_size, _compute_units(block_table.device))
    elif paged_block_kv_ok(block_size, block_table.device) is True:
        schedule = deep_gemm.get_paged_mqa_logits_metadata(context, block_size, deep_gemm.get_num_sms())
    return PagedIndexerTables(context, table, schedule, max_context_len, block_size)


class DeepGemmLayout(Fp8IndexerLayout):
    """The cuda backend's layout: canonical, except that with ``HWLAYER_FP8_INDEXER=1`` and a DeepGEMM
    that has ``fp8_paged_mqa_logits`` the DSA indexer key cache is FP8 with per-row scales
    (:class:`~hwlayer.ops.cache.Fp8PagedKV`, 132 bytes a token for 128-wide keys instead of 256), quantized
    once when written and read in place by the kernel, with the kernel's per-step tables built once per
    step (:class:`PagedIndexerTables`). That is vLLM's design (vllm-project/vllm@006475fe
    ``vllm/model_executor/layers/sparse_attn_indexer.py``: ``ops.indexer_k_quant_and_cache`` at the
    write, ``fp8_fp4_paged_mqa_logits`` over the cache with the metadata builder's ``schedule_metadata``).
    The latent cache stays canonical (FlashMLA's sparse prefill reads it)."""

    default_block_size = 64  # what the paged MQA-logits kernels take on SM90
    fp8_name = "deepgemm-fp8-indexer"

    @property
    def fp8_indexer(self) -> bool:
        return fp8_indexer_enabled() and _paged_fp8_logits() is not None

    def paged_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor) -> PagedIndexerTables | None:
        return paged_indexer_tables(cu_seqlens_q, seq_lens, block_table, meta.num_tokens, meta.block_size,
                                    meta.max_seqlen_k, meta)


CUDA_LAYOUT = DeepGemmLayout()


# MetaX: MACA deep_gemm's bf16 paged MQA logits read the canonical bf16 indexer cache in place at decode.
MACA_PAGED_BLOCK = 64  # vLLM-metax 6162d93 MacaDeepseekV32IndexerBackend.get_supported_kernel_block_sizes


def _paged_bf16_logits() -> Any:
    """MACA deep_gemm's ``bf16_paged_mqa_logits`` when ``deep_gemm`` imports and has it and its metadata
    builder ``get_paged_mqa_logits_metadata`` (what vLLM-metax 6162d93 calls), else None."""
    if not importable("deep_gemm"):
        return None
    dg = sys.modules["deep_gemm"]
    ok = all(hasattr(dg, f) for f in ("bf16_paged_mqa_logits", "get_paged_mqa_logits_metadata"))
    return dg.bf16_paged_mqa_logits if ok else None


def _compute_units(device: torch.device) -> int:
    """The schedule's width: the device's compute units, as vLLM-metax sizes it (``num_compute_units``:
    ``multi_processor_count``). CPU tensors occur only under the test emulation, where the schedule's
    width does not change the logits."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def is_decode_step(num_tokens: int, num_seqs: int) -> bool:
    """A decode step: one query token per sequence (host ints). vLLM-metax scores decode rows with the paged
    kernel and gathers keys only for prefill chunks."""
    return num_tokens == num_seqs and num_tokens > 0


class MacaLayout(AttentionLayout):
    """The metax backend's layout: the canonical caches (the bf16 indexer cache is what MACA's
    ``bf16_paged_mqa_logits`` reads, viewed ``[blocks, bs, 1, D]``), plus, for a decode step when
    deep_gemm has the paged entry, the kernel's per-step tables (:class:`PagedIndexerTables`, 1-D
    context lens) built once per step -- vLLM-metax 6162d93 ``v1/attention/backends/mla/indexer.py``
    (``DeepseekV32IndexerMetadataBuilder.build``: ``get_paged_mqa_logits_metadata(seq_lens, 64,
    num_sms)`` into ``schedule_metadata``)."""

    default_block_size = MACA_PAGED_BLOCK

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> PagedIndexerTables | None:
        if (meta is None or meta.block_size != MACA_PAGED_BLOCK
                or not is_decode_step(meta.num_tokens, seq_lens.shape[0]) or _paged_bf16_logits() is None):
            return None
        return paged_indexer_tables(cu_seqlens_q, seq_lens, block_table, meta.num_tokens, meta.block_size,
                                    meta.max_seqlen_k, meta, maca=True)


METAX_LAYOUT = MacaLayout()


def deep_gemm_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    if q.shape[1] not in MQA_LOGITS_HEADS or q.shape[2] not in MQA_LOGITS_HEAD_DIMS:
        return f"DeepGEMM mqa logits take {MQA_LOGITS_HEADS} heads of dim {MQA_LOGITS_HEAD_DIMS}"
    if isinstance(k_cache, Fp8PagedKV):  # the FP8 layout exists only when opted in
        if not _cuda_tensors(q, weights, k_cache.data, block_table, cu_seqlens_q, seq_lens):
            return "needs CUDA tensors"
        if _paged_fp8_logits() is None:
            return "deep_gemm with fp8_paged_mqa_logits is not importable"
        return paged_block_kv_ok(k_cache.block_size, q.device)
    keys = canonical_tensor(k_cache)
    if keys is None:
        return "DeepGEMM's mqa logits read the canonical key cache or the FP8 paged indexer cache"
    if not _cuda_tensors(q, weights, keys, block_table, cu_seqlens_q, seq_lens):
        return "needs CUDA tensors"
    if not importable("deep_gemm"):
        return "deep_gemm is not importable"
    if _use_bf16_logits(q, keys):
        return True
    if not fp8_indexer_enabled():
        return "FP8 scoring can change the top-k; opt in with HWLAYER_FP8_INDEXER=1"
    # Scoring a bf16 cache in FP8 would gather and re-quantize every key per call: FP8 scoring reads the
    # FP8 paged cache that the cuda layout allocates when opted in.
    return (f"FP8 scoring reads the FP8 paged indexer cache (the cuda layout allocates it under "
            f"HWLAYER_FP8_INDEXER=1 when deep_gemm has fp8_paged_mqa_logits); this cache holds {keys.dtype} rows")


def _use_bf16_logits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """bf16 scoring is lossless only for bf16 inputs; fp16/fp32 inputs would be rounded."""
    return _bf16_logits() is not None and q.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3 quantisation over the last dim: (values, fp32 scale with the row shape)."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def indexer_key_layout(
    block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
    block_size: int, max_seqlen_k: int | None, meta: AttentionMetadata | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-paged key layout DeepGEMM's ``fp8_mqa_logits`` / ``bf16_mqa_logits`` read, sized by host
    ints only: sequence b's positions ``0 .. max_seqlen_k - 1`` at rows ``b * max_seqlen_k + p``.
    Returns ``(key_slots int64 [B * max_seqlen_k], ks int32 [T], ke int32 [T])``: the cache slot of
    every key row and each token's causal key range ``[ks, ke)`` (rows past a sequence's length are
    never inside a range). ``meta``'s tables are used when the step built them; ``max_seqlen_k=None``
    reads the longest context from the device (the op's documented convenience; a forward passes it)."""
    B = seq_lens.shape[0]
    if meta is not None and meta.block_size == block_size and (max_seqlen_k in (None, meta.max_seqlen_k)):
        key_slots, L, seq_idx = meta.key_slots, meta.max_seqlen_k, meta.seq_idx
        pos = meta.first_query_pos.index_select(0, seq_idx) + torch.arange(num_tokens, device=seq_idx.device) \
            - cu_seqlens_q.index_select(0, seq_idx)
    else:
        L = int(seq_lens.max()) if max_seqlen_k is None and B else (max_seqlen_k or 0)
        key_slots = sequence_key_slots(block_table, B, L, block_size)
        seq_idx, pos = token_positions(cu_seqlens_q, seq_lens, num_tokens)
    ks = seq_idx * L
    return key_slots.reshape(-1), ks.to(torch.int32), (ks + pos + 1).to(torch.int32)


def topk_positions(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int) -> torch.Tensor:
    """``[T, N]`` logits over the laid-out keys -> int32 ``[T, topk]`` positions within each token's
    sequence (``column - ks``), ``-1`` where fewer than ``topk`` keys are in range. Keys outside a
    token's ``[ks, ke)`` are never candidates, whatever the kernel left there. Device only."""
    T = logits.shape[0]
    cols = torch.arange(logits.shape[1], device=logits.device)
    outside = (cols[None, :] < ks.long()[:, None]) | (cols[None, :] >= ke.long()[:, None])
    logits = logits.float().masked_fill(outside, float("-inf"))
    k = min(topk, logits.shape[1])
    vals, idx = logits.topk(k, dim=-1)
    picked = torch.where(torch.isfinite(vals), idx - ks.long().unsqueeze(1), -1).to(torch.int32)
    if k == topk:
        return picked
    return torch.nn.functional.pad(picked, (0, topk - k), value=-1) if T else picked.new_full((0, topk), -1)


def deep_gemm_lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: PagedKV | torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    if isinstance(k_cache, Fp8PagedKV):
        return _fp8_paged_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                                  max_seqlen_k, meta)
    k_cache = canonical_tensor(k_cache)
    T = q.shape[0]
    if (is_decode_step(T, seq_lens.shape[0]) and k_cache.shape[1] == MACA_PAGED_BLOCK and _use_bf16_logits(q, k_cache)
            and _paged_bf16_logits() is not None):
        return _bf16_paged_indexer(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, topk, scale,
                                   max_seqlen_k, meta)
    # Prefill: MACA's bf16_mqa_logits (non-paged) reads one contiguous key buffer, every sequence's keys
    # gathered into it, [B * max_seqlen_k, D], sized by host ints (nothing read back), as vLLM-metax does.
    key_slots, ks, ke = indexer_key_layout(block_table, cu_seqlens_q, seq_lens, T, k_cache.shape[1], max_seqlen_k,
                                           meta)
    keys = k_cache.reshape(-1, k_cache.shape[-1]).index_select(0, key_slots)
    if keys.shape[0] == 0 or T == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    # bf16 q [M, H, D], bf16 keys [N, D], fp32 weights (vLLM-metax); relu(s x) = s relu(x) for s > 0
    w = (weights.float() * scale).contiguous()
    logits = _bf16_logits()(q.contiguous(), keys.contiguous(), w, ks, ke)
    return topk_positions(logits, ks, ke, topk)


def _fp8_paged_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: Fp8PagedKV, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float, max_seqlen_k: int | None,
    meta: AttentionMetadata | None,
) -> torch.Tensor:
    """DeepGEMM ``fp8_paged_mqa_logits`` over the FP8 paged cache in place: no key is gathered or
    re-quantized per call; only the queries (q-sized) are quantized, per (token, head) row so none
    saturates, their scale and ours folded into the head weights (relu(s x) = s relu(x), s > 0; vLLM's
    ``fused_indexer_q_rope_quant`` folds its q scale likewise)."""
    T = q.shape[0]
    bs = k_cache.block_size
    tables = tables_for_call(meta, bs, max_seqlen_k, seq_lens, lambda L, m: paged_indexer_tables(
        cu_seqlens_q, seq_lens, block_table, T, bs, L, m))
    if T == 0 or tables.max_context_len == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    import deep_gemm

    q_fp8, q_scale = _fp8_rows(q)  # per (token, head)
    w = (weights.float() * q_scale * scale).contiguous()
    logits = deep_gemm.fp8_paged_mqa_logits(q_fp8.unsqueeze(1).contiguous(), k_cache.fused(), w, tables.context_lens,
                                            tables.block_table, tables.schedule, tables.max_context_len,
                                            clean_logits=False)  # with 2-D context lens the kernel cannot clean
    # Columns are positions within the token's sequence; those at or past its context length are unwritten.
    ke = tables.context_lens.view(T)
    return topk_positions(logits, torch.zeros_like(ke), ke, topk)


def _bf16_paged_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float, max_seqlen_k: int | None,
    meta: AttentionMetadata | None,
) -> torch.Tensor:
    """A MetaX decode step: MACA ``bf16_paged_mqa_logits`` over the canonical bf16 indexer cache in place
    (``kv_cache.unsqueeze(-2)``, a view), as vLLM-metax 6162d93 decodes
    (``customized/layers/sparse_attn_indexer/bf16.py``: q ``[B, next_n, H, D]``, the cache
    ``[blocks, bs, 1, D]``, 1-D ``seq_lens``, the block table, the step's ``schedule_metadata``,
    ``max_model_len``; ``utils/deep_gemm.py`` passes ``clean_logits=True``). Every token is one row with
    ``next_n = 1``; no key is gathered. The tables come from the step (:class:`MacaLayout`), else are
    built here."""
    T = q.shape[0]
    bs = k_cache.shape[1]
    tables = tables_for_call(meta, bs, max_seqlen_k, seq_lens, lambda L, m: paged_indexer_tables(
        cu_seqlens_q, seq_lens, block_table, T, bs, L, m, maca=True), one_dim=True)
    if tables.max_context_len == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    w = (weights.float() * scale).contiguous()  # relu(s x) = s relu(x) for s > 0
    logits = _paged_bf16_logits()(q.unsqueeze(1).contiguous(), k_cache.unsqueeze(-2), w, tables.context_lens,
                                  tables.block_table, tables.schedule, tables.max_context_len)
    # Columns are positions within the token's sequence; those at or past its context length are -inf.
    return topk_positions(logits, torch.zeros_like(tables.context_lens), tables.context_lens, topk)
