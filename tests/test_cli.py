"""The ``hwlayer`` command (``python -m hwlayer``): info / ops JSON, one-line errors with exit
status 2, and the out-of-tree example plugin seen through a real pip install and entry point."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hwlayer
from hwlayer import Availability, Backend, cli, hookimpl
from hwlayer.ops import CATALOGUE
from hwlayer.registry import load_registry

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = REPO / "examples" / "hwlayer-example-plugin"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLM_BACKEND", "HWLAYER_STRICT", "HWLAYER_PLUGINS", "HWLAYER_TRITON", "HWLAYER_TRACE",
                        "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", None), str(REPO)) if p)
    env.update(extra)
    return env


def hwlayer_cmd(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hwlayer", *args], capture_output=True, text=True,
                          env=clean_env(**env), cwd=REPO, timeout=120)


def pip_install_target(sources: list[Path], target: Path) -> None:
    """A real, offline pip install of local packages into ``target`` (the shared venv stays clean).
    Sources are copied first so the build leaves nothing in the checkout."""
    copies = []
    for src in sources:
        dst = target.parent / f"src-{src.name}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        copies.append(str(dst))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), *copies],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"pip install failed: {result.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_info_json():
    result = hwlayer_cmd("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    names = [b["name"] for b in info["backends"]]
    assert "cpu" in names and info["chosen_backend"] == "cpu"
    cpu = next(b for b in info["backends"] if b["name"] == "cpu")
    assert cpu["available"] and cpu["plugin"] == "hwlayer.backends.cpu"
    assert info["hookspec_version"] == hwlayer.HOOKSPEC_VERSION


@pytest.mark.slow
def test_ops_json_lists_every_op():
    result = hwlayer_cmd("ops", "--backend", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "cpu" and data["device"] == "cpu" and data["fallbacks"] == []
    assert sorted(e["op"] for e in data["ops"]) == sorted(CATALOGUE)
    assert {e["origin"] for e in data["ops"]} == {"generic"}


@pytest.mark.slow
def test_unknown_backend_is_one_line_and_exit_2():
    result = hwlayer_cmd("ops", "--backend", "nope")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("hwlayer: error: unknown backend 'nope'; registered backends: ")
    assert "cpu" in lines[0]


def test_unavailable_backend_in_process(monkeypatch, capsys):
    class Ghost:
        @hookimpl
        def hwlayer_register_backends(self, register):
            register(Backend(name="ghost", vendor="t", device_type="cpu", dist_backend="gloo",
                             detect=lambda: Availability(False, "no ghost device found"),
                             install_hint="pip install ghost-runtime"))

    monkeypatch.setattr(importlib.import_module("hwlayer.registry"), "_REGISTRY",
                        load_registry(extra_plugins=(Ghost(),)))
    try:
        assert cli.main(["ops", "--backend", "ghost"]) == 2
        err = capsys.readouterr().err
        expected = "backend 'ghost' is unavailable: no ghost device found (pip install ghost-runtime)"
        assert err == f"hwlayer: error: {expected}\n"
        assert cli.main(["info", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        ghost = next(b for b in info["backends"] if b["name"] == "ghost")
        assert not ghost["available"] and ghost["install_hint"] == "pip install ghost-runtime"
    finally:
        monkeypatch.undo()
        hwlayer.reset()


# ---------------------------------------------------------------------------------------------
# The example out-of-tree plugin, installed for real


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("example-plugin") / "site"
    pip_install_target([EXAMPLE_PLUGIN], target)
    assert (target / "hwlayer_example" / "__init__.py").is_file()
    return target


@pytest.mark.slow
def test_example_plugin_op_is_native_from_the_plugin(example_site):
    result = hwlayer_cmd("ops", "--backend", "example", "--json", PYTHONPATH=str(example_site))
    assert result.returncode == 0, result.stderr
    entries = {e["op"]: e for e in json.loads(result.stdout)["ops"]}
    silu = entries["silu_and_mul"]
    assert silu["origin"].startswith("native") and silu["plugin"] == "example"
    assert silu["implementation"] == "hwlayer_example.silu_and_mul"
    assert entries["rms_norm"]["origin"] == "generic"

    info = hwlayer_cmd("info", "--json", PYTHONPATH=str(example_site))
    data = json.loads(info.stdout)
    example = next(b for b in data["backends"] if b["name"] == "example")
    assert example["available"] and example["plugin"] == "example" and example["device_type"] == "cpu"
    assert data["chosen_backend"] == "cpu"  # low priority: auto-detection never picks it
    assert "example" in data["plugins"]


@pytest.mark.slow
def test_empty_hwlayer_plugins_hides_the_example(example_site):
    info = hwlayer_cmd("info", "--json", PYTHONPATH=str(example_site), HWLAYER_PLUGINS="")
    data = json.loads(info.stdout)
    assert "example" not in [b["name"] for b in data["backends"]] and "example" not in data["plugins"]


@pytest.mark.slow
def test_example_plugin_passes_conformance_for_its_op(example_site, tmp_path):
    report = tmp_path / "example.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance/", "--backend", "example",
         "-k", "silu_and_mul", "--dtype", "fp32,bf16", "--report", str(report),
         "--ignore-glob=*/test_ep_*.py", "--ignore-glob=*/test_model_e2e.py"],
        capture_output=True, text=True, env=clean_env(PYTHONPATH=str(example_site)), cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    records = json.loads(report.read_text())["records"]
    assert {r["dtype"] for r in records} == {"fp32", "bf16"}
    for r in records:
        assert r["op"] == "silu_and_mul" and r["passed"] and r["plan_origin"] == "native+fallback"
        # contiguous cases ran the plugin's kernel; strided ones were declined by supports()
        assert r["calls"]["native"] > 0 and r["calls"]["generic"] > 0


@pytest.mark.slow
def test_wheel_ships_py_typed_and_its_conformance_command_names_the_fix(tmp_path):
    """hwlayer built as a wheel and installed with no checkout beside it: py.typed ships, the suite does
    not, and ``hwlayer conformance`` says so in one line with exit status 2 instead of a traceback."""
    src = tmp_path / "src-hwlayer"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("hwlayer", "model", "serving"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([*pip[:3], "wheel", *pip[3:], "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("hwlayer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hwlayer/py.typed" in names
    assert not [n for n in names if n.startswith("conformance/")]
    site = tmp_path / "site"
    done = subprocess.run([*pip[:3], "install", *pip[3:], "--no-deps", "--no-index", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    env = {**clean_env(), "PYTHONPATH": str(site)}  # the installed wheel, not the checkout
    where = subprocess.run([sys.executable, "-c", "import hwlayer; print(hwlayer.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    run = subprocess.run([sys.executable, str(site / "bin" / "hwlayer"), "conformance", "--backend", "cpu",
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and "not part of the wheel" in err and "source checkout" in err, err
