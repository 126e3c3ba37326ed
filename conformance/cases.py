"""Case-building helpers: seeded random inputs rounded to the test dtype, paged batches."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from hwlayer.ops.layout import AttentionMetadata, attention_metadata


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from the case's name, so every case is reproducible on its own."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def randn(gen: torch.Generator, shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device,
          scale: float = 1.0) -> torch.Tensor:
    """Normal samples drawn in float64, then rounded to ``dtype`` on ``device``. Goldens read the
    rounded values back (upcast to float64), so input rounding never counts as kernel error."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@dataclass
class PagedBatch:
    """A varlen batch over a paged cache with a shuffled physical block assignment."""

    q_lens: list[int]
    seq_lens: list[int]
    block_size: int
    num_blocks: int
    block_table: torch.Tensor  # int32 [B, max_blocks], padded with block 0

    @property
    def cu_seqlens_q(self) -> list[int]:
        out = [0]
        for n in self.q_lens:
            out.append(out[-1] + n)
        return out

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(block_table, cu_seqlens_q, seq_lens)`` as int32 tensors on ``device``."""
        return (
            self.block_table.to(device),
            torch.tensor(self.cu_seqlens_q, dtype=torch.int32, device=device),
            torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
        )

    def meta(self, device: torch.device, **kwargs: object) -> AttentionMetadata:
        """This batch's per-step tables (the ops' optional ``meta``), as a model builds them."""
        return step_meta(self.q_lens, self.seq_lens, self.block_size, device, table=self.block_table, **kwargs)


def step_meta(q_lens: list[int], seq_lens: list[int], block_size: int, device: torch.device, *,
              table: torch.Tensor | None = None, has_padding: bool = True, max_seqlen_k: int | None = None,
              cos_sin_cache: torch.Tensor | None = None) -> AttentionMetadata:
    """:func:`hwlayer.ops.layout.attention_metadata` of a varlen batch given by its query counts and
    context lengths (``table``: its block table; default: each sequence's blocks in order)."""
    if table is None:
        width = max(1, max(math.ceil(L / block_size) for L in seq_lens))
        starts = [0]
        for L in seq_lens:
            starts.append(starts[-1] + max(1, math.ceil(L / block_size)))
        table = torch.tensor([[min(starts[b] + j, starts[b + 1] - 1) for j in range(width)]
                              for b in range(len(seq_lens))], dtype=torch.int32)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    positions = [L - n + i for n, L in zip(q_lens, seq_lens, strict=True) for i in range(n)]
    return attention_metadata(
        torch.tensor(cu, dtype=torch.int32, device=device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
        table.to(device), torch.tensor(positions, dtype=torch.int64, device=device), block_size=block_size,
        max_seqlen_k=max_seqlen_k if max_seqlen_k is not None else max(seq_lens), has_padding=has_padding,
        cos_sin_cache=cos_sin_cache)


def paged_batch(gen: torch.Generator, q_lens: list[int], seq_lens: list[int], block_size: int,
                spare_blocks: int = 3) -> PagedBatch:
    """Give each sequence enough physical blocks, drawn from a random permutation (plus spare
    blocks nobody owns), so a kernel that assumes contiguous or ordered blocks reads wrong keys."""
    need = [max(1, math.ceil(L / block_size)) for L in seq_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[start : start + n], dtype=torch.int32)
        start += n
    return PagedBatch(q_lens, seq_lens, block_size, num_blocks, table)
