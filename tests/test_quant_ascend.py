"""Ascend W8A8 / W4A8 adapters against the CPU emulators of torch_npu's quantized ops
(conformance/emulators/torch_npu_quant.py, arithmetic from op-plugin's own tests): weights prepared
once at load (``prepare_weight``: transposed contiguous storage, backend scales), no weight-sized
allocation per forward call (issue 20), each path against the generic op, declines, and the tiny
msmodelslim checkpoints served end to end by the emulated backend. Checks our argument conventions
against the documented ops, not the NPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hwlayer
from conformance import emulators
from hwlayer.backends.ascend import quant as aq
from hwlayer.ops import quant as Q

BF16_TOL = 2e-2  # bf16 output rounding, bf16 MoE weight scales (vllm-ascend's), the A8W4 kernel's fp16 partials


@pytest.fixture
def npu_plan():
    emulators.activate("ascend")
    yield hwlayer.plan("ascend", trace=True)
    emulators.deactivate()


class BigAllocations(TorchDispatchMode):
    """Counts op outputs of at least ``numel`` elements that are new storage (not a view of an input)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(str(func))
        return out


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = BF16_TOL) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * want.float().abs().max(), float(err)


def _served(plan, op: str) -> bool:
    counts = plan.call_counts()
    others = [n for (o, t), n in counts.items() if o == op and t != "native"]
    return counts.get((op, "native"), 0) > 0 and not any(others)


def test_prepare_weight_lays_out_once(npu_plan):
    g = torch.Generator().manual_seed(0)
    stack = Q.quantize_weight(torch.randn(4, 96, 64, generator=g), "int8")
    ready = npu_plan.prepare_weight("model.layers.1.mlp.experts.w13", stack)
    assert ready.shape == stack.shape and ready.data.transpose(1, 2).is_contiguous()  # [E, K, N] storage
    assert torch.equal(ready.dequantize(), stack.dequantize()) and ready.prepared["scale_bf16"].shape == (4, 96)
    w4 = npu_plan.prepare_weight("w2", Q.quantize_weight(torch.randn(4, 96, 64, generator=g), "w4a8"))
    assert w4.data.transpose(1, 2).view(torch.int32).shape == (4, 64, 96 // 8)
    assert w4.prepared["scale_int64"].shape == (4, 1, 96) and w4.prepared["scale_int64"].dtype == torch.int64
    s, o = Q.static_activation_params(-2.0, 3.0)
    st = npu_plan.prepare_weight("o_proj", Q.quantize_weight_static(torch.randn(96, 64, generator=g), s, o))
    assert st.prepared["input_scale_reciprocal"].shape == (64,) and st.data.t().is_contiguous()
    plain = torch.randn(8, 8)
    assert npu_plan.prepare_weight("model.norm.weight", plain) is plain  # declined: generic identity
    assert _served(npu_plan, "prepare_weight") is False  # the plain tensor went generic
    assert npu_plan.call_counts()[("prepare_weight", "native")] == 3


@pytest.mark.parametrize("prepared", [True, False])
def test_grouped_gemm_allocates_no_weight_copy_per_call(npu_plan, prepared):
    """Issue 20: ascend/quant.py made a contiguous transposed copy of the whole expert stack on every
    call. Now a prepared stack is passed as it lies, an unprepared one as its transposed view."""
    g = torch.Generator().manual_seed(1)
    E, N, K = 8, 256, 128
    stack = Q.quantize_weight(torch.randn(E, N, K, generator=g) * 0.1, "int8")
    if prepared:
        stack = npu_plan.prepare_weight("w13", stack)
    x = torch.randn(12, K, generator=g).to(torch.bfloat16)
    sizes = torch.tensor([3, 0, 2, 1, 0, 4, 1, 1])
    with BigAllocations(E * N * K // 2) as big:
        out = npu_plan.quant_grouped_gemm(x, stack, sizes)
    assert big.ops == []
    assert _served(npu_plan, "quant_grouped_gemm")
    _close(out, Q.quant_grouped_gemm(x, stack, sizes))


def test_each_npu_path_matches_the_generic_op(npu_plan):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 128, generator=g) + 0.3).to(torch.bfloat16)
    lin = npu_plan.prepare_weight("q", Q.quantize_weight(torch.randn(96, 128, generator=g) * 0.1, "int8"))
    _close(npu_plan.quant_linear(x, lin), Q.quant_linear(x, lin))
    s, o = Q.static_activation_params(-2.5, 3.5)
    st = npu_plan.prepare_weight("o", Q.quantize_weight_static(torch.randn(96, 128, generator=g) * 0.1, s, o))
    _close(npu_plan.quant_linear(x, st), Q.quant_linear(x, st))
    sizes = torch.tensor([2, 0, 3, 1])
    w4 = npu_plan.prepare_weight("w13", Q.quantize_weight(torch.randn(4, 64, 128, generator=g) * 0.1, "w4a8"))
    _close(npu_plan.quant_grouped_gemm(x, w4, sizes), Q.quant_grouped_gemm(x, w4, sizes))
    assert _served(npu_plan, "quant_linear") and _served(npu_plan, "quant_grouped_gemm")


def test_supports_declines_what_the_npu_path_does_not_take(npu_plan):
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    qw = Q.quantize_weight(torch.randn(48, 64), "int8")
    assert "no FP8" in aq.quant_linear_supports(x, Q.quantize_weight(torch.randn(48, 64), "fp8_block"))
    assert aq.quant_linear_supports(x.float(), qw).startswith("W8A8 / W4A8 paths written for bf16")
    assert aq.quant_linear_supports(x, torch.randn(48, 64)) == "argument types outside the contract"
    assert "prepare_weight" in aq.quant_linear_supports(
        x, Q.quantize_weight_static(torch.randn(48, 64), *Q.static_activation_params(-1, 1)))
    w4 = Q.quantize_weight(torch.randn(2, 48, 64), "w4a8")
    assert "prepare_weight" in aq.quant_grouped_gemm_supports(x, w4, torch.tensor([1, 1]))
    grouped = Q.quantize_weight(torch.randn(2, 48, 64), "w4a8", group_size=32)
    assert "per-group" in aq.prepare_weight_supports("w", grouped)
    assert "ue8m0" in aq.quant_linear_supports(x, qw.replace(act_scale_fmt="ue8m0"))


def test_without_emulation_cpu_tensors_are_declined():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert aq.quant_linear_supports(x, Q.quantize_weight(torch.randn(48, 64), "int8")) == "needs NPU tensors"
    assert aq.prepare_weight_supports("w", Q.quantize_weight(torch.randn(48, 64), "int8")) == "needs NPU tensors"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_msmodelslim_checkpoint_served_by_the_emulated_npu(tmp_path, monkeypatch, kind):
    from model import load_model
    from model.generate import score
    from model.tiny import make_msmodelslim_checkpoint

    ck = make_msmodelslim_checkpoint(tmp_path / kind, kind)
    ids = torch.randint(20, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    want = score(load_model(ck, backend="cpu", dtype="bf16"), ids)
    monkeypatch.setenv("HWLAYER_TRACE", "1")
    emulators.activate("ascend")
    try:
        m = load_model(ck, backend="ascend", dtype="bf16")
        got = score(m, ids)
        counts = m.plan.call_counts()
    finally:
        emulators.deactivate()
    assert counts[("prepare_weight", "native")] > 0
    assert counts.get(("quant_grouped_gemm", "native"), 0) > 0 and counts.get(("quant_linear", "native"), 0) > 0
    assert counts.get(("quant_grouped_gemm", "generic"), 0) == 0
    lp, lq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert kl < 0.02, kl  # same format, bf16 both: only the kernels' rounding differs
