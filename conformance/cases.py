"""Case-building helpers: seeded random inputs rounded to the test dtype, paged batches."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch


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
