"""The real-width run: every emulated backend at GLM-5's attention widths (issue 20).

A small checkpoint with GLM-5's attention geometry (:mod:`conformance.real_width`: 64 heads, latent
512 + rope 64, indexer 32 x 128, top-2048; two layers, the second MoE) runs a 300-token prefill and
greedy decode steps on the cpu backend and on each vendor backend over the CPU emulators of its
libraries (``conformance/emulators``, one emulation at a time, undone after each test). For each:

(a) the logits of every step agree with the cpu backend's (cosine > 0.995, bf16; the backend is fed
    the cpu run's greedy tokens, so both score the same sequence);
(b) the native DSA / MoE adapters are the ones that served (traced call counts: every call of those
    ops reached the vendor adapter, none fell back), so (a) is not the generic op compared with itself;
(c) a steady-state decode forward runs under ``FakeTensorMode`` with no host read: the emulated
    vendor kernels are opaque custom ops with fake kernels, so only hwlayer's and the adapters' own
    code runs, and any ``.item()`` / ``int(t)`` / data-sized output there raises (tests/test_sync_free.py).

The FP8 indexer adapters (DeepGEMM on NVIDIA, mate) and Kunlunxin's int8 one are switched on here:
with top-2048 and contexts under 2048 positions the indexer returns every causal position whatever the
scoring precision, so FP8 / int8 scoring cannot change the result, and the adapters still run at their real shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from conformance import emulators
from conformance.real_width import make_real_width_checkpoint
from model import Batch, load_model

pytestmark = pytest.mark.slow

HOST_READS = (DataDependentOutputException, DynamicOutputShapeException)
PROMPT, DECODE_STEPS, BLOCK_SIZE, NUM_BLOCKS = 300, 3, 64, 8
MIN_COSINE = 0.995

# DSA and MoE ops whose every call must reach the vendor adapter at these widths.
NATIVE = {
    "ascend": ("lightning_indexer", "sparse_mla_attention", "moe_route", "grouped_gemm", "moe_permute",
               "moe_unpermute"),
    "cuda": ("sparse_mla_attention", "lightning_indexer"),
    "metax": ("sparse_mla_attention", "lightning_indexer"),
    "hygon": ("sparse_mla_attention", "lightning_indexer", "moe_route"),
    "cambricon": ("moe_route", "grouped_gemm"),
    "musa": ("sparse_mla_attention", "lightning_indexer", "moe_route", "grouped_gemm"),
    "kunlunxin": ("sparse_mla_attention", "lightning_indexer", "moe_route", "grouped_gemm"),
    "iluvatar": ("lightning_indexer", "moe_route", "grouped_gemm"),  # no public V3.2 / GLM-5 ixformer sparse MLA
}
# Ops the adapter must serve at least once (a strided activation may still decline, e.g. tmo's
# fused_rms_norm on the kv latent slice of a prefill).
ALSO_NATIVE = {
    "ascend": ("rms_norm", "rope"),
    "cuda": ("rms_norm",),
    "metax": ("rms_norm",),
    "hygon": ("rms_norm",),
    "cambricon": ("rms_norm", "rope"),
    "musa": (),
    "kunlunxin": ("rms_norm", "rope", "kv_cache_write"),
    "iluvatar": (),
}
FP8_INDEXER_OPT_IN = {"HWLAYER_FP8_INDEXER": "1", "HWLAYER_MUSA_FP8_INDEXER": "1", "HWLAYER_KUNLUN_INT8_INDEXER": "1"}

def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_real_width_checkpoint(tmp_path_factory.mktemp("real-width"))


@pytest.fixture(autouse=True)
def serving_env(monkeypatch):
    monkeypatch.setenv("HWLAYER_CHECK", "0")  # as serving: value checks read the device
    monkeypatch.setenv("HWLAYER_TRACE", "1")  # traced plans: call counts per op and tier
    for key, value in FP8_INDEXER_OPT_IN.items():
        monkeypatch.setenv(key, value)


def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (PROMPT,), generator=torch.Generator().manual_seed(0))


def run_steps(model, tokens: list[int] | None) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill the prompt, then ``DECODE_STEPS`` decode steps feeding ``tokens`` (greedy when None).
    Returns the fp32 logits of every step and the tokens fed."""
    cache = model.new_cache(NUM_BLOCKS, BLOCK_SIZE)
    table = torch.arange(NUM_BLOCKS, dtype=torch.int32).view(1, NUM_BLOCKS)
    logits = [model.forward_batch(Batch(prompt(), i32(0, PROMPT), i32(PROMPT), table), cache)[0]]
    fed = []
    for step in range(DECODE_STEPS):
        token = int(logits[-1].argmax()) if tokens is None else tokens[step]
        fed.append(token)
        batch = Batch(torch.tensor([token]), i32(0, 1), i32(PROMPT + step + 1), table)
        logits.append(model.forward_batch(batch, cache)[0])
    return logits, fed


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The cpu backend's logits per step and its greedy tokens."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWLAYER_CHECK", "0")
        return run_steps(load_model(checkpoint, backend="cpu", dtype="bf16"), None)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.mark.parametrize("backend", emulators.BACKENDS)
def test_real_width_logits_agree_and_native_adapters_serve(backend, checkpoint, reference):
    want, tokens = reference
    with emulators.emulation(backend):
        model = load_model(checkpoint, backend=backend, dtype="bf16")
        got, _ = run_steps(model, tokens)
        counts = model.plan.call_counts()
    cosines = [cosine(g, w) for g, w in zip(got, want, strict=True)]
    assert all(math.isfinite(c) and c > MIN_COSINE for c in cosines), f"{backend}: per-step cosine {cosines}"
    for op in NATIVE[backend]:
        native = counts.get((op, "native"), 0)
        other = {tier: n for (o, tier), n in counts.items() if o == op and tier != "native"}
        assert native > 0 and not other, f"{backend}: {op} served natively {native}x, elsewhere {other}"
    for op in ALSO_NATIVE[backend]:
        assert counts.get((op, "native"), 0) > 0, f"{backend}: {op} never served natively: {counts}"


def _decode_reads_nothing(backend: str, checkpoint) -> None:
    with emulators.emulation(backend):
        model = load_model(checkpoint, backend=backend, dtype="bf16")
        cache = model.new_cache(NUM_BLOCKS, BLOCK_SIZE)
        table = torch.arange(NUM_BLOCKS, dtype=torch.int32).view(1, NUM_BLOCKS)
        model.forward_batch(Batch(prompt()[:40], i32(0, 40), i32(40), table), cache)  # a real prefill
        model.forward_batch(Batch(torch.tensor([7]), i32(0, 1), i32(41), table), cache)  # a real decode step
        # The next decode step: host metadata built with real data (the runner does it once per step),
        # then the forward on fake tensors.
        ctx = model.context(Batch(torch.tensor([9]), i32(0, 1), i32(42), table), cache)
        with FakeTensorMode(allow_non_fake_inputs=True):
            logits = model.forward_context(ctx, cache)
        assert logits.shape == (1, model.config.vocab_size)
        counts = model.plan.call_counts()
    # the fake step ran the native adapters (a declined call would prove nothing about them)
    assert all(counts.get((op, "native"), 0) for op in NATIVE[backend] + ALSO_NATIVE[backend]), counts


@pytest.mark.parametrize("backend", emulators.BACKENDS)
def test_real_width_decode_step_reads_nothing_on_the_host(backend, checkpoint):
    _decode_reads_nothing(backend, checkpoint)


def test_a_host_read_in_a_native_adapter_fails_the_fake_decode(checkpoint, monkeypatch):
    """The check can fail: FlashMLA's adapter with the old ``bool(empty.any())`` branch is caught."""
    from hwlayer.backends.cuda import native

    adapter = native.flash_mla_sparse_attention

    def with_branch(q, kv_cache, indices, *args, **kwargs):
        if bool((indices < 0).all(dim=1).any()):  # the host read the adapter used to make
            pass
        return adapter(q, kv_cache, indices, *args, **kwargs)

    monkeypatch.setattr(native, "flash_mla_sparse_attention", with_branch)
    with pytest.raises(HOST_READS):
        _decode_reads_nothing("cuda", checkpoint)
