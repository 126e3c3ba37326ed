"""The conformance suite catches real porting mistakes, and its report names what served each case.

``tests/plugins/hwlayer-broken`` is a real plugin package (entry points in group ``hwlayer``),
pip-installed into a temporary directory. Its backends get ops wrong on purpose (see the plugin's
docstring): ``pytest conformance/ --backend NAME -k "OP or ..."`` must fail every listed op x dtype
with messages naming the op, pass the ops and dtypes where the bug is harmless, and the reference
backend passes the same selection. Its ``partial`` backend is right but declines wide rows: the
report must attribute those cases to the generic fallback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hwlayer import certificate

pytestmark = pytest.mark.slow  # conformance subprocesses

REPO = Path(__file__).resolve().parent.parent
BROKEN_PLUGIN = REPO / "tests" / "plugins" / "hwlayer-broken"
# backend -> (dtypes run, {(op, dtype): the bug that must fail it}, {(op, dtype) that must pass})
BUGS = {
    "broken": ("fp32", {
        ("sparse_mla_attention", "fp32"): "softmax scale Dk^-0.5 instead of the scale argument",
        ("rope", "fp32"): "NeoX halves instead of interleaved pairs",
        ("lightning_indexer", "fp32"): "causal mask dropped",
        ("moe_route", "fp32"): "weights from the biased choice score",
        ("sample", "fp32"): "top-p off by one: the token whose mass crosses top_p is dropped",
    }, set()),
    "broken-numerics": ("fp32,bf16", {
        ("sparse_mla_attention", "fp32"): "softmax without the max subtraction (logits ~120 overflow)",
        ("sparse_mla_attention", "bf16"): "softmax without the max subtraction (logits ~120 overflow)",
        ("sample", "fp32"): "softmax without the max subtraction (temperature 0.1 on logits ~12)",
        ("sample", "bf16"): "softmax without the max subtraction (temperature 0.1 on logits ~12)",
        ("rms_norm", "bf16"): "mean square accumulated in bf16 (width 6144)",
    }, {("rms_norm", "fp32")}),  # an fp32 accumulator is right: only bf16 shows the bug
    "broken-eps": ("fp32", {
        ("rms_norm", "fp32"): "eps dropped (rows of RMS below sqrt(eps))",
        ("layer_norm", "fp32"): "eps dropped (rows of std below sqrt(eps))",
        ("sample", "fp32"): "top-k/top-p on the untempered distribution (support tokens never drawn)",
    }, set()),
    "broken-topk": ("fp32", {
        ("sample", "fp32"): "top_k ignored on rows that set top_p (tokens outside the support drawn)",
    }, set()),
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLM_BACKEND", "HWLAYER_STRICT", "HWLAYER_PLUGINS", "HWLAYER_TRITON", "HWLAYER_TRACE",
                        "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", None), str(REPO)) if p)
    env.update(extra)
    return env


def pip_install_target(source: Path, target: Path) -> None:
    """A real, offline pip install into ``target`` (the shared venv stays clean); the source is
    copied first so the build leaves nothing in the checkout."""
    copy = target.parent / f"src-{source.name}"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(copy)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"pip install failed: {result.stderr[-2000:]}"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("broken-plugin") / "site"
    pip_install_target(BROKEN_PLUGIN, target)
    return target


def run_conformance(backend: str, selection: str, site: Path, report: Path, dtypes: str = "fp32"
                    ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance/", "--backend", backend,
           "-k", selection, "--dtype", dtypes, "--report", str(report),
           # the multi-process EP and end-to-end model suites test none of these ops
           "--ignore-glob=*/test_ep_*.py", "--ignore-glob=*/test_model_e2e.py"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=clean_env(PYTHONPATH=str(site), HWLAYER_PLUGINS="broken"))


def _ops(backend: str) -> list[str]:
    return sorted({op for op, _ in BUGS[backend][1]})


@pytest.mark.parametrize("backend", list(BUGS))
def test_conformance_rejects_broken_ops(backend, broken_site, tmp_path):
    dtypes, must_fail, must_pass = BUGS[backend]
    ops = _ops(backend)
    result = run_conformance(backend, " or ".join(ops), broken_site, tmp_path / "report.json", dtypes)
    assert result.returncode == 1, f"{backend}: no failure at all:\n{result.stdout[-3000:]}"
    failures = [line for line in result.stdout.splitlines() if line.startswith("E ") and "AssertionError" in line]
    assert failures, result.stdout[-3000:]
    assert all(any(f"AssertionError: {op} [" in line for op in ops) for line in failures), failures
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == backend and not report["passed"]
    records = {(r["op"], r["dtype"]): r for r in report["records"]}
    for (op, dtype), bug in must_fail.items():
        record = records[(op, dtype)]
        assert not record["passed"], f"{backend}: {op} {dtype} ({bug}) was not caught"
        assert record["message"].startswith(f"{op} ["), record["message"]
        assert record["origin"] == "native", record  # the broken implementation served every call
    for key in must_pass:
        assert records[key]["passed"], f"{backend}: {key} failed although the bug is harmless there"


def test_reference_backend_passes_the_same_selection(broken_site, tmp_path):
    ops = sorted({op for backend in BUGS for op in _ops(backend)})
    result = run_conformance("cpu", " or ".join(ops), broken_site, tmp_path / "report.json", "fp32,bf16")
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and {r["op"] for r in report["records"]} == set(ops)


def test_report_says_what_served_each_case(broken_site, tmp_path):
    """Backend ``partial`` plans a native rms_norm that declines widths above 1024: the plan says
    native, the report and the certificate say which cases the generic fallback served."""
    result = run_conformance("partial", "rms_norm", broken_site, tmp_path / "report.json")
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    (record,) = [r for r in report["records"] if r["op"] == "rms_norm"]
    assert record["plan_origin"] == "native+fallback"
    cases = {c["case"]: c for c in report["cases"] if c["op"] == "rms_norm"}
    for wide in ("hidden-6144", "q_lora_rank-2048"):
        assert cases[wide]["calls"] == {"generic": 2} and cases[wide]["origin"] == "generic", cases[wide]
    assert cases["kv_lora_rank-512"]["calls"] == {"native": 2} and cases["plain"]["origin"] == "native"
    native, generic = record["calls"]["native"], record["calls"]["generic"]
    assert generic == 4 and native > generic and record["origin"] == f"native {native} / generic {generic}"
    assert record["implementations"] == {"native": "hwlayer_broken.rms_norm_correct",
                                         "generic": "hwlayer.ops.rms_norm"}
    md = (tmp_path / "report.md").read_text()
    assert f"| native {native} / generic {generic} (plan: native+fallback) |" in md
    cert = certificate.write_certificate(tmp_path / "report.json", tmp_path / "cert")
    assert cert["summary"]["mixed"] == 1 and cert["records"][0]["serving"] == "mixed"
    cert_md = (tmp_path / "cert" / "certificate.md").read_text()
    assert f"native {native} / generic {generic}; plan: native+fallback" in cert_md
