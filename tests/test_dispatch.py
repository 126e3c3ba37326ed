"""Dispatch plans: plain function attributes, supports() fallback with tracing, inheritance,
composites through the plan, strict mode, backend selection errors; op input validation."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest
import torch

import hwlayer
from hwlayer import Availability, Backend, BackendError, hookimpl, ops
from hwlayer.dispatch import DispatchPlan, select_backend
from hwlayer.registry import HwlayerPluginWarning, load_registry


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    for var in ("HWLAYER_STRICT", "HWLAYER_PLUGINS", "HWLAYER_TRACE", "HWLAYER_TRITON", "GLM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    yield
    monkeypatch.undo()
    hwlayer.reset()  # forget plans built on the test registry


# Real implementations (not stubs): each computes its op, counting calls so tests see which ran.
CALLS: list[str] = []


def fast_rms_norm(x, weight, eps, residual=None):
    CALLS.append("fast_rms_norm")
    if residual is not None:
        x = x + residual
    y = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, x) if residual is not None else y


def rms_norm_supports(x, weight, eps, residual=None):
    return True if x.shape[-1] == 8 else f"hidden size {x.shape[-1]} not in (8,)"


def parent_silu_and_mul(x):
    CALLS.append("parent_silu_and_mul")
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def counting_grouped_gemm(x, w, group_sizes):
    CALLS.append("counting_grouped_gemm")
    return ops.grouped_gemm(x, w, group_sizes)


def _plugin(name, backends, registrations):
    mod = types.ModuleType(name)

    @hookimpl
    def hwlayer_register_backends(register):
        for b in backends:
            register(b)

    @hookimpl
    def hwlayer_register_ops(register):
        for op, fn, backend, supports in registrations:
            register(op, fn, backend=backend, supports=supports)

    mod.hwlayer_register_backends, mod.hwlayer_register_ops = hwlayer_register_backends, hwlayer_register_ops
    return mod


def _backend(name, **kw):
    return Backend(name=name, vendor="test", device_type="cpu", dist_backend="gloo", priority=-100, **kw)


@pytest.fixture
def reg():
    CALLS.clear()
    plugin = _plugin(
        "testvendor",
        [
            _backend("plainbk"),
            _backend("guardedbk"),
            _backend("parentbk"),
            _backend("childbk", inherits=("parentbk",)),
            _backend("ghostbk", detect=lambda: Availability(False, "no ghost device found"),
                     install_hint="pip install ghost-runtime"),
            _backend("crashbk", detect=lambda: 1 / 0),
        ],
        [
            ("rms_norm", fast_rms_norm, "plainbk", None),
            ("grouped_gemm", counting_grouped_gemm, "plainbk", None),
            ("rms_norm", fast_rms_norm, "guardedbk", rms_norm_supports),
            ("silu_and_mul", parent_silu_and_mul, "parentbk", None),
        ],
    )
    return load_registry(extra_plugins=(plugin,))


@pytest.fixture
def global_reg(reg, monkeypatch):
    """Make ``reg`` the process registry so ``hwlayer.plan()`` sees it (undone by clean_state)."""
    hwlayer.reset()
    registry_module = importlib.import_module("hwlayer.registry")  # hwlayer.registry is also a function
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_plan_attribute_is_the_registered_function(reg):
    p = DispatchPlan(reg.backends["plainbk"], reg)
    assert p.rms_norm.__wrapped__ is fast_rms_norm  # one wrapper: the contract check (hook specs 2.0)
    assert p.layer_norm is ops.layer_norm  # generic fallback, unwrapped (it validates itself)
    assert p.entries["rms_norm"].origin == "native" and p.entries["rms_norm"].plugin == "testvendor"
    assert p.entries["layer_norm"].origin == "generic"
    x, w = torch.randn(3, 16), torch.rand(16)
    torch.testing.assert_close(p.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    assert CALLS == ["fast_rms_norm"]


def test_the_dispatcher_checks_the_contract_before_a_backend_sees_the_call(reg):
    """supports() states kernel limits only: a call outside the contract is the dispatcher's one-line
    ValueError, and neither the native implementation nor its supports() runs."""
    for name in ("plainbk", "guardedbk"):
        p = DispatchPlan(reg.backends[name], reg)
        CALLS.clear()
        with pytest.raises(ValueError, match=r"rms_norm: argument 'weight' expected shape \[8\], got \[4\]"):
            p.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
        with pytest.raises(ValueError, match="rms_norm: argument 'x' expected dtype"):
            p.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-6)
        assert CALLS == []


def test_supports_declining_falls_back_to_generic_and_tracing_counts_it(reg):
    p = DispatchPlan(reg.backends["guardedbk"], reg, trace=True)
    assert p.entries["rms_norm"].origin == "native+fallback"
    small, large = torch.randn(2, 8), torch.randn(2, 16)
    torch.testing.assert_close(p.rms_norm(small, torch.ones(8), 1e-6), ops.rms_norm(small, torch.ones(8), 1e-6))
    torch.testing.assert_close(p.rms_norm(large, torch.ones(16), 1e-6), ops.rms_norm(large, torch.ones(16), 1e-6))
    assert CALLS == ["fast_rms_norm"]  # the declined call did not reach it
    assert p.call_counts() == {("rms_norm", "native"): 1, ("rms_norm", "generic"): 1}


def test_untraced_plan_with_supports_wraps_only_that_op(reg):
    p = DispatchPlan(reg.backends["guardedbk"], reg)
    assert p.rms_norm.__wrapped__.__wrapped__ is fast_rms_norm  # contract check -> supports guard -> native
    assert p.silu_and_mul is ops.silu_and_mul
    assert p.call_counts() == {}


def test_inherited_implementation(reg):
    p = DispatchPlan(reg.backends["childbk"], reg, trace=True)
    assert p.entries["silu_and_mul"].origin == "inherited:parentbk"
    x = torch.randn(4, 12)
    torch.testing.assert_close(p.silu_and_mul(x), ops.silu_and_mul(x))
    assert p.call_counts() == {("silu_and_mul", "inherited:parentbk"): 1}


def test_composite_runs_through_the_plan_parts(reg):
    p = DispatchPlan(reg.backends["plainbk"], reg)
    T, D, inter, E = 5, 8, 6, 3
    x, w13, w2 = torch.randn(T, D), torch.randn(E, 2 * inter, D), torch.randn(E, D, inter)
    ids = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1], [-1, -1]])
    weights = torch.rand(T, 2)
    out = p.fused_experts(x, w13, w2, weights, ids)
    assert CALLS == ["counting_grouped_gemm"] * 2  # the override sped the composite up
    generic = hwlayer.plan("cpu").fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, generic)


def test_strict_mode_lists_fallbacks(global_reg, monkeypatch):
    monkeypatch.setenv("HWLAYER_STRICT", "1")
    with pytest.raises(BackendError) as err:
        hwlayer.plan("plainbk")
    message = str(err.value)
    assert message.startswith("HWLAYER_STRICT=1: backend 'plainbk' has no native implementation of: ")
    listed = message.split(": ")[-1].split(", ")
    assert "layer_norm" in listed and "sample" in listed
    assert "rms_norm" not in listed and "fused_experts" not in listed  # native; composite
    assert hwlayer.plan("cpu").backend.name == "cpu"  # the reference backend is never refused


def test_plans_are_cached_and_reset(global_reg):
    assert hwlayer.plan("plainbk") is hwlayer.plan("plainbk")
    assert hwlayer.plan("plainbk", trace=True) is not hwlayer.plan("plainbk")


def test_unknown_backend_lists_registered_backends(reg):
    with pytest.raises(BackendError, match="unknown backend 'nope'; registered backends: .*childbk, cpu"):
        select_backend("nope", reg)


def test_unavailable_backend_carries_reason_and_hint(reg):
    with pytest.raises(BackendError) as err:
        select_backend("ghostbk", reg)
    assert str(err.value) == "backend 'ghostbk' is unavailable: no ghost device found (pip install ghost-runtime)"
    with pytest.raises(BackendError, match="detection raised ZeroDivisionError"):
        select_backend("crashbk", reg)


def test_selection_by_env_and_by_priority(reg, monkeypatch):
    assert select_backend(None, reg).name == "cpu"  # test backends have priority -100
    monkeypatch.setenv("GLM_BACKEND", " PlainBK ")
    assert select_backend(None, reg).name == "plainbk"


# ---------------------------------------------------------------------------------------------
# Op input validation: one ValueError line naming op, argument, expectation and what was given


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6),
         "rms_norm: argument 'weight' expected shape [8], got [7]"),
        (lambda: ops.rms_norm(torch.randn(4, 8).long(), torch.ones(8), 1e-6),
         "rms_norm: argument 'x' expected dtype float32/bfloat16/float16, got int64"),
        (lambda: ops.rope(torch.randn(3, 8), torch.zeros(3), torch.randn(16, 8), True),
         "rope: argument 'positions' expected dtype int32/int64, got float32"),
        (lambda: ops.grouped_gemm(torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([4, 2])),
         "grouped_gemm: argument 'group_sizes' expected counts summing to at most 5 rows, got 6"),
        (lambda: ops.moe_route(torch.randn(2, 8), None, 2, 3, 1, True, 1.0),
         "moe_route: argument 'n_group' expected a divisor of the expert count 8, got 3"),
        (lambda: ops.sample(torch.randn(2, 5), torch.ones(3), torch.zeros(2, dtype=torch.long), torch.ones(2)),
         "sample: argument 'temperature' expected shape [2], got [3]"),
        (lambda: ops.kv_cache_write(torch.zeros(2, 4, 3), torch.ones(1, 3), torch.tensor([8])),
         "kv_cache_write: argument 'slot_mapping' expected slots < 8, got 8"),
        (lambda: ops.lightning_indexer(torch.randn(3, 2, 4), torch.randn(3, 2), torch.randn(2, 4, 4),
                                       torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
                                       torch.tensor([5], dtype=torch.int32), 4, 0.5),
         "lightning_indexer: argument 'cu_seqlens_q' expected last entry == number of query tokens (3), got 2"),
    ],
)
def test_op_input_validation(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------
# Hook specs 1.x plugins under 2.0: served on the canonical layout, left out (one line) elsewhere

BROKEN_PLUGIN_SRC = Path(__file__).resolve().parent / "plugins" / "hwlayer-broken"


def test_a_1x_plugin_is_served_the_1x_way_on_the_canonical_layout(monkeypatch):
    """tests/plugins/hwlayer-broken (declares 1.0): its sparse_mla_attention takes a tensor and returns
    (out, lse); under 2.0 it gets the canonical tensor of the backend's cache object and the model's
    out-only call gets ``out`` (its deliberate bug, the scale, proves which implementation served)."""
    monkeypatch.syspath_prepend(str(BROKEN_PLUGIN_SRC))
    import hwlayer_broken

    from hwlayer.ops.cache import CANONICAL

    reg = load_registry(extra_plugins=(hwlayer_broken,))
    p = DispatchPlan(reg.backends["broken"], reg, trace=True)
    gen = torch.Generator().manual_seed(0)
    kv = CANONICAL.latent_cache(4, 4, 8, 4, torch.float32, torch.device("cpu"))
    kv.write(torch.arange(16), torch.randn(16, 12, generator=gen))
    q = torch.randn(3, 2, 12, generator=gen)
    idx = torch.tensor([[0, 2, -1], [1, 3, 0], [4, 2, -1]], dtype=torch.int32)
    table, cu, lens = torch.arange(4, dtype=torch.int32).view(1, 4), torch.tensor([0, 3], dtype=torch.int32), \
        torch.tensor([8], dtype=torch.int32)
    out = p.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.3, 8)
    want = ops.sparse_mla_attention(q, kv.canonical, idx, table, cu, lens, 12**-0.5, 8)  # the plugin's scale bug
    torch.testing.assert_close(out, want)
    out2, lse = p.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.3, 8, return_lse=True)
    assert torch.equal(out2, out) and lse.shape == (3, 2)
    assert p.call_counts() == {("sparse_mla_attention", "native"): 2}


def test_a_1x_cache_op_on_a_non_canonical_layout_is_left_out_with_one_line():
    from conformance import emulators

    mod = types.ModuleType("legacy_cache_ops")
    mod.HWLAYER_HOOKSPEC_VERSION = "1.2"

    @hookimpl
    def hwlayer_register_ops(register):
        register("kv_cache_write", lambda cache, rows, slot_mapping: None, backend="ascend")
        register("rms_norm", lambda x, weight, eps, residual=None: x, backend="ascend")

    mod.hwlayer_register_ops = hwlayer_register_ops
    emulators.activate("ascend")
    try:
        reg = load_registry(extra_plugins=(mod,))
        with pytest.warns(HwlayerPluginWarning, match="kv_cache_write of plugin 'legacy_cache_ops'.*VERSION = '2.0'"):
            p = DispatchPlan(reg.backends["ascend"], reg)
        assert p.entries["kv_cache_write"].origin == "generic" and len(p.left_out) == 1
        assert "ascend-nope-rope" in p.left_out[0] and "\n" not in p.left_out[0]
        assert p.entries["rms_norm"].plugin == "legacy_cache_ops"  # not a cache op: served as before
    finally:
        emulators.deactivate()


def test_a_1x_ep_plugin_keeps_its_signature_and_the_capacity_form_goes_generic(tmp_path):
    """Hook specs 2.0 gave ``ep_dispatch`` ``topk_weights`` and ``capacity``: a 1.x implementation is
    called with its own four arguments (its combine applies the weights), and the fixed-capacity form,
    which 1.x does not know, is served by the generic pair, combine included (one real gloo rank)."""
    import torch.distributed as dist

    calls = []

    def old_dispatch(x, topk_ids, num_experts, group=None):  # hook specs 1.2: exactly four arguments
        calls.append("dispatch")
        return ops.ep_dispatch(x, topk_ids, num_experts, group)

    def old_combine(y, handle, topk_weights, group=None):
        calls.append("combine")
        return ops.ep_combine(y, handle, topk_weights, group)

    mod = types.ModuleType("legacy_ep")
    mod.HWLAYER_HOOKSPEC_VERSION = "1.2"

    @hookimpl
    def hwlayer_register_ops(register):
        register("ep_dispatch", old_dispatch, backend="cpu")
        register("ep_combine", old_combine, backend="cpu")

    mod.hwlayer_register_ops = hwlayer_register_ops
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        reg = load_registry(extra_plugins=(mod,))
        p = DispatchPlan(reg.backends["cpu"], reg)
        x, ids = torch.randn(3, 4), torch.tensor([[0, 1], [1, 2], [3, 0]])
        w = torch.rand(3, 2)
        want = ops.ep_combine(*ops.ep_dispatch(x, ids, 4)[::2], w)
        recv, local, handle = p.ep_dispatch(x, ids, 4, None, w)  # as the model calls it
        torch.testing.assert_close(p.ep_combine(recv, handle, w), want)
        assert calls == ["dispatch", "combine"]
        recv, local, handle = p.ep_dispatch(x, ids, 4, None, w, 4)  # fixed capacity: the generic pair
        assert isinstance(handle, ops.EPCapacityHandle)
        torch.testing.assert_close(p.ep_combine(recv, handle, w), want)
        assert calls == ["dispatch", "combine"]
    finally:
        dist.destroy_process_group()
