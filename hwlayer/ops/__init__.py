"""The hwlayer op catalogue: every op's contract and its generic torch implementation.

This package is the one a backend author reads. Each op is defined once, in the module of its
family: its signature and docstring are the contract (shapes, dtypes, layout, semantics, edge
cases) and its body is the generic torch implementation, the default on every device.

* :mod:`.norms` -- ``rms_norm``, ``layer_norm``
* :mod:`.rotary` -- ``rope``
* :mod:`.attention` -- ``kv_cache_write``, ``lightning_indexer``, ``sparse_mla_attention`` (DSA)
* :mod:`.moe` -- ``moe_route``, ``moe_permute``, ``moe_unpermute``, ``grouped_gemm``,
  ``silu_and_mul``, and the composite ``fused_experts``
* :mod:`.ep` -- ``all_to_all``, ``ep_dispatch``, ``ep_combine`` (expert parallelism)
* :mod:`.sampling` -- ``sample``
* :mod:`.quant` -- ``quant_linear``, ``quant_grouped_gemm``, the composite ``quant_fused_experts`` and
  ``prepare_weight`` (a weight converted once at load into the layout a backend wants) (weights
  kept in ``fp8_block`` / ``int8`` / ``w8a8_static`` / ``w4a8``: :class:`~.quant.QuantizedWeight`,
  the formats, and the activation quantization each contract fixes)
* :mod:`.layout` -- the validation and index helpers below layouts need (``check_tensor``,
  ``check_varlen``, ``token_positions``, ``positions_to_slots``, ``value_checks``, ...), public
  for adapters
* :mod:`.cache` -- the paged-cache objects the cache ops take (:class:`~.cache.PagedKV`) and
  :class:`~.cache.AttentionLayout`, what a backend declares about them (hook specs 2.0)
* :mod:`.contracts` -- the shape / dtype check of each contract, run once by the dispatcher

:data:`CATALOGUE` lists the ops in a fixed order (``hwlayer ops`` prints them in it). A backend overrides an op by
registering a function with the same signature through ``hwlayer_register_ops``; it never changes
the contract. Vendor argument conventions (cumulative vs count group lists, BSND vs TND, PA_BSND
caches) are converted inside the vendor's adapter.

Layout conventions shared by all ops (the serving layout):

* Token-major varlen batches: tokens of all sequences are concatenated along dim 0 (``T`` rows).
  ``cu_seqlens_q`` (int32 ``[B + 1]``, starting at 0) delimits each sequence's query tokens and
  ``seq_lens`` (int32 ``[B]``) is each sequence's total context length *including* these tokens.
  The query tokens of sequence ``b`` are its last ``n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]``
  tokens, so query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - n_b + i`` and
  causally sees positions ``0 .. that position`` (right-aligned causal, Ascend ``sparse_mode=3``).
* Paged caches: the backend's cache objects (:class:`~.cache.PagedKV`, laid out as its
  :class:`~.cache.AttentionLayout` decides), whose canonical view is ``[num_blocks, block_size,
  dim]`` (the canonical layout stores exactly that tensor, which the ops also accept);
  ``block_table`` (int32 ``[B, max_blocks]``) maps sequence ``b``'s position ``p`` to slot
  ``block_table[b, p // block_size] * block_size + p % block_size``. A ``slot_mapping`` addresses
  the flattened ``[num_blocks * block_size, dim]``.
* Positions handed between ops (``lightning_indexer`` -> ``sparse_mla_attention``) are positions
  within the sequence, int32, ``-1`` meaning "no key".
* Per-step tables: ``rope``, ``kv_cache_write``, ``lightning_indexer`` and ``sparse_mla_attention``
  take an optional keyword ``meta`` (:class:`.layout.AttentionMetadata`, built once per step by
  :func:`.layout.attention_metadata`: token -> sequence map, key slots, rope rows, whether any slot
  is ``-1``), so a model's layers do not each rebuild them. Results never depend on it; an
  implementation may ignore it (hook specs 1.2; older implementations are called without it).

Generic implementations validate their inputs and raise ``ValueError`` naming the op, the
argument, what was expected and what was given; in front of a backend's implementation the
dispatcher runs the same shape / dtype checks (:mod:`.contracts`), so ``supports`` predicates
state kernel limits only.

No op reads a device tensor on the host to size or validate anything (a device->host read stalls
the host until the device drains, and cannot be captured in a device graph): sizes come from
shapes or from host-side arguments (``max_seqlen_q`` / ``max_seqlen_k``, as flash-attn's varlen
API takes them); outputs whose natural size depends on data (``moe_permute``'s kept rows) have a
fixed size with the data-dependent part described by device tensors. Checks of values (indices in
range, monotone ``cu_seqlens_q``) run only under ``HWLAYER_CHECK=1`` (on in the test and
conformance suites); shape and dtype checks always run. Call ops through a dispatch plan
(``hwlayer.plan()``), not from this module, unless you want the generic path on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import kv_cache_write, lightning_indexer, sparse_mla_attention
from .cache import CANONICAL, AttentionLayout, ContiguousKV, PagedKV, SplitKV
from .ep import EPCapacityHandle, EPHandle, EPTokenHandle, all_to_all, ep_combine, ep_dispatch
from .layout import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    AttentionMetadata,
    attention_metadata,
    check_tensor,
    check_varlen,
    chunk_rows,
    fail,
    positions_to_slots,
    token_positions,
    value_checks,
)
from .moe import fused_experts_factory, grouped_gemm, moe_permute, moe_route, moe_unpermute, silu_and_mul
from .norms import layer_norm, rms_norm
from .quant import QuantizedWeight, prepare_weight, quant_fused_experts_factory, quant_grouped_gemm, quant_linear
from .rotary import rope
from .sampling import sample


@dataclass(frozen=True)
class OpSpec:
    """One catalogue entry. ``composite`` ops are built from other ops: their default is a
    factory that receives the dispatch plan and returns the implementation, so a vendor that
    overrides only a part (say ``grouped_gemm``) speeds up the composite too."""

    name: str
    default: Callable
    composite: bool = False

    @property
    def summary(self) -> str:
        doc = (self.default.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


# The catalogue, in its fixed order: plans resolve, and listings print, the ops in this order.
CATALOGUE: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("rms_norm", rms_norm),
        OpSpec("layer_norm", layer_norm),
        OpSpec("rope", rope),
        OpSpec("kv_cache_write", kv_cache_write),
        OpSpec("lightning_indexer", lightning_indexer),
        OpSpec("sparse_mla_attention", sparse_mla_attention),
        OpSpec("moe_route", moe_route),
        OpSpec("moe_permute", moe_permute),
        OpSpec("moe_unpermute", moe_unpermute),
        OpSpec("grouped_gemm", grouped_gemm),
        OpSpec("silu_and_mul", silu_and_mul),
        OpSpec("fused_experts", fused_experts_factory, composite=True),
        OpSpec("all_to_all", all_to_all),
        OpSpec("ep_dispatch", ep_dispatch),
        OpSpec("ep_combine", ep_combine),
        OpSpec("sample", sample),
        OpSpec("quant_linear", quant_linear),
        OpSpec("quant_grouped_gemm", quant_grouped_gemm),
        OpSpec("quant_fused_experts", quant_fused_experts_factory, composite=True),
        OpSpec("prepare_weight", prepare_weight),
    )
}

OP_NAMES: tuple[str, ...] = tuple(CATALOGUE)

__all__ = [
    "CANONICAL",
    "CATALOGUE",
    "AttentionLayout",
    "ContiguousKV",
    "PagedKV",
    "SplitKV",
    "FLOAT_DTYPES",
    "AttentionMetadata",
    "INDEX_DTYPES",
    "OP_NAMES",
    "EPCapacityHandle",
    "EPHandle",
    "EPTokenHandle",
    "OpSpec",
    "QuantizedWeight",
    "all_to_all",
    "attention_metadata",
    "check_tensor",
    "check_varlen",
    "chunk_rows",
    "ep_combine",
    "ep_dispatch",
    "fail",
    "fused_experts_factory",
    "grouped_gemm",
    "kv_cache_write",
    "layer_norm",
    "lightning_indexer",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "positions_to_slots",
    "prepare_weight",
    "quant_fused_experts_factory",
    "quant_grouped_gemm",
    "quant_linear",
    "rms_norm",
    "rope",
    "sample",
    "silu_and_mul",
    "sparse_mla_attention",
    "token_positions",
    "value_checks",
]
