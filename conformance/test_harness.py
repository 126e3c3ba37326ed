"""Self-tests of the conformance harness: tolerance file schema, error figures, report files.

They check the suite, not the backend, so they run once, with the reference backend (``--backend
cpu``), and are skipped for every other backend instead of counting as its passes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from .checks import ToleranceFileError, error_figures, load_tolerances, skip_unless_reference, tolerance_for
from .report import SCHEMA, Recorder


@pytest.fixture(autouse=True)
def _suite_self_test(backend_name: str) -> None:
    skip_unless_reference(backend_name)


def test_tolerance_file_is_valid_and_overrides_need_a_reason(tmp_path):
    data = load_tolerances()
    assert tolerance_for(data, "cpu", "grouped_gemm", "bf16").atol_at(100) > tolerance_for(
        data, "cpu", "grouped_gemm", "bf16").atol_at(1)  # scales with the reduction length
    bad = tmp_path / "tol.yaml"
    bad.write_text("defaults: {fp32: {atol: 1.0e-5, rtol: 1.0e-5}}\n"
                   "backends: {acme: {rms_norm: {fp32: {atol: 1.0e-3}}}}\n")
    with pytest.raises(ToleranceFileError, match="backends.acme.rms_norm.fp32: a backend override needs"):
        load_tolerances(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("defaults: {fp32: {atol: 1.0e-5, rtol: 1.0e-5}}\n"
                    "backends: {acme: {rms_norm: {fp32: {atol: 1.0e-3, reason: 'fp32 via tf32 units'}}}}\n")
    tol = tolerance_for(load_tolerances(good), "acme", "rms_norm", "fp32")
    assert tol.atol == 1e-3 and tol.rtol == 1e-5 and tol.override()["reason"] == "fp32 via tf32 units"
    assert tolerance_for(load_tolerances(good), "cpu", "rms_norm", "fp32").override() is None
    # the interpreter section applies only under TRITON_INTERPRET=1, with its reason
    plain, interp = (tolerance_for(data, "triton", "rms_norm", "bf16", interpreter=i) for i in (False, True))
    assert interp.rtol > plain.rtol and "truncates" in interp.override()["reason"] and plain.override() is None
    bad.write_text("defaults: {bf16: {atol: 1.0e-5, rtol: 1.0e-5}}\ninterpreter: {rope: {bf16: {rtol: 1.0e-2}}}\n")
    with pytest.raises(ToleranceFileError, match="interpreter.rope.bf16: an interpreter override needs"):
        load_tolerances(bad)


def test_error_figures_ratio_and_infinities():
    golden = torch.tensor([1.0, -2.0, 0.0, -math.inf], dtype=torch.float64)
    fig = error_figures(torch.tensor([1.1, -2.0, 0.0, -math.inf]), golden, atol=0.1, rtol=0.0)
    assert fig.max_abs == pytest.approx(0.1, rel=1e-5) and fig.ratio == pytest.approx(1.0, rel=1e-5)
    assert error_figures(torch.tensor([1.0, -2.0, 0.0, 0.0]), golden, 0.1, 0.0).ratio == math.inf
    assert error_figures(torch.tensor([1.0, -2.0, math.nan, -math.inf]), golden, 0.1, 0.0).ratio == math.inf


def test_report_round_trip(tmp_path):
    rec = Recorder("cpu", "cpu", ["fp32"], "tolerances.yaml")
    rec.plan = {"rms_norm": {"origin": "native+fallback", "implementation": "x.y", "plugin": "p", "reason": ""}}
    ok = rec.case("rms_norm", "fp32", "plain", "node1")
    ok.merge(passed=True, max_abs=1e-7, max_rel=1e-7, atol=1e-5, rtol=1e-5, ratio=0.01, message=None)
    ok.calls = {"native": 3}
    bad = rec.case("rms_norm", "fp32", "wide", "node2")
    bad.calls = {"native": 1, "generic": 2}  # the native adapter declined two of this case's calls
    bad.merge(passed=False, max_abs=math.inf, max_rel=math.inf, atol=None, rtol=None, ratio=math.inf,
              message="rms_norm [wide] fp32: raised RuntimeError: boom")
    rec.add_extra("model", {"perplexity": 1.0})
    json_path, md_path = rec.write(tmp_path / "r.json", exit_status=1)
    data = json.loads(json_path.read_text())
    assert data["schema"] == SCHEMA and data["backend"] == "cpu" and data["torch"] == torch.__version__
    (record,) = data["records"]
    assert record["cases"] == 2 and not record["passed"] and record["failed_cases"] == ["wide"]
    assert record["error_ratio"] == "inf" and record["plan_origin"] == "native+fallback"
    # origin comes from the traced calls, not from the plan: mixed tiers with their counts
    assert record["origin"] == "native 4 / generic 2" and record["calls"] == {"native": 4, "generic": 2}
    assert [c["origin"] for c in data["cases"]] == ["native", "generic 2 / native 1"]
    assert record["message"].startswith("rms_norm [wide] fp32")
    assert data["model"] == {"perplexity": 1.0} and not data["passed"]
    md = md_path.read_text()
    assert "| rms_norm | fp32 | **FAIL** | 2 |" in md and "| native 4 / generic 2 (plan: native+fallback) |" in md
    with pytest.raises(ValueError, match="reserved"):
        rec.add_extra("records", [])
