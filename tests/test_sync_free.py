"""No device->host reads in a forward (issue 11): the proof on CPU.

A step's forward runs under ``FakeTensorMode``: tensors carry shapes and dtypes but no data, so any
read of a value on the host (``.item()``, ``int(t)``, ``.tolist()``, ``bool(t)``, a tensor used as a
Python index) raises ``DataDependentOutputException``, and any op whose output *size* depends on
data (boolean-mask indexing, ``nonzero``, ``bincount``, ``repeat_interleave`` without a size) raises
``DynamicOutputShapeException``. On a GPU each of those is a sync that stalls the host and breaks
graph capture. The host metadata (:meth:`model.GLM5.context`) is built before, with real data, as
the runner builds it once per step.

Value checks (``HWLAYER_CHECK=1``, on in the rest of the suite) read the device by design, so these
tests turn them off, as serving does. The model runs in bf16 here: ``torch._grouped_mm``, the generic
grouped GEMM's CPU path, has a fake-tensor rule for bf16 only; the fp32 path is the same op.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from model import Batch, load_model
from model.tiny import ensure_default_model

HOST_READS = (DataDependentOutputException, DynamicOutputShapeException)


@pytest.fixture(scope="module")
def tiny():
    return load_model(ensure_default_model(), backend="cpu", dtype="bf16")


@pytest.fixture(autouse=True)
def no_value_checks(monkeypatch):
    monkeypatch.setenv("HWLAYER_CHECK", "0")


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def prefilled(model):
    """A cache holding two prompts (9 and 3 tokens), sequence b in blocks 4b..4b+3."""
    cache = model.new_cache(8, 4)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    model.forward_batch(Batch(torch.arange(1, 13), i32(0, 9, 12), i32(9, 3), table), cache)
    return cache, table


def fake_forward(model, ctx, cache) -> torch.Tensor:
    with FakeTensorMode(allow_non_fake_inputs=True):
        return model.forward_context(ctx, cache)


def test_decode_step_reads_nothing_on_the_host(tiny):
    cache, table = prefilled(tiny)
    ctx = tiny.context(Batch(torch.tensor([20, 21]), i32(0, 1, 2), i32(10, 4), table), cache)
    logits = fake_forward(tiny, ctx, cache)
    assert logits.shape == (2, tiny.config.vocab_size)


def test_mixed_prefill_and_decode_step_reads_nothing_on_the_host(tiny):
    """Sequence 0 decodes one token while sequence 1 prefills a 5-token chunk (its context reaches 8):
    the indexer's prefill rows and MoE's grouped GEMM over many rows run too."""
    cache, table = prefilled(tiny)
    ctx = tiny.context(Batch(torch.tensor([20, 30, 31, 32, 33, 34]), i32(0, 1, 6), i32(10, 8), table), cache)
    assert (ctx.max_seqlen_q, ctx.max_seqlen_k) == (5, 10)
    logits = fake_forward(tiny, ctx, cache)
    assert logits.shape == (2, tiny.config.vocab_size)


def test_sampling_reads_nothing_on_the_host(tiny):
    """Greedy and sampled rows in one batch (no "all greedy?" host branch). Per-row generators are
    left out: fake tensors have no rule for a seeded ``exponential_``."""
    logits = torch.randn(3, 50)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = tiny.plan.sample(logits, torch.tensor([0.0, 0.7, 1.0]), torch.tensor([0, 5, 0]),
                               torch.tensor([1.0, 0.9, 1.0]))
    assert out.shape == (3,)


def test_a_host_read_in_an_op_fails_the_check(tiny, monkeypatch):
    """The check can fail: an op that reads one value on the host (as ``int(t.max())`` did to
    size tensors) is caught, and so are the value checks that HWLAYER_CHECK=1 turns on."""
    cache, table = prefilled(tiny)
    ctx = tiny.context(Batch(torch.tensor([20, 21]), i32(0, 1, 2), i32(10, 4), table), cache)
    rms_norm = tiny.plan.rms_norm

    def rms_norm_with_item(x, *args):
        float(x.abs().max().item())  # a sync on a GPU
        return rms_norm(x, *args)

    monkeypatch.setattr(tiny.plan, "rms_norm", rms_norm_with_item)
    with pytest.raises(HOST_READS):
        fake_forward(tiny, ctx, cache)
    monkeypatch.setattr(tiny.plan, "rms_norm", rms_norm)
    fake_forward(tiny, ctx, cache)
    monkeypatch.setenv("HWLAYER_CHECK", "1")
    with pytest.raises(HOST_READS):
        fake_forward(tiny, ctx, cache)


@pytest.mark.parametrize("rows", [12, 5000])  # the gather path (decode) and torch._grouped_mm (prefill)
def test_grouped_gemm_paths_read_nothing_on_the_host(tiny, rows):
    from hwlayer import ops

    E, N, K = 4, 64, 64
    x, w = torch.randn(rows, K, dtype=torch.bfloat16), torch.randn(E, N, K, dtype=torch.bfloat16)
    sizes = torch.tensor([rows // 4, 0, rows // 2, rows // 8])  # fewer than rows: padding rows at the end
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert ops.grouped_gemm(x, w, sizes).shape == (rows, N)
