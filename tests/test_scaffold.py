"""`hwlayer new-backend`: the generated package installs with pip, registers through its entry point,
and passes the conformance suite on CPU unchanged; bad names and existing targets are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwlayer.cli import main
from hwlayer.hookspecs import HOOKSPEC_VERSION
from hwlayer.scaffold import ScaffoldError, check_name, new_backend

REPO = Path(__file__).resolve().parent.parent
# One dtype and the op the scaffold overrides keep this test near 10 s; the whole suite on the
# scaffold (all ops, fp32) passes too but takes ~50 s on 2 cores, most of it the EP collectives.
CONFORMANCE_ARGS = ["--dtype", "fp32", "--", "-k", "rms_norm"]


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    for var in ("HWLAYER_PLUGINS", "HWLAYER_STRICT", "GLM_BACKEND", "HWLAYER_CONFORMANCE_DIR"):
        env.pop(var, None)
    return env


@pytest.mark.slow
def test_generated_package_installs_and_passes_conformance(tmp_path):
    hwlayer = [sys.executable, "-W", "ignore", "-m", "hwlayer"]
    made = subprocess.run([*hwlayer, "new-backend", "acme", "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path / "site"))
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / "hwlayer-acme"
    plugin_src = (pkg / "hwlayer_acme" / "plugin.py").read_text()
    assert f'HWLAYER_HOOKSPEC_VERSION = "{HOOKSPEC_VERSION}"' in plugin_src
    assert 'acme = "hwlayer_acme.plugin"' in (pkg / "pyproject.toml").read_text()
    assert "hwlayer conformance --backend acme" in (pkg / "README.md").read_text()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(pkg)], check=True, capture_output=True, text=True, timeout=120)
    env = _env(site)

    info = subprocess.run([*hwlayer, "info", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    acme = next(b for b in data["backends"] if b["name"] == "acme")
    assert acme["available"] is True and acme["device_type"] == "cpu" and "CPU device" in acme["reason"]
    assert data["chosen_backend"] == "cpu"  # the scaffold never takes over auto-detection

    ops = subprocess.run([*hwlayer, "ops", "--backend", "acme", "--json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    entries = {e["op"]: e for e in json.loads(ops.stdout)["ops"]}
    assert entries["rms_norm"]["origin"] == "native+fallback"
    assert entries["rms_norm"]["implementation"] == "hwlayer_acme.ops.rms_norm"

    report = tmp_path / "report"
    run = subprocess.run([*hwlayer, "conformance", "--backend", "acme", "--out", str(report), *CONFORMANCE_ARGS],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("report.json", "certificate.json", "certificate.md", "certificate.html"):
        assert (report / name).is_file(), name
    cert = json.loads((report / "certificate.json").read_text())
    assert cert["backend"] == "acme" and cert["summary"]["passed"] is True
    assert cert["environment"]["plugin_distribution"] == "hwlayer-acme"
    assert "hwlayer-acme" in cert["environment"]["packages"]
    rms = [r for r in cert["records"] if r["op"] == "rms_norm"]
    assert rms and all(r["native"] and r["passed"] for r in rms)

    # The same run on a broken kernel (installed copy edited: weight applied twice) must fail.
    installed = site / "hwlayer_acme" / "ops.py"
    installed.write_text(installed.read_text().replace("weight.float(), eps)", "weight.float() ** 2, eps)"))
    broken = subprocess.run([*hwlayer, "conformance", "--backend", "acme", "--out", str(tmp_path / "broken"),
                             *CONFORMANCE_ARGS], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    assert "conformance FAILED for acme: rms_norm/fp32" in broken.stderr
    failed = json.loads((tmp_path / "broken" / "certificate.json").read_text())
    assert failed["summary"]["failed"] == ["rms_norm/fp32"]


@pytest.mark.parametrize("name", ["Acme", "1acme", "a", "acme-x", "class", "x" * 40])
def test_bad_names_are_refused(name):
    with pytest.raises(ScaffoldError, match="invalid backend name"):
        check_name(name, registered=set())


def test_cli_refusals_are_one_line_exit_2(tmp_path, capsys):
    assert main(["new-backend", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already registered" in err
    assert main(["new-backend", "Bad-Name", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid backend name 'Bad-Name'" in err
    assert main(["new-backend", "acme", "--out", str(tmp_path), "--device-type", "NPU!"]) == 2
    assert "invalid --device-type" in capsys.readouterr().err
    assert not (tmp_path / "hwlayer-acme").exists()  # nothing half-written
    (tmp_path / "hwlayer-acme").mkdir()
    assert main(["new-backend", "acme", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err


def test_options_reach_the_declaration(tmp_path):
    pkg = new_backend("zeta", tmp_path, vendor="Zeta Corp", device_type="zpu", dist_backend="zccl")
    src = (pkg / "hwlayer_zeta" / "plugin.py").read_text()
    assert 'device_type="zpu" if ON_DEVICE' in src and 'dist_backend="zccl" if ON_DEVICE' in src
    assert 'vendor="Zeta Corp"' in src and 'VENDOR_MODULE = "torch_zeta"' in src
    compile(src, "plugin.py", "exec")
    compile((pkg / "hwlayer_zeta" / "ops.py").read_text(), "ops.py", "exec")


def test_a_minimal_plugin_stays_under_100_lines(tmp_path):
    """hwlayer carries the boilerplate (hwlayer.plugin: lazy import, the emulation marker, registering a
    table), so the generated package and the example plugin stay small enough to read in one go."""
    new_backend("acme", out=tmp_path)
    generated = sorted((tmp_path / "hwlayer-acme" / "hwlayer_acme").glob("*.py"))
    example = sorted((REPO / "examples" / "hwlayer-example-plugin" / "hwlayer_example").glob("*.py"))
    for files in (generated, example):
        lines = sum(len(f.read_text().splitlines()) for f in files)
        assert files and lines < 100, f"{[f.name for f in files]}: {lines} lines"
    plugin = (tmp_path / "hwlayer-acme" / "hwlayer_acme" / "plugin.py").read_text()
    assert "as_registered(BACKEND)" in plugin and "register_all(" in plugin
