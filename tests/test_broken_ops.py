"""The conformance suite catches real porting mistakes.

``tests/plugins/hwlayer-broken`` is a real plugin package (entry point ``broken`` in group
``hwlayer``), pip-installed into a temporary directory. Its backend ``broken`` gets four classic
bugs wrong on purpose; for each, ``pytest conformance/ --backend broken -k OP`` must fail with a
message naming the op, while the reference backend passes the same selection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # conformance subprocesses

REPO = Path(__file__).resolve().parent.parent
BROKEN_PLUGIN = REPO / "tests" / "plugins" / "hwlayer-broken"
BUGS = {
    "sparse_mla_attention": "softmax scale Dk^-0.5 instead of the scale argument",
    "rope": "NeoX halves instead of interleaved pairs",
    "lightning_indexer": "causal mask dropped",
    "moe_route": "weights from the biased choice score",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLM_BACKEND", "HWLAYER_STRICT", "HWLAYER_PLUGINS", "HWLAYER_TRITON", "HWLAYER_TRACE")}
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


def run_conformance(backend: str, selection: str, site: Path, report: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance/", "--backend", backend,
           "-k", selection, "--dtype", "fp32", "--report", str(report),
           # the multi-process EP and end-to-end model suites test none of these ops
           "--ignore-glob=*/test_ep_*.py", "--ignore-glob=*/test_model_e2e.py"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=clean_env(PYTHONPATH=str(site), HWLAYER_PLUGINS="broken"))


@pytest.mark.parametrize("op", list(BUGS))
def test_conformance_rejects_broken_op(op, broken_site, tmp_path):
    result = run_conformance("broken", op, broken_site, tmp_path / "report.json")
    assert result.returncode == 1, f"{op} ({BUGS[op]}) was not caught:\n{result.stdout[-3000:]}"
    failures = [line for line in result.stdout.splitlines() if line.startswith("E ") and "AssertionError" in line]
    assert failures, result.stdout[-3000:]
    assert all(f"AssertionError: {op} [" in line for line in failures), failures
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == "broken" and not report["passed"]
    record = next(r for r in report["records"] if r["op"] == op)
    assert not record["passed"] and record["origin"] == "native" and record["message"].startswith(op)


def test_reference_backend_passes_the_same_selection(broken_site, tmp_path):
    result = run_conformance("cpu", " or ".join(BUGS), broken_site, tmp_path / "report.json")
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and {r["op"] for r in report["records"]} == set(BUGS)
