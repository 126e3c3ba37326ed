"""The Triton tier's quantized kernels (``hwlayer/backends/triton/quant_kernels.py``) in Triton's CPU
interpreter, in a process of their own (TRITON_INTERPRET must be set before triton is imported):
ops against the generic implementations, and the tiny FP8 / INT8 models with ``HWLAYER_TRITON``
routing only the quantized ops to the Triton tier. Traced call counts prove the kernels served."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # Triton's interpreter

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, tempfile
import torch
import hwlayer
from hwlayer.ops import quant as Q
from hwlayer.ops.quant import quantize_weight
from model import load_model
from model.generate import score
from model.tiny import QUANT_TINY_OVERRIDES, make_tiny_checkpoint

out = {}
plan = hwlayer.plan("triton", trace=True)
g = torch.Generator().manual_seed(0)
for fmt in ("fp8_block", "int8"):
    x = torch.randn(7, 200, generator=g) * 3
    qw = quantize_weight(torch.randn(150, 200, generator=g) * 0.05, fmt)
    got, want = plan.quant_linear(x, qw), Q.quant_linear(x, qw)
    stack = quantize_weight(torch.randn(3, 96, 200, generator=g) * 0.05, fmt)
    sizes = torch.tensor([4, 0, 3])
    ggot, gwant = plan.quant_grouped_gemm(x, stack, sizes), Q.quant_grouped_gemm(x, stack, sizes)
    out[fmt] = {"linear_err": float((got - want).abs().max()), "grouped_err": float((ggot - gwant).abs().max())}
out["op_counts"] = {f"{op}/{tier}": n for (op, tier), n in plan.call_counts().items()}
other = hwlayer.plan("triton", trace=True)  # formats without a Triton kernel here: the generic op serves
before = dict(other.call_counts())
g2 = torch.Generator().manual_seed(1)  # its own stream: the model prompts below stay as they were
x = torch.randn(3, 128, generator=g2)
other.quant_linear(x, Q.quantize_weight_static(torch.randn(64, 128, generator=g2), *Q.static_activation_params(-3, 3)))
other.quant_grouped_gemm(x, quantize_weight(torch.randn(2, 64, 128, generator=g2), "w4a8"), torch.tensor([1, 2]))
out["declined"] = {f"{op}/{tier}": n - before.get((op, tier), 0) for (op, tier), n in other.call_counts().items()
                   if n != before.get((op, tier), 0)}

root = tempfile.mkdtemp()
ids = torch.randint(20, 500, (1, 12), generator=g)
for fmt in ("fp8_block", "int8"):
    ck = make_tiny_checkpoint(f"{root}/{fmt}", QUANT_TINY_OVERRIDES, weight_format=fmt)
    os.environ["HWLAYER_TRITON"] = "0"
    ref = load_model(ck, backend="cpu")
    os.environ["HWLAYER_TRITON"] = "quant_linear,quant_grouped_gemm"  # only the quant ops to the Triton tier
    m = load_model(ck, backend="cpu")
    out[fmt]["model_err"] = float((score(m, ids) - score(ref, ids)).abs().max())
    out[fmt]["model_counts"] = {f"{o}/{t}": n for (o, t), n in m.plan.call_counts().items()}
    out[fmt]["ref_counts"] = {f"{o}/{t}": n for (o, t), n in ref.plan.call_counts().items()}
print(json.dumps(out))
"""


def test_quant_kernels_in_interpreter():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLM_", "HWLAYER_"))}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(REPO), HWLAYER_TRACE="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    counts = res["op_counts"]
    # Served by the Triton kernels, not a generic fallback compared with itself.
    assert counts.get("quant_linear/native", 0) == 2 and "quant_linear/generic" not in counts, counts
    assert counts.get("quant_grouped_gemm/native", 0) == 2 and "quant_grouped_gemm/generic" not in counts, counts
    assert res["declined"] == {"quant_linear/generic": 1, "quant_grouped_gemm/generic": 1}, res["declined"]
    for fmt in ("fp8_block", "int8"):
        # Same contract, same quantized values: only the fp32 accumulation order differs.
        assert res[fmt]["linear_err"] < 1e-4 and res[fmt]["grouped_err"] < 1e-4, res
        # The tiny quantized model, its quant ops on the Triton tier, against the generic ops.
        mc, rc = res[fmt]["model_counts"], res[fmt]["ref_counts"]
        assert mc.get("quant_linear/inherited:triton", 0) > 0 and "quant_linear/generic" not in mc, mc
        assert mc.get("quant_grouped_gemm/inherited:triton", 0) > 0, mc
        assert "quant_linear/inherited:triton" not in rc and rc.get("quant_linear/generic", 0) > 0, rc
        assert res[fmt]["model_err"] < 1e-3, res
