"""Hook specs 1.2: the step's ``AttentionMetadata`` as the ops' optional ``meta`` (issue 11).

* a wrong ``meta`` is refused with the ops' one-line ``ValueError`` (op, argument, what was expected);
* dispatch: an implementation or ``supports()`` written for 1.0 / 1.1 (no ``meta`` in its signature)
  is called without it, one that declares ``meta`` (or ``**kwargs``) gets the caller's object;
* results never depend on ``meta``: the tiny model's logits with and without the per-step tables
  are bit-identical over a prefill and several decode steps;
* ``fused_experts`` on the reference plan: the direct per-assignment path (few tokens) and the
  permute -> grouped_gemm -> unpermute composite agree with each other and with float64, dropped
  ids included, and each test asserts which path ran.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from test_dispatch import _backend, _plugin  # the real pluggy plugin helpers of the dispatch tests

import hwlayer
import hwlayer.ops.moe as moe_module
from hwlayer import ops
from hwlayer.dispatch import META_OPS, DispatchPlan
from hwlayer.ops import CATALOGUE
from hwlayer.ops.layout import AttentionMetadata, attention_metadata
from hwlayer.registry import load_registry
from model import Batch
from model.glm5 import GLM5

# ---------------------------------------------------------------------------------------------
# A small varlen step: sequence 0 prefills 3 tokens of a 5-token context, sequence 1 decodes its
# 4th token. Blocks of 4 slots; sequence 0 owns blocks 2, 0, sequence 1 owns blocks 3, 1 (the table
# repeats its last block, wide enough for tables built with blocks of 2 as well).

BLOCK = 4
Q_LENS, SEQ_LENS = [3, 1], [5, 4]
T = sum(Q_LENS)
MAX_K = max(SEQ_LENS)


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def step(gen: torch.Generator) -> dict:
    """The step's tensors (cu_seqlens_q, seq_lens, block_table, positions, slots, a rope cache)."""
    table = i32(2, 0, 0, 0, 3, 1, 1, 1).view(2, 4)
    positions = torch.tensor([2, 3, 4, 3])
    slots = torch.tensor([2 * BLOCK + 2, 2 * BLOCK + 3, 0 * BLOCK + 0, 3 * BLOCK + 3])
    return {"cu": i32(0, 3, 4), "lens": i32(*SEQ_LENS), "table": table, "positions": positions, "slots": slots,
            "cos_sin": torch.randn(16, 8, generator=gen)}


def meta_of(s: dict, *, block_size: int = BLOCK, max_seqlen_k: int = MAX_K, has_padding: bool = True,
            cos_sin: torch.Tensor | None = None, tokens: int = T) -> AttentionMetadata:
    """``attention_metadata`` of the step (``tokens < T``: of its first sequence's first tokens only)."""
    if tokens == T:
        cu, lens, positions = s["cu"], s["lens"], s["positions"]
    else:
        cu, lens, positions = i32(0, tokens), i32(SEQ_LENS[0] - Q_LENS[0] + tokens), s["positions"][:tokens]
    return attention_metadata(cu, lens, s["table"][: cu.shape[0] - 1], positions, block_size=block_size,
                              max_seqlen_k=max_seqlen_k, has_padding=has_padding, cos_sin_cache=cos_sin)


def rope_call(s: dict, gen: torch.Generator, meta) -> torch.Tensor:
    return ops.rope(torch.randn(T, 2, 8, generator=gen), s["positions"], s["cos_sin"], True, meta=meta)


def kv_write_call(s: dict, gen: torch.Generator, meta) -> None:
    ops.kv_cache_write(torch.zeros(4, BLOCK, 6), torch.randn(T, 6, generator=gen), s["slots"], meta=meta)


def indexer_call(s: dict, gen: torch.Generator, meta) -> torch.Tensor:
    q, w = torch.randn(T, 2, 8, generator=gen), torch.rand(T, 2, generator=gen)
    k_cache = torch.randn(4, BLOCK, 8, generator=gen)
    return ops.lightning_indexer(q, w, k_cache, s["table"], s["cu"], s["lens"], 3, 8**-0.5, max(Q_LENS), MAX_K,
                                 meta=meta)


def attention_call(s: dict, gen: torch.Generator, meta) -> tuple[torch.Tensor, torch.Tensor]:
    q, kv = torch.randn(T, 2, 10, generator=gen), torch.randn(4, BLOCK, 10, generator=gen)
    indices = torch.tensor([[0, 2, -1], [1, 3, 0], [4, 2, -1], [3, 1, -1]], dtype=torch.int32)
    return ops.sparse_mla_attention(q, kv, indices, s["table"], s["cu"], s["lens"], 0.3, 8, meta=meta, return_lse=True)


CALLS = {"rope": rope_call, "kv_cache_write": kv_write_call, "lightning_indexer": indexer_call,
         "sparse_mla_attention": attention_call}


def _expect_one_line(call, message: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# a. A wrong meta: one ValueError line


def test_every_meta_op_accepts_its_steps_tables():
    """The happy path the refusals below are measured against: the right meta gives the same result."""
    s = step(torch.Generator().manual_seed(0))
    good = {"rope": meta_of(s, cos_sin=s["cos_sin"]), "kv_cache_write": meta_of(s),
            "lightning_indexer": meta_of(s), "sparse_mla_attention": meta_of(s)}
    for op, call in CALLS.items():
        with_meta = call(s, torch.Generator().manual_seed(1), good[op])
        without = call(s, torch.Generator().manual_seed(1), None)
        if op == "sparse_mla_attention":  # (out, lse)
            assert torch.equal(with_meta[0], without[0]) and torch.equal(with_meta[1], without[1])
        elif op != "kv_cache_write":  # writes in place: test_kv_cache_write_... below compares the caches
            assert torch.equal(with_meta, without), op


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("heads", [None, 3], ids=["2d", "3d"])
def test_rope_rows_from_meta_give_the_same_bits(interleaved, heads):
    s = step(torch.Generator().manual_seed(0))
    shape = (T, 16) if heads is None else (T, heads, 16)
    cos_sin = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    m = meta_of(s, cos_sin=cos_sin)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        with_meta = ops.rope(x, s["positions"], cos_sin, interleaved, meta=m)
        assert torch.equal(with_meta, ops.rope(x, s["positions"], cos_sin, interleaved)), dtype


NOT_META = "an AttentionMetadata or None"


@pytest.mark.parametrize("op", ["kv_cache_write", "lightning_indexer", "sparse_mla_attention"])
def test_meta_of_the_wrong_type_is_refused(op):
    s = step(torch.Generator().manual_seed(0))
    _expect_one_line(lambda: CALLS[op](s, torch.Generator().manual_seed(1), {"seq_idx": None}),
                     f"{op}: argument 'meta' expected {NOT_META}, got dict")


@pytest.mark.parametrize("op", list(CALLS))
def test_meta_of_another_batch_is_refused(op):
    s = step(torch.Generator().manual_seed(0))
    other = meta_of(s, tokens=2, cos_sin=s["cos_sin"])  # the tables of a 2-token batch
    _expect_one_line(lambda: CALLS[op](s, torch.Generator().manual_seed(1), other),
                     f"{op}: argument 'meta' expected the tables of this batch ({T} tokens), got tables of 2 tokens")


def test_rope_refuses_rows_of_another_cos_sin_cache():
    s = step(torch.Generator().manual_seed(0))
    foreign = meta_of(s, cos_sin=s["cos_sin"].clone())  # same values, another tensor: rope cannot tell
    _expect_one_line(lambda: rope_call(s, torch.Generator().manual_seed(1), foreign),
                     "rope: argument 'meta' expected rope rows gathered from this cos_sin_cache, got rows of another "
                     "cache")


def test_rope_meta_of_the_wrong_type_is_refused():
    s = step(torch.Generator().manual_seed(0))
    _expect_one_line(lambda: rope_call(s, torch.Generator().manual_seed(1), {"seq_idx": None}),
                     f"rope: argument 'meta' expected {NOT_META}, got dict")


def test_rope_meta_without_rope_rows_of_another_batch_is_refused():
    s = step(torch.Generator().manual_seed(0))
    _expect_one_line(lambda: rope_call(s, torch.Generator().manual_seed(1), meta_of(s, tokens=2)),
                     f"rope: argument 'meta' expected the tables of this batch ({T} tokens), got tables of 2 tokens")


@pytest.mark.parametrize("block_size, max_seqlen_k, got", [(2, MAX_K, f"block_size 2 and max_seqlen_k {MAX_K}"),
                                                           (BLOCK, 8, f"block_size {BLOCK} and max_seqlen_k 8")])
def test_indexer_refuses_tables_for_another_cache_geometry(block_size, max_seqlen_k, got):
    s = step(torch.Generator().manual_seed(0))
    other = meta_of(s, block_size=block_size, max_seqlen_k=max_seqlen_k)
    _expect_one_line(lambda: indexer_call(s, torch.Generator().manual_seed(1), other),
                     f"lightning_indexer: argument 'meta' expected tables for block_size {BLOCK} and max_seqlen_k "
                     f"{MAX_K}, got {got}")


def test_sparse_mla_attention_refuses_tables_for_another_block_size():
    s = step(torch.Generator().manual_seed(0))
    other = meta_of(s, block_size=2, max_seqlen_k=8)  # the same positions, addressed in blocks of 2
    _expect_one_line(lambda: attention_call(s, torch.Generator().manual_seed(1), other),
                     f"sparse_mla_attention: argument 'meta' expected tables for block_size {BLOCK}, got block_size 2")


def test_kv_cache_write_without_padding_is_one_copy_and_with_padding_skips_rows():
    """``has_padding=False`` takes the one-copy path; ``True`` keeps skipping -1 rows, like no meta."""
    s = step(torch.Generator().manual_seed(0))
    rows = torch.randn(T, 6, generator=torch.Generator().manual_seed(1))
    expected = torch.zeros(4 * BLOCK, 6)
    expected[s["slots"]] = rows
    cache = torch.zeros(4, BLOCK, 6)
    ops.kv_cache_write(cache, rows, s["slots"], meta=meta_of(s, has_padding=False))
    assert torch.equal(cache.view(-1, 6), expected)

    padded = s["slots"].clone()
    padded[1] = -1
    expected[s["slots"][1]] = 0
    for meta in (meta_of(s, has_padding=True), None):
        cache = torch.zeros(4, BLOCK, 6)
        ops.kv_cache_write(cache, rows, padded, meta=meta)
        assert torch.equal(cache.view(-1, 6), expected)


# ---------------------------------------------------------------------------------------------
# b. Dispatch: 1.0 / 1.1 implementations keep working, 1.2 ones get meta

RECEIVED: list[tuple[str, object]] = []  # (implementation, the meta it received)
SUPPORTS_ARGS: list[int] = []  # argument counts the old supports() was called with


def old_rope(x, positions, cos_sin_cache, interleaved):  # written for hook specs 1.1: no meta
    RECEIVED.append(("old", None))
    return ops.rope(x, positions, cos_sin_cache, interleaved)


def old_rope_supports(x, positions, cos_sin_cache, interleaved):
    SUPPORTS_ARGS.append(4)
    return True if x.dim() == 3 else "2-D x: not this kernel"


def new_rope(x, positions, cos_sin_cache, interleaved, *, meta=None):
    RECEIVED.append(("new", meta))
    return ops.rope(x, positions, cos_sin_cache, interleaved, meta=meta)


def new_rope_supports(x, positions, cos_sin_cache, interleaved, *, meta=None):
    RECEIVED.append(("new_supports", meta))
    return True


def kwargs_rope(x, positions, cos_sin_cache, interleaved, **kwargs):
    RECEIVED.append(("kwargs", kwargs.get("meta")))
    return ops.rope(x, positions, cos_sin_cache, interleaved, **kwargs)


def old_kv_cache_write(cache, rows, slot_mapping):  # hook specs 1.0
    RECEIVED.append(("old_kv", None))
    ops.kv_cache_write(cache, rows, slot_mapping)


@pytest.fixture
def meta_reg(monkeypatch):
    for var in ("HWLAYER_STRICT", "HWLAYER_PLUGINS", "HWLAYER_TRACE", "HWLAYER_TRITON", "GLM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    RECEIVED.clear()
    SUPPORTS_ARGS.clear()
    plugin = _plugin(
        "metavendor",
        [_backend("oldbk"), _backend("oldchildbk", inherits=("oldbk",)), _backend("newbk"), _backend("kwbk")],
        [
            ("rope", old_rope, "oldbk", old_rope_supports),
            ("kv_cache_write", old_kv_cache_write, "oldbk", None),
            ("rope", new_rope, "newbk", new_rope_supports),
            ("rope", kwargs_rope, "kwbk", None),
        ],
    )
    yield load_registry(extra_plugins=(plugin,))
    hwlayer.reset()


def rope_inputs(dims: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    s = step(torch.Generator().manual_seed(0))
    x = torch.randn(T, 2, 8) if dims == 3 else torch.randn(T, 8)
    return x, s["positions"], s["cos_sin"], meta_of(s, cos_sin=s["cos_sin"])


def test_meta_ops_are_exactly_the_ops_whose_contract_has_meta():
    """A new op gaining ``meta`` without joining META_OPS would break every 1.1 plugin implementing it."""
    with_meta = {name for name, spec in CATALOGUE.items()
                 if not spec.composite and "meta" in inspect.signature(spec.default).parameters}
    assert with_meta == META_OPS


@pytest.mark.parametrize("trace", [False, True], ids=["plain", "traced"])
@pytest.mark.parametrize("backend, label, got_meta", [
    ("oldbk", "native", False), ("oldchildbk", "inherited:oldbk", False), ("newbk", "native", True),
    ("kwbk", "native", True)])
def test_plan_passes_meta_only_to_implementations_that_declare_it(meta_reg, trace, backend, label, got_meta):
    x, positions, cos_sin, m = rope_inputs()
    plan = DispatchPlan(meta_reg.backends[backend], meta_reg, trace=trace)
    out = plan.rope(x, positions, cos_sin, True, meta=m)  # an old signature would raise TypeError here
    assert torch.equal(out, ops.rope(x, positions, cos_sin, True))
    impl = {"oldbk": "old", "oldchildbk": "old", "newbk": "new", "kwbk": "kwargs"}[backend]
    received = [r for r in RECEIVED if r[0] == impl]
    assert len(received) == 1
    assert (received[0][1] is m) if got_meta else received[0][1] is None
    if backend == "newbk":  # a supports() that declares meta sees the same object
        assert [r[0] for r in RECEIVED] == ["new_supports", "new"] and RECEIVED[0][1] is m
    if backend.startswith("old"):
        assert SUPPORTS_ARGS == [4]  # the 1.1 supports() ran, without meta
    assert plan.call_counts() == ({("rope", label): 1} if trace else {})


@pytest.mark.parametrize("trace", [False, True], ids=["plain", "traced"])
def test_old_supports_declining_sends_meta_on_to_the_generic(meta_reg, trace, monkeypatch):
    """The fallback behind a 1.1 ``supports()`` is a 1.2 implementation (the generic): it gets meta."""
    seen = []
    generic_rope = ops.rope

    def spying_rope(*args, **kwargs):
        seen.append(kwargs.get("meta"))
        return generic_rope(*args, **kwargs)

    monkeypatch.setitem(CATALOGUE, "rope", dataclasses.replace(CATALOGUE["rope"], default=spying_rope))
    x, positions, cos_sin, m = rope_inputs(dims=2)
    plan = DispatchPlan(meta_reg.backends["oldbk"], meta_reg, trace=trace)
    out = plan.rope(x, positions, cos_sin, True, meta=m)
    assert torch.equal(out, generic_rope(x, positions, cos_sin, True))
    assert SUPPORTS_ARGS == [4] and not [r for r in RECEIVED if r[0] == "old"]  # declined: "2-D x"
    assert len(seen) == 1 and seen[0] is m
    assert plan.call_counts() == ({("rope", "generic"): 1} if trace else {})


def test_old_kv_cache_write_is_served_without_meta(meta_reg):
    s = step(torch.Generator().manual_seed(0))
    rows = torch.randn(T, 6)
    plan = DispatchPlan(meta_reg.backends["oldbk"], meta_reg, trace=True)
    cache, expected = torch.zeros(4, BLOCK, 6), torch.zeros(4, BLOCK, 6)
    plan.kv_cache_write(cache, rows, s["slots"], meta=meta_of(s, has_padding=False))
    ops.kv_cache_write(expected, rows, s["slots"])
    assert torch.equal(cache, expected)
    assert RECEIVED == [("old_kv", None)]
    assert plan.call_counts() == {("kv_cache_write", "native"): 1}


def test_plan_entry_names_the_plugins_function_not_the_wrapper(meta_reg):
    plan = DispatchPlan(meta_reg.backends["kwbk"], meta_reg)
    assert plan.rope.__wrapped__ is kwargs_rope  # declares **kwargs: no meta wrapper, only the contract check
    old = DispatchPlan(meta_reg.backends["oldbk"], meta_reg)
    assert old.entries["rope"].implementation.endswith("test_ops_meta.old_rope")
    assert old.entries["kv_cache_write"].implementation.endswith("test_ops_meta.old_kv_cache_write")


# ---------------------------------------------------------------------------------------------
# c. Results never depend on meta: the tiny model with and without the per-step tables

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5]]
TABLES = torch.tensor([[4, 5, 6, 7], [0, 1, 2, 3]], dtype=torch.int32)


def _generate(model, decode_steps: int = 3) -> list[torch.Tensor]:
    """Logits of a two-sequence prefill and ``decode_steps`` greedy decode steps, on a fresh cache."""
    cache = model.new_cache(8, 4)
    lens = [len(p) for p in PROMPTS]
    batch = Batch(torch.tensor(sum(PROMPTS, [])), i32(0, lens[0], sum(lens)), i32(*lens), TABLES)
    logits = [model.forward_batch(batch, cache)]
    for _ in range(decode_steps):
        lens = [n + 1 for n in lens]
        batch = Batch(logits[-1].argmax(-1), i32(0, 1, 2), i32(*lens), TABLES)
        logits.append(model.forward_batch(batch, cache))
    return logits


def test_logits_do_not_depend_on_the_tables(tiny, monkeypatch):
    """Bit-identical logits, every step. This fails if an op's meta path computes anything else than
    its own derivation. Checked by hand (mutations applied in-process, not committed), each fails
    from the prefill on (step 0): ``first_query_pos`` + 1 (the indexer masks other keys), ``key_slots``
    rolled by one position, the rope rows rolled by one token, ``kv_cache_write``'s one-copy path
    writing each row into its neighbour's slot; ``seq_idx`` reversed raises in the indexer."""
    model, _ = tiny
    used = []
    plan_rope = model.plan.rope

    def rope_recording_meta(*args, **kwargs):
        used.append(kwargs.get("meta"))
        return plan_rope(*args, **kwargs)

    monkeypatch.setattr(model.plan, "rope", rope_recording_meta)
    with_tables = _generate(model)
    assert used and all(isinstance(m, AttentionMetadata) and m.rope_cos is not None for m in used)
    assert not any(m.has_padding for m in used)  # StepMetadata.to_device knows there is no padding row

    used.clear()
    build_tables = GLM5.with_tables
    # As the runner's captured views say it: slot_mapping may hold -1 rows (kv_cache_write's masked path).
    monkeypatch.setattr(GLM5, "with_tables",
                        lambda self, ctx, cache: build_tables(self, dataclasses.replace(ctx, has_padding=True), cache))
    padded_tables = _generate(model)
    assert used and all(m.has_padding for m in used)

    used.clear()
    monkeypatch.setattr(GLM5, "with_tables", lambda self, ctx, cache: ctx)
    without = _generate(model)
    assert used and all(m is None for m in used)  # the ops derived everything themselves
    assert len(with_tables) == len(padded_tables) == len(without) == 4
    for step_idx, (a, p, b) in enumerate(zip(with_tables, padded_tables, without, strict=True)):
        assert torch.equal(a, b), f"step {step_idx}: logits differ by {(a - b).abs().max().item()}"
        assert torch.equal(p, b), f"step {step_idx} (has_padding): logits differ by {(p - b).abs().max().item()}"


# ---------------------------------------------------------------------------------------------
# d. fused_experts: direct per-assignment path vs the composite vs float64

E, D, INTER = 4, 16, 6


def _moe_inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * INTER, D, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, D, INTER, generator=gen) * 0.3).to(dtype)
    ids = torch.tensor([[0, 2], [1, -1], [3, E], [0, 1], [-1, E + 5]], dtype=torch.int32)  # dropped: -1, >= E
    weights = torch.rand(5, 2, generator=gen)
    return x, w13, w2, weights, ids


def _reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """float64, one assignment at a time; ids outside [0, E) contribute nothing."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if 0 <= e < E:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += weights[t, slot] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def _spied_plan(monkeypatch) -> tuple[DispatchPlan, dict]:
    """An untraced reference plan (so fused_experts may take its direct path) with the composite's
    parts and the direct path wrapped in call counters, installed after the plan was built."""
    reg = load_registry()
    plan = DispatchPlan(reg.backends["cpu"], reg)
    counts = {"direct": 0, "moe_permute": 0, "grouped_gemm": 0, "moe_unpermute": 0}

    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    for part in ("moe_permute", "grouped_gemm", "moe_unpermute"):
        setattr(plan, part, counting(part, getattr(plan, part)))
    monkeypatch.setattr(moe_module, "_experts_per_assignment",
                        counting("direct", moe_module._experts_per_assignment))
    return plan, counts


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_experts_direct_and_composite_paths_agree_with_float64(monkeypatch, dtype, tol):
    args = _moe_inputs(dtype)
    reference = _reference(*args)
    plan, counts = _spied_plan(monkeypatch)

    direct = plan.fused_experts(*args)  # 10 assignments x 12 x 16 elements: far below the budget
    assert counts == {"direct": 1, "moe_permute": 0, "grouped_gemm": 0, "moe_unpermute": 0}

    monkeypatch.setattr(moe_module, "_GATHER_BUDGET", 0)  # every call is "many tokens" now
    monkeypatch.setattr(moe_module, "_GATHER_SMALL", 0)
    composite = plan.fused_experts(*args)
    assert counts == {"direct": 1, "moe_permute": 1, "grouped_gemm": 2, "moe_unpermute": 1}

    for name, out in (("direct", direct), ("composite", composite)):
        assert out.dtype == dtype and out.shape == (5, D)
        torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol, msg=f"{name} vs float64")
    torch.testing.assert_close(direct, composite, rtol=tol, atol=tol)
    assert torch.equal(direct[4], torch.zeros(D, dtype=dtype))  # every assignment of token 4 dropped


def test_traced_reference_plan_takes_the_direct_path_too(monkeypatch):
    """A traced plan wraps its parts in counters; fused_experts looks through them (``__wrapped__``),
    so conformance, which traces, checks the path serving takes: no part is called."""
    args = _moe_inputs(torch.float32)
    direct_calls = []
    real = moe_module._experts_per_assignment
    monkeypatch.setattr(moe_module, "_experts_per_assignment", lambda *a: direct_calls.append(1) or real(*a))
    reg = load_registry()
    traced = DispatchPlan(reg.backends["cpu"], reg, trace=True)
    out = traced.fused_experts(*args)
    assert direct_calls == [1]
    assert traced.call_counts() == {("fused_experts", "generic"): 1}
    torch.testing.assert_close(out.double(), _reference(*args), rtol=1e-5, atol=1e-5)
