"""Ascend W8A8 adapter plumbing on CPU: layouts converted for npu_quant_matmul / npu_grouped_matmul, and
the adapters' calls run against a stand-in ``torch_npu`` that implements those ops as their torch-npu
2.14 documentation describes them (per-token symmetric int8 quant; ``x @ x2 * scale * pertoken_scale``;
grouped with ``group_list_type=1`` counts). This checks our argument conventions, not the NPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from hwlayer.backends.ascend import quant as aq
from hwlayer.ops import quant as Q
from hwlayer.registry import load_registry


def _fake_torch_npu() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.calls = []

    def npu_dynamic_quant(x, dst_type=torch.int8):
        mod.calls.append("npu_dynamic_quant")
        return Q.quantize_activation(x, "int8")  # documented: per-token symmetric, scale = amax / 127

    def npu_quant_matmul(x1, x2, scale, *, pertoken_scale=None, bias=None, output_dtype=None):
        mod.calls.append("npu_quant_matmul")
        assert x1.dtype == x2.dtype == torch.int8 and x1.shape[1] == x2.shape[0]  # x2: [K, N]
        assert scale.shape == (x2.shape[1],) and pertoken_scale.shape == (x1.shape[0],)
        acc = x1.to(torch.int32) @ x2.to(torch.int32)  # int32 accumulation
        return (acc.float() * scale.float() * pertoken_scale[:, None]).to(output_dtype)

    def npu_grouped_matmul(x, weight, *, scale, per_token_scale, bias, group_list, split_item, group_type,
                           group_list_type, output_dtype):
        mod.calls.append("npu_grouped_matmul")
        assert (split_item, group_type, group_list_type) == (2, 0, 1) and bias is None
        (xq,), (w,), (s,), (pts,) = x, weight, scale, per_token_scale
        assert w.dtype == torch.int8 and w.shape[1] == xq.shape[1] and s.shape == (w.shape[0], w.shape[2])
        out, start = torch.empty(xq.shape[0], w.shape[2], dtype=output_dtype), 0
        for e, n in enumerate(group_list.tolist()):
            acc = xq[start : start + n].to(torch.int32) @ w[e].to(torch.int32)
            out[start : start + n] = (acc.float() * s[e].float() * pts[start : start + n, None]).to(output_dtype)
            start += n
        return [out]

    mod.npu_dynamic_quant, mod.npu_quant_matmul, mod.npu_grouped_matmul = (
        npu_dynamic_quant, npu_quant_matmul, npu_grouped_matmul)
    return mod


@pytest.fixture
def fake_npu(monkeypatch):
    mod = _fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod


def test_layouts():
    qw = Q.quantize_weight(torch.randn(48, 64), "int8")
    x2, scale = aq.npu_int8_linear_args(qw)
    assert x2.shape == (64, 48) and torch.equal(x2, qw.data.T) and x2.data_ptr() == qw.data.data_ptr()  # a view
    stack = Q.quantize_weight(torch.randn(3, 48, 64), "int8")
    w, s = aq.npu_int8_grouped_args(stack)
    assert w.shape == (3, 64, 48) and w.is_contiguous() and torch.equal(w[1], stack.data[1].T)
    assert s.dtype == torch.bfloat16 and s.shape == (3, 48)


def test_adapters_match_the_generic_ops(fake_npu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    qw = Q.quantize_weight(torch.randn(48, 64, generator=g) * 0.1, "int8")
    got, want = aq.quant_linear(x, qw), Q.quant_linear(x, qw)
    assert got.dtype == torch.bfloat16 and (got.float() - want.float()).abs().max() <= 2e-2 * want.abs().max()
    stack = Q.quantize_weight(torch.randn(3, 48, 64, generator=g) * 0.1, "int8")
    sizes = torch.tensor([2, 0, 3])
    got, want = aq.quant_grouped_gemm(x, stack, sizes), Q.quant_grouped_gemm(x, stack, sizes)
    # the bf16 weight scales (vllm-ascend's convention) cost up to 2^-9 relative
    assert (got.float() - want.float()).abs().max() <= 2e-2 * want.abs().max()
    assert fake_npu.calls == ["npu_dynamic_quant", "npu_quant_matmul", "npu_dynamic_quant", "npu_grouped_matmul"]


def test_supports_declines_what_the_npu_path_does_not_take():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    qw = Q.quantize_weight(torch.randn(48, 64), "int8")
    assert aq.quant_linear_supports(x, qw) == "needs NPU tensors"
    assert "no FP8" in aq.quant_linear_supports(x, Q.quantize_weight(torch.randn(48, 64), "fp8_block"))
    assert aq.quant_linear_supports(x, torch.randn(48, 64)) == "argument types outside the contract"
    entries = load_registry().implementations("quant_linear", "ascend")
    assert [r.fn for r in entries] == [aq.quant_linear]
