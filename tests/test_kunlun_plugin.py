"""The Kunlunxin plugin (plugins/hwlayer-kunlun) and its kunlun_ops emulator (issue 24).

Two halves: (1) the emulator against vectors worked out by hand from the references it cites
(vLLM-Kunlun 09869ee's docstrings: a base-2 sparse-prefill lse; FlashMLA's ``ref_sparse_attn_fwd``;
DeepGEMM's ``ref_fp8_mqa_logits``; vLLM's ``grouped_topk`` with a correction bias), not computed by the
emulator's code; (2) the adapters at documented shapes against hwlayer's generic ops, with traced call
counts proving the adapter served, and the limits they decline.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hwlayer
from conformance import emulators
from conformance.emulators import kunlun_ops as ko
from conformance.emulators._common import VendorCheckError
from hwlayer import ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "hwlayer-kunlun"))

LN2 = math.log(2.0)


# ---- (1) the emulator against hand-worked vectors


def test_sparse_prefill_lse_is_base_2_and_invalid_indices_are_skipped():
    """q = e0; kv rows score 1 and 2 (value 10 and 20); an index past s_kv and -1 are invalid."""
    q = torch.zeros(1, 1, 576, dtype=torch.bfloat16)
    q[0, 0, 0] = 1.0
    kv = torch.zeros(3, 576, dtype=torch.bfloat16)
    kv[1, 0], kv[2, 0], kv[1, 1], kv[2, 1] = 1.0, 2.0, 10.0, 20.0
    idx = torch.tensor([[[1, 2, 7, -1]]], dtype=torch.int32)
    out = torch.zeros(1, 1, 512, dtype=torch.bfloat16)
    m, lse = torch.zeros(1, 1), torch.zeros(1, 1)
    ko.sparse_prefill_fwd_opt(q=q, kv=kv, indices=idx, out=out, max_logits=m, lse=lse, sm_scale=1.0, d_v=512)
    natural = math.log(math.e + math.e**2)
    assert lse.item() == pytest.approx(natural / LN2, rel=1e-5)  # "lse: ... 2-based log-sum-exp"
    w2 = math.e**2 / (math.e + math.e**2)
    assert out[0, 0, 1].item() == pytest.approx(10 * (1 - w2) + 20 * w2, rel=1e-2)
    with pytest.raises(VendorCheckError, match="d_v can only be 512"):
        ko.sparse_prefill_fwd_opt(q=q, kv=kv, indices=idx, out=out, max_logits=m, lse=lse, sm_scale=1.0, d_v=256)


def test_fwd_kvcache_mla_decode_stats_and_its_seq_len_q_limit():
    q = torch.zeros(1, 1, 1, 576, dtype=torch.bfloat16)
    q[..., 0] = 1.0
    kv = torch.zeros(3, 576, dtype=torch.bfloat16)
    kv[1, 0], kv[2, 0], kv[1, 1], kv[2, 1] = 1.0, 2.0, 10.0, 20.0
    out = torch.zeros(1, 1, 1, 512, dtype=torch.bfloat16)
    m, s = torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)
    ko.fwd_kvcache_mla(q_c=q, kv_cache=kv, indices=torch.tensor([[[1, 2, -1]]], dtype=torch.int32),
                       kv_lod_cpu=torch.tensor([3], dtype=torch.int32), out=out, max_logits=m, p_sums=s,
                       softmax_scale=1.0, max_seq_kv=3)
    assert m.item() == pytest.approx(2.0) and s.item() == pytest.approx(1 + math.e**-1, rel=1e-5)
    with pytest.raises(VendorCheckError, match="seq_len_q <= 2"):
        ko.fwd_kvcache_mla(q_c=q.expand(1, 3, 1, 576).contiguous(), kv_cache=kv,
                           indices=torch.zeros(1, 3, 1, dtype=torch.int32),
                           kv_lod_cpu=torch.tensor([3], dtype=torch.int32), out=torch.zeros(1, 3, 1, 512,
                           dtype=torch.bfloat16), max_logits=torch.zeros(1, 3, 1), p_sums=torch.zeros(1, 3, 1),
                           softmax_scale=1.0, max_seq_kv=3)


def test_i8_mqa_logits_is_the_relu_weighted_head_sum():
    """logits[m, n] = sum_h w[m, h] * relu(q[m, h] . k[n] * s[n]) (ref_fp8_mqa_logits with int8 inputs)."""
    q = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.int8)  # 1 row, 2 heads, D 2
    k = torch.tensor([[2, -3], [-1, 4]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0])
    w = torch.tensor([[1.0, 10.0]])
    logits = torch.empty(1, 2)
    def lod(n):
        return [torch.tensor([0, n], dtype=torch.int32)] * 2
    ko.I8_mqa_logits(q=q, fused_kv_cache=[k, scale], weights=w, context_q_lens=lod(1), context_k_lens=lod(2),
                     logits=logits, clean_logits=True)
    # key 0: head 0 -> relu(2 * .5) = 1, head 1 -> relu(-3 * .5) = 0; key 1: relu(-2) = 0, relu(8) = 8
    assert logits.tolist() == [[1.0, 80.0]]


def test_sigmoid_group_topk_keeps_the_best_groups_and_normalizes():
    """8 experts in 4 groups of 2, keep 2 groups, top-2. Scores sigmoid(x); the bias only picks."""
    x = torch.tensor([[0.0, 0.1, 3.0, -3.0, 1.0, 1.0, -1.0, 2.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    w, i = torch.empty(1, 2), torch.empty(1, 2, dtype=torch.int32)
    ko.moe_sigmoid_group_topk_norm(x=x, norm_score=w, topk_index=i, block_static=torch.zeros(12, 8, dtype=torch.int32),
                                   bias=bias, n_group=4, topk_group=2, scale=1.0)
    # groups' top-2 biased sums: g0 = .5+.525, g1 = .953+.047, g2 = .731+.731, g3 = .269+.881+5 -> keep g3, g2
    assert sorted(i[0].tolist()) == [4, 7]  # expert 2 (the best unbiased score) is in a dropped group
    s4, s7 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-2.0))
    assert w[0].tolist() == pytest.approx(sorted([s7 / (s4 + s7), s4 / (s4 + s7)], reverse=i[0, 0].item() == 7))


def test_moe_fc_multiplies_each_lod_segment_by_its_expert():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]], dtype=torch.bfloat16)  # [E=2, N=1, K=2]
    y = torch.zeros(3, 1, 1, dtype=torch.bfloat16)
    ko.moe_fc(x=x, weight=w, sorted_tokens_num_lod=torch.tensor([0, 1, 3], dtype=torch.int32),
              sorted_tokens_idx=torch.arange(3, dtype=torch.int32), moe_topk=1, y=y)
    assert y.flatten().tolist() == [1.0, 4.0, 7.0]


# ---- (2) the adapters at documented shapes, against the generic ops


@pytest.fixture
def plan():
    emulators.activate("kunlunxin")
    yield hwlayer.plan("kunlunxin", trace=True)
    emulators.deactivate()


def served_natively(plan, op: str) -> bool:
    counts = plan.call_counts()
    return counts.get((op, "native"), 0) > 0 and not any(o == op and t != "native" for (o, t) in counts)


def mla_case(q_lens: list[int], seq_lens: list[int], topk: int = 24, heads: int = 16, bs: int = 16):
    gen = torch.Generator().manual_seed(1)
    blocks = 4 * len(seq_lens)  # 4 blocks of 16 per sequence (contexts up to 64)
    cache = torch.randn(blocks, bs, 576, generator=gen).bfloat16()
    table = torch.randperm(blocks, generator=gen)[: len(seq_lens) * 4].view(len(seq_lens), -1).to(torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    T = cu[-1].item()
    q = (torch.randn(T, heads, 576, generator=gen) * 0.3).bfloat16()
    idx = torch.randint(0, min(seq_lens), (T, topk), generator=gen, dtype=torch.int32)
    idx[0, topk // 2:] = -1
    if T > 1:
        idx[1] = -1  # a token with no index: out 0, lse -inf
    return q, cache, idx, table, cu, torch.tensor(seq_lens, dtype=torch.int32), 576**-0.5, 512


@pytest.mark.parametrize("q_lens", [[3, 2], [1, 1, 1]], ids=["prefill", "decode"])
def test_sparse_mla_serves_prefill_and_decode(plan, q_lens):
    args = mla_case(q_lens, [40, 30, 50][: len(q_lens)])
    got, want = plan.sparse_mla_attention(*args), ops.sparse_mla_attention(*args)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    out, lse = plan.sparse_mla_attention(*args, return_lse=True)  # always the prefill kernel: base 2 -> natural
    _, want_lse = ops.sparse_mla_attention(*args, return_lse=True)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
    assert served_natively(plan, "sparse_mla_attention")


def test_int8_indexer_is_opt_in_and_keeps_the_top_k(plan, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    seq_lens, bs = [40, 33], 16
    keys = torch.randn(8, bs, 128, generator=gen)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    cu = torch.tensor([0, 4, 5], dtype=torch.int32)
    q, w = torch.randn(5, 32, 128, generator=gen), torch.rand(5, 32, generator=gen)
    args = (q, w, keys, table, cu, torch.tensor(seq_lens, dtype=torch.int32), 16, 128**-0.5, 4, 40)
    plan.lightning_indexer(*args)
    assert plan.call_counts().get(("lightning_indexer", "native"), 0) == 0  # lossy: off by default
    monkeypatch.setenv("HWLAYER_KUNLUN_INT8_INDEXER", "1")
    got, want = plan.lightning_indexer(*args), ops.lightning_indexer(*args)
    hits = [len(set(g.tolist()) & set(x.tolist()) - {-1}) / max(1, len(set(x.tolist()) - {-1}))
            for g, x in zip(got, want, strict=True)]
    assert min(hits) >= 0.8, hits
    assert plan.call_counts()[("lightning_indexer", "native")] == 1


def test_routing_and_grouped_gemm_serve_glm5_shapes(plan):
    gen = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(6, 256, generator=gen), torch.randn(256, generator=gen) * 0.05
    got_w, got_i = plan.moe_route(logits, bias, 8, 1, 1, True, 2.5)  # GLM-5: 256 experts, one group
    want_w, want_i = ops.moe_route(logits, bias, 8, 1, 1, True, 2.5)
    assert torch.equal(got_i.sort(-1).values, want_i.sort(-1).values)
    torch.testing.assert_close(got_w.sort(-1).values, want_w.sort(-1).values, atol=1e-5, rtol=1e-5)
    assert served_natively(plan, "moe_route")
    plan.moe_route(logits, bias, 8, 1, 1, False, 2.5)  # the kernel always normalizes: declined
    assert plan.call_counts()[("moe_route", "generic")] == 1

    x = torch.randn(9, 64, generator=gen).bfloat16()
    w = torch.randn(4, 32, 64, generator=gen).bfloat16()
    sizes = torch.tensor([3, 0, 2, 2], dtype=torch.int32)  # 7 rows; 2 padding rows
    got, want = plan.grouped_gemm(x, w, sizes), ops.grouped_gemm(x, w, sizes)
    torch.testing.assert_close(got[:7].float(), want[:7].float(), atol=5e-2, rtol=2e-2)
    assert served_natively(plan, "grouped_gemm")


def test_norm_rope_and_cache_write_vectors():
    x = torch.tensor([[3.0, 4.0]])  # mean(x^2) = 12.5
    out = torch.empty_like(x)
    ko.rmsnorm(x, torch.tensor([1.0, 2.0]), out, 0.0)
    assert out[0].tolist() == pytest.approx([3 / 12.5**0.5, 8 / 12.5**0.5])
    summed, normed = torch.empty_like(x), torch.empty_like(x)
    ko.add_rmsnorm(x, torch.tensor([[1.0, -2.0]]), residual_output=summed, weight=torch.ones(2), eps=0.0, output=normed)
    assert summed.tolist() == [[4.0, 2.0]] and normed[0].tolist() == pytest.approx([4 / 10**0.5, 2 / 10**0.5])
    # GPT-J pair (1, 0) at position 1 with angle pi/2: -> (0, 1); NeoX halves likewise
    cache = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row p: cos, then sin of the one frequency
    for neox in (False, True):
        q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        ko.rotary_embedding(torch.tensor([1]), q, k, 2, cache, neox)
        assert q[0].tolist() == pytest.approx([0.0, 1.0]) and k[0].tolist() == pytest.approx([-1.0, 0.0])
    kv = torch.zeros(1, 4, 3)
    ko.concat_and_cache_mla(kv_c=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), k_pe=torch.tensor([[5.0], [6.0]]),
                            slot_mapping=torch.tensor([2, -1]), kv_cache=kv)
    assert kv[0, 2].tolist() == [1.0, 2.0, 5.0] and kv[0].abs().sum().item() == 8.0  # slot -1 skipped


def test_norm_rope_and_latent_cache_write_serve(plan):
    gen = torch.Generator().manual_seed(5)
    x, r = (torch.randn(4, 64, generator=gen).bfloat16() for _ in range(2))
    w = torch.rand(64, generator=gen).bfloat16()
    got, want = plan.rms_norm(x, w, 1e-6, r), ops.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    pos = torch.tensor([0, 5, 9, 2])
    cs = torch.randn(16, 64, generator=gen)
    q = torch.randn(4, 8, 64, generator=gen).bfloat16()
    torch.testing.assert_close(plan.rope(q, pos, cs, True), ops.rope(q, pos, cs, True), atol=2e-2, rtol=2e-2)
    latent = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    rows = torch.randn(3, 576, generator=gen).bfloat16()
    slots = torch.tensor([17, -1, 3])
    plan.kv_cache_write(latent, rows, slots)
    want = torch.zeros_like(latent)
    ops.kv_cache_write(want, rows, slots)
    assert torch.equal(latent, want)
    plan.kv_cache_write(torch.zeros(2, 16, 128, dtype=torch.bfloat16), rows[:, :128], slots)  # indexer: generic
    for op in ("rms_norm", "rope"):
        assert served_natively(plan, op)
    assert plan.call_counts()[("kv_cache_write", "native")] == 1
    assert plan.call_counts()[("kv_cache_write", "generic")] == 1


# ---- the calls against vLLM-Kunlun's own (kunlun_ops is closed: its callers' keyword calls are its interface)

CALLS = json.loads((Path(ko.__file__).parent / "stubs" / "vLLM-Kunlun-09869ee-kunlun_ops-calls.json").read_text())


@pytest.mark.parametrize("name", sorted(CALLS["calls"]))
def test_emulator_accepts_every_call_vllm_kunlun_makes(name):
    sig = inspect.signature(getattr(ko, name))
    for call in CALLS["calls"][name]:
        sig.bind(*[None] * call["positional"], **dict.fromkeys(call["keywords"]))  # raises on a mismatch


def test_adapters_call_kunlun_ops_as_vllm_kunlun_does():
    """Every ``_ops().NAME(...)`` call in the plugin: a recorded function, the same number of positional
    arguments as vLLM-Kunlun passes, and only keywords it passes."""
    from hwlayer_kunlun import adapters

    seen = set()
    for node in ast.walk(ast.parse(Path(adapters.__file__).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", None) == "_ops"):
            name = node.func.attr
            assert name in CALLS["calls"], f"kunlun_ops.{name}: no vLLM-Kunlun call to follow"
            assert any(len(node.args) == c["positional"] and {k.arg for k in node.keywords} <= set(c["keywords"])
                       for c in CALLS["calls"][name]), f"kunlun_ops.{name} called unlike vLLM-Kunlun (l.{node.lineno})"
            seen.add(name)
    assert seen == set(CALLS["calls"])  # every recorded function is used by an adapter


def test_int8_experts_through_moe_fc_with_weights_prepared_once(plan):
    from hwlayer.ops.quant import quantize_weight

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 64, generator=gen).bfloat16()
    qw = quantize_weight(torch.randn(3, 32, 64, generator=gen), "int8")
    prepared = plan.prepare_weight("model.layers.1.mlp.experts.w13", qw)
    assert prepared.prepared["kunlun_w_max"].shape == (3, 32, 1)  # the maxima kunlun_ops takes, made at load
    assert torch.equal(prepared.dequantize(), qw.dequantize())
    sizes = torch.tensor([4, 0, 3], dtype=torch.int32)
    got, want = plan.quant_grouped_gemm(x, prepared, sizes), ops.quant_grouped_gemm(x, qw, sizes)
    torch.testing.assert_close(got[:7].float(), want[:7].float(), atol=3e-2, rtol=1e-2)
    assert served_natively(plan, "quant_grouped_gemm")


def test_host_lengths_are_copied_once_per_step_not_per_layer(plan, monkeypatch):
    """The kernels' host lods (``kv_lod_cpu``, ``qlod_cpu``) come from the step tables the layout builds once
    per step (AttentionMetadata.backend); the adapters of every layer take them from ``meta``."""
    from hwlayer_kunlun import adapters

    from hwlayer.ops.layout import attention_metadata, with_backend_tables

    built = []
    real = adapters.KunlunLayout.step_tables
    monkeypatch.setattr(adapters.KunlunLayout, "step_tables", lambda *a: built.append(1) or real(*a))
    q, cache, idx, table, cu, lens, scale, v_dim = mla_case([1, 1], [40, 30])
    meta = attention_metadata(cu, lens, table, lens.long() - 1, block_size=16, max_seqlen_k=64, has_padding=False)
    meta = with_backend_tables(meta, plan.backend.layout(), cu, lens, table)
    assert isinstance(meta.backend, adapters.KunlunStepTables) and built == [1]
    assert meta.backend.kv_lens_cpu.device.type == "cpu" and meta.backend.kv_lens_cpu.tolist() == [40, 30]
    outs = [plan.sparse_mla_attention(q, cache, idx, table, cu, lens, scale, v_dim, meta=meta) for _ in range(3)]
    assert built == [1] and plan.call_counts()[("sparse_mla_attention", "native")] == 3
    torch.testing.assert_close(outs[0].float(), ops.sparse_mla_attention(q, cache, idx, table, cu, lens, scale,
                                                                         v_dim).float(), atol=2e-2, rtol=2e-2)


def test_int8_indexer_cache_is_written_once_and_scored_as_stored(plan, monkeypatch):
    """With the opt-in set when the caches are made, the indexer cache is vLLM-Kunlun's int8 layout (per block
    bs*D int8 values then bs fp32 scales): 132 bytes a token instead of 256; keys are quantised when written
    (the generic kv_cache_write, through the layout's write) and the native indexer scores them as stored."""
    from hwlayer_kunlun import adapters

    monkeypatch.setenv("HWLAYER_KUNLUN_INT8_INDEXER", "1")
    layout = plan.backend.layout()
    cache = layout.indexer_cache(4, 16, 128, torch.bfloat16, torch.device("cpu"))
    assert isinstance(cache, adapters.Int8IndexerKV) and cache.nbytes == 4 * 16 * 132
    assert layout.bytes_per_token(512, 64, 128, torch.bfloat16, 16) == 576 * 2 + 132
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(64, 128, generator=gen).bfloat16()
    plan.kv_cache_write(cache, keys, torch.arange(64))
    assert plan.call_counts()[("kv_cache_write", "generic")] == 1  # the indexer cache: the layout's write
    torch.testing.assert_close(cache.rows(torch.arange(64)).float(), keys.float(), atol=0.03, rtol=0.01)
    assert cache.values().view(torch.uint8).data_ptr() == cache.data.data_ptr()  # views of the one buffer
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([30, 25], dtype=torch.int32)
    q, w = torch.randn(4, 32, 128, generator=gen).bfloat16(), torch.rand(4, 32, generator=gen)
    args = (q, w, cache, table, cu, lens, 8, 128**-0.5, 3, 32)
    quantize_calls = []
    monkeypatch.setattr(adapters, "_int8_rows", lambda x, real=adapters._int8_rows: quantize_calls.append(
        x.shape[0]) or real(x))
    got = plan.lightning_indexer(*args)
    assert quantize_calls == [4 * 32]  # the queries only: no key is re-quantised
    want = ops.lightning_indexer(*args)  # the generic op on the dequantised rows
    hits = [len(set(g.tolist()) & set(x.tolist()) - {-1}) / max(1, len(set(x.tolist()) - {-1}))
            for g, x in zip(got, want, strict=True)]
    assert min(hits) >= 0.75, hits
    assert plan.call_counts()[("lightning_indexer", "native")] == 1


def test_i8_paged_mqa_logits_vector():
    """Two blocks of 2 slots; sequence 0 owns blocks [1, 0] and has 3 keys: position p's key at block
    table[p // 2], offset p % 2; one query at position 2 (context_len - next_n + 0)."""
    k_val = torch.tensor([[[3], [4]], [[1], [2]]], dtype=torch.int8).view(2, 2, 1, 1)  # block 0: 3, 4; 1: 1, 2
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    k_scale = torch.tensor([[1.0, 0.5, 2.0, 9.0]])  # per position, gathered by the table
    out = torch.empty(1, 1, 4)
    lens = torch.tensor([3], dtype=torch.int32)
    ko.I8_paged_mqa_logits(q=torch.tensor([[[[2]]]], dtype=torch.int8), fused_kv_cache=[k_val, k_scale],
                           weights=torch.tensor([[[0.5]]]), context_lens=[lens, lens], block_table=table,
                           max_context_len=4, clean_logits=True, out=out)
    # positions 0, 1, 2 hold keys 1, 2, 3: 0.5 * relu(2 * k * s) = 1, 1, 6; position 3 is past the query
    assert out.flatten().tolist() == [1.0, 1.0, 6.0, float("-inf")]


def test_int8_indexer_decode_goes_through_the_paged_kernel(plan, monkeypatch):
    from hwlayer_kunlun import adapters

    monkeypatch.setenv("HWLAYER_KUNLUN_INT8_INDEXER", "1")
    cache = plan.backend.layout().indexer_cache(4, 16, 128, torch.bfloat16, torch.device("cpu"))
    gen = torch.Generator().manual_seed(8)
    plan.kv_cache_write(cache, torch.randn(64, 128, generator=gen).bfloat16(), torch.arange(64))
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([30, 25], dtype=torch.int32)
    q, w = torch.randn(2, 32, 128, generator=gen).bfloat16(), torch.rand(2, 32, generator=gen)
    paged = []
    real = adapters._paged_indexer
    monkeypatch.setattr(adapters, "_paged_indexer", lambda *a: paged.append(1) or real(*a))
    args = (q, w, cache, table, cu, lens, 8, 128**-0.5, 1, 32)
    got, want = plan.lightning_indexer(*args), ops.lightning_indexer(*args)
    assert paged == [1] and plan.call_counts()[("lightning_indexer", "native")] == 1
    hits = [len(set(g.tolist()) & set(x.tolist())) / 8 for g, x in zip(got, want, strict=True)]
    assert min(hits) >= 0.75, hits
    assert (got >= 0).all() and (got < lens[:, None]).all()  # causal: inside each sequence
