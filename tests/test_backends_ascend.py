"""Ascend conversions (pure torch, checked against their documented meaning) and the missing-torch_npu path.

Nothing here imports torch_npu: it is not installed on this machine, and the adapters that call it
were written against the torch-npu 2.14 docs without hardware.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwlayer import ops
from hwlayer.backends.ascend import convert

ROOT = Path(__file__).resolve().parents[1]


def test_group_list_conversions_round_trip() -> None:
    counts = torch.tensor([3, 0, 2, 5])
    cumulative = convert.counts_to_cumulative(counts)
    assert cumulative.tolist() == [3, 3, 5, 10]
    assert convert.cumulative_to_counts(cumulative).tolist() == counts.tolist()
    # The cumulative list's entry e is where expert e's rows end in the permuted buffer.
    x_rows = torch.arange(10)
    starts = cumulative - counts
    for e in range(4):
        assert x_rows[starts[e] : cumulative[e]].numel() == counts[e]


def test_seq_lengths_for_tnd_and_paged_layouts() -> None:
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    seq_lens = torch.tensor([10, 1, 17], dtype=torch.int32)
    q_ends = convert.tnd_actual_seq_lengths(cu)
    assert q_ends.dtype == torch.int32 and q_ends.tolist() == [3, 4, 9]  # cumulative, no leading 0
    kv = convert.kv_actual_seq_lengths(seq_lens)
    assert kv.dtype == torch.int32 and kv.tolist() == [10, 1, 17]  # per sequence, not cumulative


def test_pa_bsnd_is_a_view_with_one_kv_head() -> None:
    cache = torch.randn(4, 16, 128)
    pa = convert.to_pa_bsnd(cache)
    assert pa.shape == (4, 16, 1, 128)
    assert pa.data_ptr() == cache.data_ptr()
    assert torch.equal(pa[2, 5, 0], cache[2, 5])


def test_ascend_layout_keeps_nope_and_rope_caches_apart_and_the_canonical_view_right() -> None:
    from hwlayer.backends.ascend.adapters import LAYOUT

    kv = LAYOUT.latent_cache(3, 16, 512, 64, torch.float32, torch.device("cpu"))
    c, pe = kv.parts
    assert c.shape == (3, 16, 512) and pe.shape == (3, 16, 64) and c.is_contiguous() and pe.is_contiguous()
    rows, slots = torch.randn(5, 576), torch.tensor([0, 17, 33, 47, 20])
    kv.write(slots, rows)
    assert torch.equal(kv.rows(slots), rows) and torch.equal(c.view(-1, 512)[17], rows[1, :512])
    assert LAYOUT.bytes_per_token(512, 64, 128, torch.bfloat16) == (576 + 128) * 2
    assert LAYOUT.block_size_ok(128) is True and "multiple of 16" in LAYOUT.block_size_ok(8)
    q = torch.randn(5, 4, 576)
    q_nope, q_rope = convert.split_query(q, 512)
    assert torch.equal(torch.cat((q_nope, q_rope), -1), q)


def test_valid_first_keeps_the_set_and_moves_padding_last() -> None:
    idx = torch.tensor([[-1, 7, -1, 3, 9], [4, -1, 2, -1, -1], [-1, -1, -1, -1, -1]], dtype=torch.int32)
    out = convert.valid_first(idx)
    assert out.tolist() == [[7, 3, 9, -1, -1], [4, 2, -1, -1, -1], [-1] * 5]
    # Attention over the positions is order-independent, so reordering cannot change the result.
    T, H, Dk, V = 3, 2, 12, 8
    q = torch.randn(T, H, Dk)
    cache = torch.randn(4, 4, Dk)
    bt = torch.arange(4, dtype=torch.int32).view(1, 4).repeat(3, 1)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    lens = torch.tensor([16, 16, 16], dtype=torch.int32)
    a = ops.sparse_mla_attention(q, cache, idx, bt, cu, lens, 0.3, V)
    b = ops.sparse_mla_attention(q, cache, out, bt, cu, lens, 0.3, V)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_mul_cos_sin_reproduce_our_rope(interleaved: bool) -> None:
    # npu_rotary_mul's documented formula, written out: out = r1 * x + r2 * rotate(x).
    D, T, H = 64, 6, 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.arange(50).float()[:, None] * inv_freq[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.tensor([0, 3, 7, 7, 20, 49])
    x = torch.randn(T, H, D)
    r1, r2 = convert.rope_cos_sin(cache, positions, interleaved)
    if convert.rotary_mode(interleaved) == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    npu_formula = r1[:, None, :] * x + r2[:, None, :] * rotated
    torch.testing.assert_close(npu_formula, ops.rope(x, positions, cache, interleaved))


def test_nt_weights_as_kn_view_is_a_transposed_view_of_the_linear_layout() -> None:
    w = torch.randn(3, 5, 4)  # [E, N, K]
    x = torch.randn(2, 4)
    kn = convert.nt_weights_as_kn_view(w)
    assert kn.shape == (3, 4, 5) and kn.data_ptr() == w.data_ptr() and not kn.is_contiguous()
    torch.testing.assert_close(x @ kn[1], x @ w[1].t())


def test_indexer_output_conversion() -> None:
    raw = torch.tensor([[[5, 2, -1, -1]], [[0, -1, -1, -1]]], dtype=torch.int32)  # TND [T, 1, sparse_count]
    assert convert.indexer_output_to_positions(raw, 3).tolist() == [[5, 2, -1], [0, -1, -1]]
    assert convert.indexer_output_to_positions((raw, torch.zeros(2, 1, 4)), 4).shape == (2, 4)


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("GLM_BACKEND", "HWLAYER_STRICT")}
    full_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_missing_torch_npu_is_one_clear_line_and_exit_2() -> None:
    done = _run(["-m", "hwlayer", "ops"], GLM_BACKEND="ascend")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "torch_npu" in lines[0] and "pip install .[ascend]" in lines[0] and "set_env.sh" in lines[0]
    assert done.stdout == ""


def test_ascend_detection_reasons_without_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwlayer.backends import ascend

    status = ascend.BACKEND.availability()
    assert not status.available and "torch_npu is not installed" in status.reason
    # With torch_npu "present" but CANN not sourced, detection stops before importing anything.
    monkeypatch.setattr(ascend.importlib.util, "find_spec", lambda name: object() if name == "torch_npu" else None)
    for var in ascend.CANN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    status = ascend.BACKEND.availability()
    assert not status.available and "CANN environment is not set" in status.reason
    assert "torch_npu" not in sys.modules


# ---------------------------------------------------------------------------------------------
# npu_moe_token_unpermute: a gather index (op-plugin's own test), emulator and adapter


def _megatron_unpermute(permuted: torch.Tensor, sorted_indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The Python reference op-plugin's test compares the fused op with (Megatron's unpermute, written
    here from its definition): permuted row j goes back to flat assignment ``sorted_indices[j]``."""
    out = torch.zeros(permuted.shape, dtype=torch.float32).index_copy_(0, sorted_indices.long(), permuted.float())
    return (out.view(probs.shape[0], probs.shape[1], -1) * probs.float().unsqueeze(-1)).sum(1)


def test_npu_moe_token_unpermute_emulator_follows_op_plugins_test() -> None:
    """Ascend/op-plugin@517f2e7d0f20 test/test_custom_ops/test_npu_moe_token_permute_and_unpermute.py
    (test_unpermute): fused(tokens, idx) == unpermute(tokens, argsort(idx)); so idx is a gather index."""
    from conformance.emulators import torch_npu as emu

    # A hand vector: 2 tokens, top-2; output slot i reads permuted row idx[i].
    rows = torch.tensor([[1.0], [10.0], [100.0], [1000.0]]).bfloat16()
    idx = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    probs = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).bfloat16()
    got = emu.npu_moe_token_unpermute(rows, idx, probs=probs)
    assert got.float().view(-1).tolist() == [100.0 * 1 + 1.0 * 2, 1000.0 * 3 + 10.0 * 4]
    # Vectors derived from the reference as op-plugin's test builds them: idx = argsort of routed ids.
    gen = torch.Generator().manual_seed(0)
    for num_tokens, topk in ((7, 1), (9, 4), (16, 8)):
        ids = torch.randint(0, 5, (num_tokens, topk), generator=gen)
        sorted_idx = torch.argsort(ids.view(-1), stable=True).to(torch.int32)
        permuted = torch.randn(num_tokens * topk, 8, generator=gen).bfloat16()
        p = torch.rand(num_tokens, topk, generator=gen).bfloat16()
        want = _megatron_unpermute(permuted, torch.argsort(sorted_idx, stable=True), p)
        torch.testing.assert_close(emu.npu_moe_token_unpermute(permuted, sorted_idx, probs=p).float(), want,
                                   atol=2e-2, rtol=2e-2)


def test_ascend_moe_unpermute_adapter_passes_the_gather_index() -> None:
    """The adapter inverts our scatter ``order`` (which the old adapter passed as is) before the op."""
    import hwlayer
    from conformance import emulators

    emulators.activate("ascend")
    try:
        plan = hwlayer.plan("ascend", trace=True)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(12, 16, generator=gen).bfloat16()
        ids = torch.randint(0, 6, (12, 4), generator=gen, dtype=torch.int32)
        ids[3, 2] = -1  # a dropped assignment
        _, _, order = ops.moe_permute(x, ids, 6)
        y = torch.randn(48, 16, generator=gen).bfloat16()
        w = torch.rand(12, 4, generator=gen)
        torch.testing.assert_close(plan.moe_unpermute(y, order, w, 12).float(),
                                   ops.moe_unpermute(y, order, w, 12).float(), atol=2e-2, rtol=2e-2)
        assert plan.call_counts().get(("moe_unpermute", "native"), 0) == 1
    finally:
        emulators.deactivate()


def test_emulated_torch_npu_ops_are_opaque_under_fake_tensor_mode() -> None:
    """Each emulated op is one custom op with a fake kernel (as torch_npu's meta registrations): the
    emulator's value checks (host reads) run only in the real kernel, never under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conformance.emulators import torch_npu as emu

    with FakeTensorMode():
        y = emu.npu_moe_token_unpermute(torch.empty(8, 16, dtype=torch.bfloat16), torch.empty(8, dtype=torch.int32),
                                        probs=torch.empty(4, 2, dtype=torch.bfloat16))
        assert y.shape == (4, 16) and y.dtype == torch.bfloat16
        (out,) = emu.npu_grouped_matmul([torch.empty(6, 8)], [torch.empty(3, 8, 5)], split_item=2, group_type=0,
                                        group_list=torch.empty(3, dtype=torch.int64), group_list_type=1)
        assert out.shape == (6, 5)
        x, row_idx, counts, _ = emu.npu_moe_init_routing_v2(
            torch.empty(4, 8), torch.empty(4, 2, dtype=torch.int32), expert_num=6, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, active_expert_range=[0, 6])
        assert x.shape == (8, 8) and row_idx.shape == (8,) and counts.shape == (6,)
    assert set(emu.KERNELS) == {f.__name__ for f in emu.FUNCTIONS}
    for name in emu.KERNELS:
        assert hasattr(torch.ops.hwlayer_emulated_npu, name)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of every new tensor storage an op creates (outputs sharing no input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str] = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, (t.untyped_storage().nbytes(), str(func)))
        return out


def test_ascend_adapters_allocate_nothing_cache_or_weight_sized_per_call() -> None:
    """No whole-cache or whole-weight copy per call: every tensor an adapter call creates is far
    smaller than the cache or weight stack it reads (the old sparse_mla_attention copied the latent
    cache into nope / rope tensors on every call)."""
    import hwlayer
    from conformance import emulators

    emulators.activate("ascend")
    try:
        plan = hwlayer.plan("ascend", trace=True)
        layout = plan.backend.layout()
        gen = torch.Generator().manual_seed(4)
        nb, bs, T = 64, 16, 3
        table = torch.arange(nb, dtype=torch.int32).view(1, nb).expand(T, nb).contiguous()
        cu, lens = torch.arange(T + 1, dtype=torch.int32), torch.full((T,), 200, dtype=torch.int32)
        latent = layout.latent_cache(nb, bs, 512, 64, torch.bfloat16, torch.device("cpu"))
        latent.write(torch.arange(nb * bs), torch.randn(nb * bs, 576, generator=gen).bfloat16())
        keys = layout.indexer_cache(nb, bs, 128, torch.bfloat16, torch.device("cpu"))
        keys.write(torch.arange(nb * bs), torch.randn(nb * bs, 128, generator=gen).bfloat16())
        q = torch.randn(T, 8, 576, generator=gen).bfloat16()
        idx = torch.randint(0, 200, (T, 32), generator=gen, dtype=torch.int32)
        qi, wi = torch.randn(T, 32, 128, generator=gen).bfloat16(), torch.randn(T, 32, generator=gen)
        x, w = torch.randn(T * 4, 128, generator=gen).bfloat16(), torch.randn(8, 256, 128, generator=gen).bfloat16()
        sizes = torch.tensor([2, 0, 3, 1, 0, 2, 2, 2])
        calls = {
            "sparse_mla_attention": (latent.nbytes, lambda: plan.sparse_mla_attention(q, latent, idx, table, cu, lens,
                                                                                      0.05, 512)),
            "lightning_indexer": (keys.nbytes, lambda: plan.lightning_indexer(qi, wi, keys, table, cu, lens, 16, 0.1,
                                                                              1, 200)),
            "grouped_gemm": (w.numel() * 2, lambda: plan.grouped_gemm(x, w, sizes)),
            "kv_cache_write": (latent.nbytes, lambda: plan.kv_cache_write(latent, torch.randn(T, 576).bfloat16(),
                                                                          torch.tensor([5, -1, 700]))),
        }
        for op, (big, call) in calls.items():
            with _Allocations() as seen:
                call()
            assert seen.largest[0] < big / 8, f"{op}: {seen.largest[1]} allocated {seen.largest[0]} of {big} bytes"
        counts = plan.call_counts()
        assert all(counts.get((op, "native"), 0) == 1 for op in calls if op != "kv_cache_write"), counts
    finally:
        emulators.deactivate()


@pytest.mark.slow
def test_emulated_ascend_decode_forward_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step on the Ascend layout (split latent caches; native norm / rope / MoE adapters over
    opaque emulated ops) under FakeTensorMode: any host read in an adapter or in the generic ops on
    the backend's cache objects raises. (GLM-5 widths, where the DSA adapters serve too: H2's test.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conformance import emulators
    from model import Batch, load_model
    from model.tiny import ensure_default_model

    monkeypatch.setenv("HWLAYER_CHECK", "0")
    emulators.activate("ascend")
    try:
        m = load_model(ensure_default_model(), backend="ascend", dtype="bf16")
        cache = m.new_cache(4, 16)
        assert type(cache.latent[0]).__name__ == "SplitKV"
        table = torch.arange(4, dtype=torch.int32).view(1, 4)
        m.forward_batch(Batch(torch.arange(1, 10), torch.tensor([0, 9], dtype=torch.int32),
                              torch.tensor([9], dtype=torch.int32), table), cache)
        ctx = m.context(Batch(torch.tensor([7]), torch.tensor([0, 1], dtype=torch.int32),
                              torch.tensor([10], dtype=torch.int32), table), cache)
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert m.forward_context(ctx, cache).shape == (1, m.config.vocab_size)
    finally:
        emulators.deactivate()


@pytest.mark.parametrize("backend", ["cpu", "ascend"])
def test_kv_bytes_per_token_is_exact_for_the_backends_layout(backend: str) -> None:
    """The serving layer sizes its cache with model.kv_bytes_per_token(): it must match what new_cache
    allocates under the backend's layout (canonical, or Ascend's split nope / rope caches)."""
    from conformance import emulators
    from model import load_model
    from model.tiny import ensure_default_model

    if backend == "ascend":
        emulators.activate("ascend")
    try:
        m = load_model(ensure_default_model(), backend=backend, dtype="bf16")
        cache = m.new_cache(3, 16)
        allocated = sum(c.nbytes for c in cache.latent + cache.indexer if c is not None)
        assert m.kv_bytes_per_token(16) * 3 * 16 == allocated == m.kv_bytes_per_token() * 3 * 16
        assert type(cache.latent[0]).__name__ == ("SplitKV" if backend == "ascend" else "ContiguousKV")
    finally:
        emulators.deactivate()


def test_ascend_step_tables_are_built_once_per_step_not_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout builds the int32 sequence-length tables once (AttentionMetadata.backend); the DSA
    adapters of every layer take them from ``meta`` instead of converting again."""
    import hwlayer
    from conformance import emulators
    from hwlayer.backends.ascend import adapters
    from hwlayer.ops.layout import attention_metadata, with_backend_tables

    conversions = []
    real = convert.tnd_actual_seq_lengths
    monkeypatch.setattr(convert, "tnd_actual_seq_lengths", lambda cu: conversions.append(1) or real(cu))
    emulators.activate("ascend")
    try:
        plan = hwlayer.plan("ascend", trace=True)
        gen = torch.Generator().manual_seed(5)
        nb, bs, T = 8, 16, 2
        table = torch.arange(nb, dtype=torch.int32).view(2, 4)
        cu, lens = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([40, 60], dtype=torch.int32)
        latent = plan.backend.layout().latent_cache(nb, bs, 512, 64, torch.bfloat16, torch.device("cpu"))
        latent.write(torch.arange(nb * bs), torch.randn(nb * bs, 576, generator=gen).bfloat16())
        cos_sin = torch.randn(128, 64, generator=gen)
        meta = attention_metadata(cu, lens, table, lens.long() - 1, block_size=bs, max_seqlen_k=64, has_padding=False,
                                  cos_sin_cache=cos_sin)
        meta = with_backend_tables(meta, plan.backend.layout(), cu, lens, table)
        assert isinstance(meta.backend, adapters.AscendStepTables) and conversions == [1]
        # rope: the full-width npu_rotary_mul tables come from the step's tables too
        rope_tables = []
        real_rope = convert.rope_cos_sin
        monkeypatch.setattr(convert, "rope_cos_sin", lambda *a: rope_tables.append(1) or real_rope(*a))
        x = torch.randn(T, 9, 64, generator=gen).bfloat16()
        for _ in range(2):
            torch.testing.assert_close(plan.rope(x, lens.long() - 1, cos_sin, True, meta=meta),
                                       ops.rope(x, lens.long() - 1, cos_sin, True), atol=1e-2, rtol=1e-2)
        assert rope_tables == [] and plan.call_counts()[("rope", "native")] == 2
        without = plan.rope(x, lens.long() - 1, cos_sin, True)  # without meta: converted for the call
        assert rope_tables == [1] and torch.equal(without, plan.rope(x, lens.long() - 1, cos_sin, True, meta=meta))
        q = torch.randn(T, 8, 576, generator=gen).bfloat16()
        idx = torch.randint(0, 40, (T, 16), generator=gen, dtype=torch.int32)
        outs = [plan.sparse_mla_attention(q, latent, idx, table, cu, lens, 0.05, 512, meta=meta) for _ in range(3)]
        assert conversions == [1] and plan.call_counts()[("sparse_mla_attention", "native")] == 3
        torch.testing.assert_close(outs[0].float(), ops.sparse_mla_attention(
            q, latent, idx, table, cu, lens, 0.05, 512).float(), atol=2e-2, rtol=2e-2)
    finally:
        emulators.deactivate()
