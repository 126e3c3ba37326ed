"""Certificate rendering and report diffs, from a hand-written conformance report (data, not a mock),
plus the `hwlayer conformance` command's error paths."""

from __future__ import annotations

import json
import re

import pytest

from hwlayer import certificate as cert_mod
from hwlayer.cli import main


def _report(**overrides) -> dict:
    records = [
        {"op": "rms_norm", "dtype": "fp32", "passed": True, "max_abs_err": 1e-7, "max_rel_err": 2e-7,
         "atol": 1e-5, "rtol": 1.3e-6, "error_ratio": 0.1, "origin": "native+fallback",
         "tolerance_override": None, "timing": {"backend_ms": 0.5, "generic_ms": 1.0}},
        {"op": "rms_norm", "dtype": "bf16", "passed": True, "max_abs_err": 0.03, "max_rel_err": 0.01,
         "atol": 1e-5, "rtol": 1.6e-2, "error_ratio": 0.95, "origin": "native",
         "tolerance_override": {"reason": "bf16 output rounding of a 7168-wide reduction"},
         "timing": {"backend_ms": 0.2, "generic_ms": 0.4}},
        {"op": "grouped_gemm", "dtype": "bf16", "passed": False, "max_abs_err": 0.9, "max_rel_err": 0.5,
         "atol": 1e-2, "rtol": 1.6e-2, "error_ratio": 3.2, "origin": "generic", "tolerance_override": None},
        # a second record of the same op x dtype (other report producers): merged into the worst one
        {"op": "grouped_gemm", "dtype": "bf16", "passed": True, "max_abs_err": 0.001, "max_rel_err": 0.001,
         "atol": 1e-2, "rtol": 1.6e-2, "error_ratio": 0.05, "origin": "generic", "tolerance_override": None},
        {"op": "lightning_indexer", "dtype": "fp32", "cases": 3, "passed": True, "max_abs_err": 0.0,
         "max_rel_err": 0.0, "atol": 1e-5, "rtol": 1.3e-6, "error_ratio": 0.0, "origin": "native",
         "calls": {"native": 6, "generic": 0}, "recall": 0.998, "recall_min": 0.99, "tolerance_override": None},
        # the plan promised a native adapter, the traced calls show the Triton tier and the generic
        # fallback served: the record says so (as the suite writes it, origin from the calls)
        {"op": "sparse_mla_attention", "dtype": "bf16", "cases": 4, "passed": True, "max_abs_err": 0.002,
         "max_rel_err": 0.003, "atol": 1e-2, "rtol": 4e-3, "error_ratio": 0.3, "origin": "triton 12 / generic 3",
         "plan_origin": "native+fallback", "calls": {"inherited:triton": 12, "generic": 3},
         "implementations": {"inherited:triton": "hwlayer.backends.triton.adapters.sparse_mla_attention",
                             "generic": "hwlayer.ops.sparse_mla_attention"}, "tolerance_override": None},
        # exact-output op that mismatched: the suite writes the infinite ratio as the string "inf"
        {"op": "kv_cache_write", "dtype": "fp32", "cases": 2, "passed": False, "failed_cases": ["skip_padding"],
         "max_abs_err": "inf", "max_rel_err": "inf", "atol": 0.0, "rtol": 0.0, "error_ratio": "inf",
         "origin": "native", "message": "slot 3 not written", "tolerance_override": None},
    ]
    report = {"schema": "hwlayer-conformance-report/1", "backend": "acme", "torch": "2.13.0", "records": records,
              "model": {"logits_max_abs_err": 0.012, "top1_agreement": 0.998, "kl_divergence": 1.5e-5}}
    report.update(overrides)
    return report


def test_certificate_summary_and_records():
    cert = cert_mod.build_certificate(_report(), {"hwlayer": "0.1.0", "hookspec_version": "1.0"})
    s = cert["summary"]
    assert cert["backend"] == "acme" and cert["environment"]["torch"] == "2.13.0"
    assert s["passed"] is False and s["failed"] == ["grouped_gemm/bf16", "kv_cache_write/fp32"]
    assert s["records"] == 6 and s["native"] == 4 and s["mixed"] == 1 and s["fallback"] == 1
    assert s["overrides"] == 1
    assert s["max_error_ratio"] == float("inf")
    rec = {(r["op"], r["dtype"]): r for r in cert["records"]}
    assert rec[("grouped_gemm", "bf16")]["cases"] == 2 and rec[("grouped_gemm", "bf16")]["passed"] is False
    assert rec[("rms_norm", "bf16")]["tolerance_override"] == "bf16 output rounding of a 7168-wide reduction"
    assert rec[("rms_norm", "fp32")]["speedup"] == pytest.approx(2.0)
    assert cert["model"]["top1_agreement"] == 0.998
    assert rec[("lightning_indexer", "fp32")]["recall_min"] == 0.99
    assert rec[("lightning_indexer", "fp32")]["calls"] == {"native": 6, "generic": 0}
    assert rec[("kv_cache_write", "fp32")]["failed_cases"] == ["skip_padding"]
    mla = rec[("sparse_mla_attention", "bf16")]
    assert mla["serving"] == "mixed" and not mla["native"] and mla["origin"] == "triton 12 / generic 3"
    assert mla["plan_origin"] == "native+fallback" and "triton" in mla["implementations"]["inherited:triton"]


def test_served_origin_comes_from_the_calls():
    assert cert_mod.served_origin({"inherited:triton": 12, "generic": 3}) == "triton 12 / generic 3"
    assert cert_mod.served_origin({"generic": 3, "native": 3}) == "native 3 / generic 3"  # ties: native first
    assert cert_mod.served_origin({"native": 5, "generic": 0}) == "native"
    assert cert_mod.served_origin({"inherited:triton": 7}) == "triton"
    assert cert_mod.served_origin({}) == "not called"
    # a record whose origin string claims native but whose calls all reached the fallback
    r = cert_mod.normalise_record({"op": "rms_norm", "dtype": "fp32", "passed": True, "origin": "native",
                                   "calls": {"native": 0, "generic": 4}})
    assert r["serving"] == "fallback" and not r["native"]
    # several records of one op x dtype: the merged record's origin counts all of their calls
    merged = cert_mod.build_certificate({"backend": "x", "records": [
        {"op": "rope", "dtype": "fp32", "passed": True, "origin": "native", "calls": {"native": 2}},
        {"op": "rope", "dtype": "fp32", "passed": True, "origin": "generic", "calls": {"generic": 1}},
    ]})["records"][0]
    assert merged["origin"] == "native 2 / generic 1" and merged["serving"] == "mixed"


def test_all_passing_report_passes():
    report = _report(records=[r for r in _report()["records"] if r["passed"] is True])
    assert cert_mod.build_certificate(report)["summary"]["passed"] is True


def test_written_files_are_self_contained(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    cert_mod.write_certificate(tmp_path / "report.json", tmp_path / "out", {"hwlayer": "0.1.0"})
    html = (tmp_path / "out" / "certificate.html").read_text()
    md = (tmp_path / "out" / "certificate.md").read_text()
    saved = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert saved["schema"] == cert_mod.CERTIFICATE_SCHEMA and saved["backend"] == "acme"
    assert saved["summary"]["max_error_ratio"] == "inf"  # strict JSON: no Infinity literal
    json.loads((tmp_path / "out" / "certificate.json").read_text(), parse_constant=lambda c: 1 / 0)
    # no scripts, no external resources
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?http", html)
    # heat map: one row per op, one column per dtype, colours from the ratio
    heat = html.split("<table class='heat'>")[1].split("</table>")[0]
    assert heat.count("<tr>") == 6  # header + 5 ops
    assert "(partly generic)" in heat
    assert cert_mod.ratio_colour(0.95, True) in heat and cert_mod.ratio_colour(0.1, True) in heat
    assert "#8b0000" in heat  # the failure
    assert "bf16 output rounding of a 7168-wide reduction" in html
    assert "top1_agreement" in html and "kl_divergence" in md
    assert "**Result: FAILED (2: grouped_gemm/bf16, kv_cache_write/fp32)**" in md
    assert "| rms_norm | fp32 | pass | 1 |" in md and "(2.00x)" in md
    assert "0.998 (min 0.990)" in md and "| native (6 calls) |" in md
    assert "| triton 12 / generic 3; plan: native+fallback |" in md
    assert "- `kv_cache_write` fp32: slot 3 not written (cases: skip_padding)" in md
    assert "slot 3 not written" in html


def test_ratio_colour_runs_green_to_red():
    hues = [int(re.match(r"hsl\((\d+)", cert_mod.ratio_colour(r, True)).group(1)) for r in (0, 0.5, 0.9, 1.0, 7.0)]
    assert hues == sorted(hues, reverse=True) and hues[0] == 120 and hues[-1] == 0
    assert cert_mod.ratio_colour(0.1, False) == "#8b0000"


def test_diff_reports_flips_and_ratio_changes(tmp_path, capsys):
    before = _report()
    after = _report(records=[
        {**before["records"][0], "error_ratio": 0.3},
        before["records"][1],
        {**before["records"][2], "passed": True, "error_ratio": 0.4, "origin": "native"},
        {"op": "rope", "dtype": "fp32", "passed": True, "error_ratio": 0.01, "origin": "native"},
    ])
    rows = {(r["op"], r["dtype"]): r for r in cert_mod.diff_reports(before, after)}
    assert rows[("grouped_gemm", "bf16")]["change"] == "now passes"
    assert rows[("rms_norm", "fp32")]["ratio_delta"] == pytest.approx(0.2)
    assert rows[("rms_norm", "bf16")]["change"] == "same"
    assert rows[("rope", "fp32")]["change"] == "added"

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(after))
    assert main(["conformance", "diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "now passes" in out and "(path generic -> native)" in out and "+0.200" in out
    # a certificate diffs like a report
    cert_mod.write_certificate(a, tmp_path / "ca")
    assert main(["conformance", "diff", str(tmp_path / "ca" / "certificate.json"), str(b)]) == 0


@pytest.mark.parametrize(
    "content, expected",
    [(None, "no such file"), ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
     ('{"backend": "x"}', "no per-op records")],
)
def test_diff_bad_input_is_one_line_exit_2(tmp_path, capsys, content, expected):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report()))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["conformance", "diff", str(good), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and err.startswith("hwlayer: error:")


def test_conformance_command_errors(tmp_path, capsys, monkeypatch):
    assert main(["conformance", "--backend", "no_such_backend"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown backend 'no_such_backend'" in err
    assert main(["conformance"]) == 2
    assert "needs --backend" in capsys.readouterr().err
    monkeypatch.setenv("HWLAYER_CONFORMANCE_DIR", str(tmp_path))  # a folder without the suite
    assert main(["conformance", "--backend", "cpu", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "conformance suite not found" in err


def test_one_report_schema_shared_with_the_conformance_report():
    """conformance/report.py writes records through ``report_record`` (exactly REPORT_RECORD_FIELDS) and
    the certificate reads those fields only: aliases no producer writes are not read any more."""
    from conformance.report import SCHEMA, Recorder

    assert SCHEMA == cert_mod.REPORT_SCHEMA
    rec = Recorder("acme", "cpu", ["fp32"], "conformance/tolerances.yaml")
    case = rec.case("rms_norm", "fp32", "small", "n::id")
    case.merge(passed=True, max_abs=1e-7, max_rel=1e-7, atol=1e-5, rtol=1e-6, ratio=0.01, message=None)
    written = rec.to_dict(0)
    assert written["schema"] == SCHEMA and tuple(written["records"][0]) == cert_mod.REPORT_RECORD_FIELDS
    assert cert_mod.build_certificate(written)["records"][0]["max_abs_err"] == 1e-7
    with pytest.raises(ValueError, match="unknown \\['time_ms'\\]"):
        cert_mod.report_record(**dict(written["records"][0]), time_ms=1.0)
    aliased = {"op": "rms_norm", "dtype": "fp32", "passed": True, "max_abs_error": 0.5, "ratio": 2.0,
               "time_ms": 3.0, "generic_time_ms": 6.0, "error": "old field"}
    got = cert_mod.normalise_record(aliased)
    assert (got["max_abs_err"], got["error_ratio"], got["backend_ms"], got["speedup"], got["message"]) == \
        (None, None, None, None, None)
    with pytest.raises(cert_mod.CertificateError, match="'records' list"):
        cert_mod.normalise_records({"results": [aliased]})
