"""Quantized tiny models read nothing on the host in a decode and a mixed prefill+decode step (the
sync-free forward of issue 11 with quant_linear / quant_fused_experts), under FakeTensorMode as
tests/test_sync_free.py does. Needs ``GLM5.forward_context`` (branch ``accel``); skipped before."""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from model import GLM5, Batch, load_model
from model.tiny import QUANT_TINY_OVERRIDES, make_tiny_checkpoint

if not hasattr(GLM5, "forward_context"):
    pytest.skip("needs the sync-free forward (GLM5.forward_context, issue 11)", allow_module_level=True)

HOST_READS = (DataDependentOutputException, DynamicOutputShapeException)


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("fmt", ["fp8_block", "int8"])
def test_quantized_steps_read_nothing_on_the_host(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("HWLAYER_CHECK", "0")  # value checks read the device by design (off in serving)
    m = load_model(make_tiny_checkpoint(tmp_path / fmt, QUANT_TINY_OVERRIDES, weight_format=fmt), backend="cpu",
                   dtype="bf16")
    cache, table = m.new_cache(8, 4), torch.arange(8, dtype=torch.int32).view(2, 4)
    m.forward_batch(Batch(torch.arange(1, 13), i32(0, 9, 12), i32(9, 3), table), cache)
    for ids, cu, seq_lens in (([20, 21], (0, 1, 2), (10, 4)), ([20, 30, 31, 32, 33, 34], (0, 1, 6), (10, 8))):
        ctx = m.context(Batch(torch.tensor(ids), i32(*cu), i32(*seq_lens), table), cache)
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert m.forward_context(ctx, cache).shape == (2, m.config.vocab_size)
    monkeypatch.setenv("HWLAYER_CHECK", "1")  # the check can fail: value checks (quant ones included) read
    with pytest.raises(HOST_READS), FakeTensorMode(allow_non_fake_inputs=True):
        m.forward_context(ctx, cache)
