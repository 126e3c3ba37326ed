"""Vendor packages stay unimported until asked for; the Triton tier's opt-in semantics; CUDA helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwlayer
from hwlayer import ops
from hwlayer.backends.cuda import native

ROOT = Path(__file__).resolve().parents[1]

VENDOR_MODULES = [
    "torch_npu", "flash_mla", "deep_gemm", "vllm", "mcoplib", "lightop", "torch_xmlir", "kunlun_ops", "triton",
    "hwlayer.backends.triton.kernels",
]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GLM_", "HWLAYER_", "TRITON_"))}
    full_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


@pytest.mark.slow
def test_importing_hwlayer_and_the_cpu_plan_import_no_vendor_package() -> None:
    code = (
        "import json, sys, torch, hwlayer\n"
        "p = hwlayer.plan('cpu')\n"
        "p.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)\n"
        "hwlayer.registry()\n"
        f"print(json.dumps([m for m in {VENDOR_MODULES!r} if m in sys.modules]))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_probing_every_backend_imports_no_vendor_kernel_library() -> None:
    # `hwlayer info` runs every detection; detection may look for packages but imports none of the
    # kernel libraries (and triton's kernels module only loads when a Triton op runs).
    code = (
        "import json, sys, hwlayer.cli\n"
        "hwlayer.cli._info()\n"
        f"print(json.dumps([m for m in {VENDOR_MODULES!r} if m in sys.modules]))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_hwlayer_triton_opt_in_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cuda entry's plan cannot be built on a CPU machine through select_backend (unavailable),
    # but a DispatchPlan can be resolved for any declared backend to inspect its chain.
    reg = hwlayer.registry()
    cuda, cpu = reg.backends["cuda"], reg.backends["cpu"]

    def origins(backend: hwlayer.Backend) -> dict[str, str]:
        return {e.op: e.origin for e in hwlayer.DispatchPlan(backend, reg).entries.values()}

    monkeypatch.delenv("HWLAYER_TRITON", raising=False)
    assert origins(cuda)["rope"] == "inherited:triton+fallback"  # cuda inherits the tier
    assert origins(cuda)["rms_norm"] == "native+fallback"  # vLLM op first, then Triton, then generic
    assert origins(cpu)["rope"] == "generic"
    monkeypatch.setenv("HWLAYER_TRITON", "0")
    assert origins(cuda)["rope"] == "generic"
    monkeypatch.setenv("HWLAYER_TRITON", "1")
    assert origins(cpu)["rope"] == "inherited:triton+fallback"
    monkeypatch.setenv("HWLAYER_TRITON", "rope, silu_and_mul")
    got = origins(cpu)
    assert got["rope"] == got["silu_and_mul"] == "inherited:triton+fallback"
    assert got["rms_norm"] == "generic"
    monkeypatch.setenv("HWLAYER_TRITON", "rope,not_an_op")
    with pytest.raises(hwlayer.BackendError, match="HWLAYER_TRITON: unknown op 'not_an_op'"):
        hwlayer.plan("cpu")


def test_triton_tier_declines_cpu_tensors_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwlayer.backends.triton import adapters

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    reason = adapters.rms_norm_supports(x, w, 1e-6)
    assert isinstance(reason, str) and "TRITON_INTERPRET=1" in reason
    # With HWLAYER_TRITON=1 the cpu plan routes through that check and still computes generically.
    monkeypatch.setenv("HWLAYER_TRITON", "1")
    p = hwlayer.plan("cpu")
    torch.testing.assert_close(p.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))


def test_flash_mla_global_slots_follow_the_block_table() -> None:
    bs = 4
    block_table = torch.tensor([[7, 2, 5], [1, 0, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    seq_lens = torch.tensor([10, 12], dtype=torch.int32)
    idx = torch.tensor([[0, 5, -1], [9, -1, 3], [11, 4, 0]], dtype=torch.int32)
    slots = native.to_global_slots(idx, block_table, cu, seq_lens, bs)
    assert slots.dtype == torch.int32
    # token 0,1 belong to sequence 0, token 2 to sequence 1; -1 stays -1.
    expected = [[7 * 4 + 0, 2 * 4 + 1, -1], [5 * 4 + 1, -1, 7 * 4 + 3], [3 * 4 + 3, 0 * 4 + 0, 1 * 4 + 0]]
    assert slots.tolist() == expected
    # Gathering the flattened cache at the slots is the same as our position lookup.
    cache = torch.randn(8, bs, 6)
    flat = cache.view(-1, 6)
    seq_idx, _ = ops.token_positions(cu, seq_lens)
    ours = flat[ops.positions_to_slots(block_table, seq_idx, idx, bs)]
    valid = idx >= 0
    torch.testing.assert_close(flat[slots.long().clamp(min=0)][valid], ours[valid])


def test_fp8_row_quantisation_folds_into_the_indexer_weights() -> None:
    # The DeepGEMM adapter's algebra, checked in fp32 arithmetic on CPU: quantising q per (token,
    # head) and folding the scale into the weights preserves the score up to FP8 rounding.
    torch.manual_seed(0)
    q, k, w = torch.randn(5, 4, 128), torch.randn(20, 128), torch.randn(5, 4)
    scale = 128**-0.5
    ref = torch.einsum("th,ths->ts", w, torch.relu(torch.einsum("thd,sd->ths", q, k) * scale))
    q8, q_scale = native._fp8_rows(q)
    k8, k_scale = native._fp8_rows(k)
    logits = torch.einsum("thd,sd->ths", q8.float(), k8.float()) * k_scale[None, None, :]
    folded = torch.einsum("th,ths->ts", w * q_scale * scale, torch.relu(logits))
    assert (folded - ref).abs().max() < 0.1 * ref.abs().max()


def test_native_supports_decline_on_cpu_with_a_reason() -> None:
    q = torch.randn(2, 64, 576, dtype=torch.bfloat16)
    reason = native.flash_mla_sparse_supports(q, torch.randn(2, 4, 576), torch.zeros(2, 8, dtype=torch.int32),
                                              torch.zeros(2, 1, dtype=torch.int32), None, None, 0.1, 512)
    assert reason == "needs CUDA tensors"
    norm, supports = native.make_vllm_rms_norm("vllm._C")
    assert isinstance(supports(torch.randn(2, 8), torch.ones(8), 1e-6), str)
