"""Paged caches owned by the backend (hook specs 2.0): the cache objects the cache ops take, and
:class:`AttentionLayout`, what a backend declares about them (vLLM's ``get_kv_cache_shape`` plus its
attention metadata builder).

A model asks the backend's layout for one cache object per layer and kind (the MLA latent cache;
the DSA indexer key cache) and hands those objects to ``kv_cache_write``, ``lightning_indexer`` and
``sparse_mla_attention`` without looking inside. Every object is a :class:`PagedKV`: whatever its
storage (one tensor, separate nope / rope tensors, later FP8 rows with scales), it offers the
*canonical view*: rows of width ``width`` addressed by flat slot (``block * block_size + offset``),
read with :meth:`PagedKV.rows` and written with :meth:`PagedKV.write`.

Mixing rule (a native op and a generic fallback on one cache): the generic ops read and write any
layout through that canonical view, touching only the rows they address (what the generic ops
gather anyway), never converting a whole cache; so a ``supports()`` that declines one call, or a
plan that serves ``kv_cache_write`` generically and ``sparse_mla_attention`` natively, stays
correct. Implementations written for hook specs 1.x take the canonical ``[blocks, block_size,
width]`` tensor (``PagedKV.canonical``); the dispatcher passes it to them, and leaves them out of
the plan of a backend whose layout has no such tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


class PagedKV:
    """One layer's paged cache of ``width``-wide rows, ``num_blocks * block_size`` flat slots."""

    def __init__(self, num_blocks: int, block_size: int, width: int) -> None:
        self.num_blocks, self.block_size, self.width = num_blocks, block_size, width

    @property
    def canonical(self) -> torch.Tensor | None:
        """The ``[num_blocks, block_size, width]`` tensor when the cache is stored that way, else None."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The storage (what occupies memory)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Canonical rows at flat ``slots`` (int, any shape, every slot valid): ``[*slots.shape, width]``."""
        raise NotImplementedError

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows [n, width]`` (cast to the cache's dtype) into flat ``slots [n]`` (distinct, valid), in place."""
        raise NotImplementedError


class ContiguousKV(PagedKV):
    """The canonical layout: one contiguous ``[num_blocks, block_size, width]`` tensor."""

    def __init__(self, data: torch.Tensor) -> None:
        super().__init__(*data.shape)
        self.data = data

    @property
    def canonical(self) -> torch.Tensor:
        return self.data

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        return self.data.view(-1, self.width).index_select(0, slots.reshape(-1)).view(*slots.shape, self.width)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.data.view(-1, self.width).index_copy_(0, slots, rows.to(self.data.dtype))


class SplitKV(PagedKV):
    """Rows split by columns into separate contiguous caches ``[num_blocks, block_size, w_i]``
    (Ascend: the latent ``c`` and ``k_pe`` apart, as its attention kernels take them); the canonical
    row is their concatenation."""

    def __init__(self, parts: tuple[torch.Tensor, ...]) -> None:
        nb, bs = parts[0].shape[:2]
        super().__init__(nb, bs, sum(p.shape[-1] for p in parts))
        self.parts = parts

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.parts

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        flat = slots.reshape(-1)
        got = [p.view(-1, p.shape[-1]).index_select(0, flat) for p in self.parts]
        return torch.cat(got, dim=-1).view(*slots.shape, self.width)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        at = 0
        for p in self.parts:
            w = p.shape[-1]
            p.view(-1, w).index_copy_(0, slots, rows[:, at:at + w].to(p.dtype))
            at += w


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8PagedKV(PagedKV):
    """FP8 (e4m3) rows with one fp32 scale per row, in DeepGEMM's paged indexer-cache layout (vLLM's FP8
    indexer cache): one ``uint8 [num_blocks, block_size * (width + 4)]`` tensor whose every block holds
    its ``block_size`` rows of ``width`` FP8 codes, then their ``block_size`` fp32 scales
    (deepseek-ai/DeepGEMM@54e2261 ``csrc/apis/attention.hpp`` ``fp8_fp4_paged_mqa_logits``: "Derive FP8
    values and SF tensor"; ``tests/test_attention.py::test_paged_mqa_logits``'s ``kv_cache_cast_to_fp8``).
    Rows are quantized when written (scale ``max(amax, 1e-4) / 448``, as that test casts them; vLLM's
    ``indexer_k_quant_and_cache`` does the same at the cache write) and read back dequantized to
    ``dtype`` through the canonical view, so the generic ops serve it like any layout (the mixing rule)."""

    def __init__(self, num_blocks: int, block_size: int, width: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(num_blocks, block_size, width)
        self.read_dtype = dtype
        self.data = torch.zeros(num_blocks, block_size * (width + 4), dtype=torch.uint8, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.read_dtype  # what the rows read as

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    @property
    def codes(self) -> torch.Tensor:
        """uint8 ``[num_blocks, block_size, width]`` view of the FP8 codes (read them ``.view(float8_e4m3fn)``)."""
        return self.data[:, : self.block_size * self.width].view(self.num_blocks, self.block_size, self.width)

    @property
    def scales(self) -> torch.Tensor:
        """fp32 ``[num_blocks, block_size]`` view of the per-row scales."""
        return self.data[:, self.block_size * self.width:].view(torch.float32)

    def fused(self) -> torch.Tensor:
        """The ``uint8 [num_blocks, block_size, 1, width + 4]`` view DeepGEMM's ``fp8_paged_mqa_logits`` takes."""
        return self.data.view(self.num_blocks, self.block_size, 1, self.width + 4)

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        flat = slots.reshape(-1)
        block, off = flat // self.block_size, flat % self.block_size
        # indexed as bytes (CPU torch has no float8 index kernels), read as e4m3
        got = self.codes[block, off].view(torch.float8_e4m3fn).float() * self.scales[block, off].unsqueeze(1)
        return got.to(self.read_dtype).view(*slots.shape, self.width)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        scale = rows.float().abs().amax(dim=-1).clamp(min=1e-4) / FP8_E4M3_MAX
        codes = (rows.float() / scale.unsqueeze(1)).to(torch.float8_e4m3fn).view(torch.uint8)
        block, off = slots // self.block_size, slots % self.block_size
        self.codes.index_put_((block, off), codes)  # views of ``data``: written in place
        self.scales.index_put_((block, off), scale)


def as_paged(cache: Any) -> PagedKV:
    """A cache argument as a :class:`PagedKV` (a bare ``[blocks, bs, D]`` tensor is the canonical layout)."""
    return ContiguousKV(cache) if isinstance(cache, torch.Tensor) else cache


class AttentionLayout:
    """What a backend owns about attention (``Backend.attention_layout``, hook specs 2.0): how the
    paged caches of a model are stored, and the backend's per-step tables.

    Subclass and override what differs; this base is the canonical layout (one latent cache
    ``[blocks, bs, latent + rope]``, one indexer cache ``[blocks, bs, Di]``, no backend tables).
    A layout may store FP8 rows with scales: its :class:`PagedKV` then dequantizes in ``rows`` and
    quantizes in ``write``, and the bytes per token follow from its storage.
    """

    name = "canonical"
    canonical = True  # every cache it makes has a ``canonical`` tensor (1.x implementations can take it)
    default_block_size = 64

    def block_size_ok(self, block_size: int) -> bool | str:
        """True when the backend's kernels take caches of this block size, else why not (the generic
        ops then serve; any block size >= 1 is allocatable)."""
        return True

    def latent_cache(self, num_blocks: int, block_size: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                     device: torch.device) -> PagedKV:
        """One layer's MLA latent cache; canonical rows ``[c (latent_dim), k_pe (rope_dim)]``."""
        return ContiguousKV(torch.zeros(num_blocks, block_size, latent_dim + rope_dim, dtype=dtype, device=device))

    def indexer_cache(self, num_blocks: int, block_size: int, index_dim: int, dtype: torch.dtype,
                      device: torch.device) -> PagedKV:
        """One layer's DSA indexer key cache; canonical rows ``[index_dim]``."""
        return ContiguousKV(torch.zeros(num_blocks, block_size, index_dim, dtype=dtype, device=device))

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> Any:
        """The backend's own per-step tables (``AttentionMetadata.backend``), built once per step from
        the step's host facts (``meta``'s ints) and its device tensors, before any layer runs: device
        arithmetic only, never a read back. None: the backend has none."""
        return None

    def bytes_per_token(self, latent_dim: int, rope_dim: int, index_dim: int | None, dtype: torch.dtype,
                        block_size: int | None = None) -> int:
        """Exact bytes one token occupies in one layer's caches (``index_dim`` None: no indexer cache),
        measured from the storage this layout allocates (on the meta device, nothing allocated)."""
        bs = block_size or self.default_block_size
        meta = torch.device("meta")
        total = self.latent_cache(1, bs, latent_dim, rope_dim, dtype, meta).nbytes
        if index_dim:
            total += self.indexer_cache(1, bs, index_dim, dtype, meta).nbytes
        return math.ceil(total / bs)


CANONICAL = AttentionLayout()


@dataclass(frozen=True)
class PagedIndexerTables:
    """What a paged MQA-logits kernel (DeepGEMM / mate ``fp8_paged_mqa_logits``, MACA
    ``bf16_paged_mqa_logits``) takes per step besides the cache, built once per step by a layout's
    ``step_tables`` (vLLM's indexer metadata builder builds the same): every query token is one row
    (``next_n = 1``)."""

    context_lens: torch.Tensor  # int32 [T, 1] ([T] where the kernel takes 1-D): keys a token sees (causal)
    block_table: torch.Tensor  # int32 [T, max_blocks]: its sequence's block-table row
    schedule: torch.Tensor | None  # the kernel's get_paged_mqa_logits_metadata (None: block size not taken)
    max_context_len: int  # host: the logits' width (the step's max_seqlen_k)
    block_size: int  # host


class Fp8IndexerLayout(AttentionLayout):
    """Canonical caches, except that while :attr:`fp8_indexer` holds (a backend's opt-in and its paged
    kernel present) the DSA indexer key cache is FP8 with per-row scales (:class:`Fp8PagedKV`, quantized
    once when written, read in place by ``fp8_paged_mqa_logits``) and the kernel's tables are built once
    per step (:meth:`paged_tables`). vLLM's design (vllm-project/vllm@006475fe
    ``vllm/model_executor/layers/sparse_attn_indexer.py``); the cuda, hygon and musa layouts are this one."""

    fp8_name = "fp8-indexer"  # the layout's name while the FP8 cache is on

    @property
    def fp8_indexer(self) -> bool:
        return False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.fp8_name if self.fp8_indexer else "canonical"

    @property
    def canonical(self) -> bool:  # type: ignore[override]
        return not self.fp8_indexer

    def indexer_cache(self, num_blocks: int, block_size: int, index_dim: int, dtype: torch.dtype,
                      device: torch.device) -> PagedKV:
        if self.fp8_indexer:
            return Fp8PagedKV(num_blocks, block_size, index_dim, dtype, device)
        return super().indexer_cache(num_blocks, block_size, index_dim, dtype, device)

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> PagedIndexerTables | None:
        if meta is None or not self.fp8_indexer:
            return None
        return self.paged_tables(meta, cu_seqlens_q, seq_lens, block_table)

    def paged_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor) -> PagedIndexerTables | None:
        """The kernel's tables for this step (None: the step goes without them)."""
        raise NotImplementedError


def tables_for_call(meta: Any, block_size: int, max_seqlen_k: int | None, seq_lens: torch.Tensor,
                    build: Callable[[int, Any], PagedIndexerTables], one_dim: bool = False) -> PagedIndexerTables:
    """A paged-logits adapter's tables: the step's (``meta.backend``, built once by the layout) when they
    fit this call's cache block size and width, else ``build(max_seqlen_k, meta or None)`` now -- a call
    outside a forward (conformance, tools); with no ``max_seqlen_k`` that reads the device, the op's
    documented convenience. ``one_dim``: the kernel takes 1-D context lengths (MACA)."""
    tables = meta.backend if meta is not None else None
    if (isinstance(tables, PagedIndexerTables) and tables.block_size == block_size
            and (not one_dim or tables.context_lens.dim() == 1) and max_seqlen_k in (None, tables.max_context_len)):
        return tables
    if max_seqlen_k is None:
        max_seqlen_k = int(seq_lens.max()) if seq_lens.numel() else 0
    return build(max_seqlen_k, meta if meta is not None and meta.block_size == block_size else None)
