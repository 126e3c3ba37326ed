"""kv_cache_write: padding slots skipped, rows cast to the cache dtype, other slots untouched."""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, randn, step_meta


@pytest.mark.parametrize("case", ["padding-slots", "fp32-rows-into-dtype-cache", "padding-slots+meta",
                                  "no-padding+meta"])
def test_kv_cache_write(checker, dtype, device, case):
    """``+meta``: with the step's AttentionMetadata; ``no-padding``: it says no slot is -1."""
    ck = checker("kv_cache_write", case)
    gen = generator("kv_cache_write", case, dtype)
    num_blocks, block_size, D, T = 6, 4, 20, 9
    cache = randn(gen, (num_blocks, block_size, D), ck.dtype, device)  # untouched slots must survive
    row_dtype = torch.float32 if case.startswith("fp32") else ck.dtype
    rows = randn(gen, (T, D), row_dtype, device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    if case.startswith("padding"):
        slots[[1, 4, 8]] = -1  # padding rows are skipped
    slot_mapping = slots.to(device=device, dtype=torch.int64 if row_dtype == ck.dtype else torch.int32)
    expected = golden.kv_cache_write(cache, rows, slot_mapping.cpu())
    meta = {}
    if case.endswith("+meta"):  # the tables of a one-sequence step of T tokens
        meta["meta"] = step_meta([T], [T], block_size, device, has_padding=case.startswith("padding"))
    result = ck.fn(cache, rows, slot_mapping, **meta)
    if result is not None:
        ck.fail("return value", f"expected None (the write is in place), got {type(result).__name__}")
    ck.exact("cache after the write", cache, expected)
    if case == "padding-slots":
        ck.time(cache, rows, slot_mapping)
