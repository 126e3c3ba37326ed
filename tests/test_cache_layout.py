"""Hook specs 2.0 cache layouts: the generic ops on any backend layout through the canonical row view
(the mixing rule), and a layout with FP8 rows plus scales, which the mechanism must allow."""

from __future__ import annotations

import torch

from hwlayer import ops
from hwlayer.ops.cache import CANONICAL, AttentionLayout, PagedKV, SplitKV


class Fp8RowsKV(PagedKV):
    """FP8 (e4m3) rows with one fp32 scale per row: what an FP8 latent / indexer cache looks like."""

    def __init__(self, num_blocks: int, block_size: int, width: int, device: torch.device) -> None:
        super().__init__(num_blocks, block_size, width)
        self.data = torch.zeros(num_blocks, block_size, width, dtype=torch.float8_e4m3fn, device=device)
        self.scale = torch.ones(num_blocks, block_size, dtype=torch.float32, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16  # what the rows read as

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.data, self.scale

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        flat = slots.reshape(-1)  # indexed as bytes (CPU torch has no fp8 index kernels), read as e4m3
        codes = self.data.view(torch.uint8).view(-1, self.width).index_select(0, flat)
        got = codes.view(torch.float8_e4m3fn).float() * self.scale.view(-1).index_select(0, flat)[:, None]
        return got.to(torch.bfloat16).view(*slots.shape, self.width)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        scale = rows.float().abs().amax(-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        codes = (rows.float() / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
        self.data.view(torch.uint8).view(-1, self.width).index_copy_(0, slots, codes)
        self.scale.view(-1).index_copy_(0, slots, scale)


class Fp8Layout(AttentionLayout):
    name, canonical = "fp8-rows", False

    def latent_cache(self, num_blocks, block_size, latent_dim, rope_dim, dtype, device):
        return Fp8RowsKV(num_blocks, block_size, latent_dim + rope_dim, device)


def _batch(gen: torch.Generator):
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([9, 11], dtype=torch.int32)
    indices = torch.tensor([[0, 8, -1], [3, -1, 1], [10, 2, 7], [-1, -1, -1], [5, 1, 0]], dtype=torch.int32)
    return table, cu, lens, indices, torch.randn(5, 3, 12, generator=gen)


def test_generic_ops_read_and_write_a_split_layout_like_the_canonical_one():
    gen = torch.Generator().manual_seed(0)
    table, cu, lens, indices, q = _batch(gen)
    canonical = CANONICAL.latent_cache(6, 4, 8, 4, torch.float32, torch.device("cpu"))
    split = SplitKV((torch.zeros(6, 4, 8), torch.zeros(6, 4, 4)))
    rows, slots = torch.randn(24, 12, generator=gen), torch.randperm(24, generator=gen)
    slots[3] = -1  # a padding row: written nowhere in either layout
    for cache in (canonical, split):
        ops.kv_cache_write(cache, rows, slots)
    assert torch.equal(split.rows(torch.arange(24)), canonical.canonical.view(24, 12))
    want = ops.sparse_mla_attention(q, canonical, indices, table, cu, lens, 0.3, 8, return_lse=True)
    got = ops.sparse_mla_attention(q, split, indices, table, cu, lens, 0.3, 8, return_lse=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    keys = SplitKV((torch.zeros(6, 4, 5), torch.zeros(6, 4, 3)))
    keys.write(torch.arange(24), rows[:, :8])
    qi, wi = torch.randn(5, 2, 8, generator=gen), torch.rand(5, 2, generator=gen)
    dense_keys = rows[:, :8].reshape(6, 4, 8).contiguous()
    assert torch.equal(ops.lightning_indexer(qi, wi, keys, table, cu, lens, 4, 0.3),
                       ops.lightning_indexer(qi, wi, dense_keys, table, cu, lens, 4, 0.3))


def test_an_fp8_layout_with_scales_serves_the_generic_ops_and_counts_its_bytes():
    gen = torch.Generator().manual_seed(1)
    table, cu, lens, indices, q = _batch(gen)
    layout = Fp8Layout()
    fp8 = layout.latent_cache(6, 4, 8, 4, torch.bfloat16, torch.device("cpu"))
    rows = torch.randn(24, 12, generator=gen)
    ops.kv_cache_write(fp8, rows, torch.arange(24))
    dense = rows.to(torch.bfloat16).float().view(6, 4, 12)
    out = ops.sparse_mla_attention(q, fp8, indices, table, cu, lens, 0.3, 8)
    want = ops.sparse_mla_attention(q, dense, indices, table, cu, lens, 0.3, 8)
    torch.testing.assert_close(out, want, atol=0.15, rtol=0.1)  # e4m3 rows: ~3 significant bits
    assert layout.bytes_per_token(8, 4, None, torch.bfloat16, block_size=4) == 12 * 1 + 4  # fp8 row + fp32 scale
