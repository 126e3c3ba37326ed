"""Plugin registry: built-ins through the hooks, faulty plugins skipped (or fatal when strict),
HWLAYER_PLUGINS filtering of real entry points, hook-spec version checks."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest

import hwlayer
from hwlayer import Backend, hookimpl, hookspecs
from hwlayer.registry import BUILTIN_PLUGINS, HwlayerPluginWarning, PluginError, load_registry


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HWLAYER_STRICT", "HWLAYER_PLUGINS", "GLM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    yield
    monkeypatch.undo()  # environment and sys.path first, so the reload sees the real installation
    hwlayer.reset()


def make_plugin(name: str, backends: tuple[str, ...] = (), ops: tuple = (), version: str | None = None,
                raise_in: str | None = None) -> types.ModuleType:
    """A plugin module object with both hooks, as a vendor package would write it."""
    mod = types.ModuleType(name)
    if version is not None:
        mod.HWLAYER_HOOKSPEC_VERSION = version

    @hookimpl
    def hwlayer_register_backends(register):
        if raise_in == "backends":
            raise RuntimeError("driver handshake failed")
        for b in backends:
            register(Backend(name=b, vendor="test", device_type="cpu", dist_backend="gloo", priority=-100))

    @hookimpl
    def hwlayer_register_ops(register):
        if raise_in == "ops":
            raise RuntimeError("kernel library missing")
        for op, fn, backend in ops:
            register(op, fn, backend=backend)

    mod.hwlayer_register_backends = hwlayer_register_backends
    mod.hwlayer_register_ops = hwlayer_register_ops
    return mod


def _silu(x):
    return hwlayer.ops.silu_and_mul(x)


def test_builtins_load_through_the_hooks():
    reg = load_registry()
    for mod in BUILTIN_PLUGINS:
        assert mod in reg.plugins, f"built-in plugin {mod} did not load: {reg.skipped.get(mod)}"
    assert reg.backend_plugins["cpu"] == "hwlayer.backends.cpu"
    assert reg.backends["cpu"].reference
    assert {"cpu", "triton"} <= set(reg.backends)


def test_extra_plugin_registers_backend_and_op():
    reg = load_registry(extra_plugins=(make_plugin("acme", ("acme",), (("silu_and_mul", _silu, "acme"),)),))
    assert reg.backend_plugins["acme"] == "acme"
    (impl,) = reg.implementations("silu_and_mul", "acme")
    assert impl.fn is _silu and impl.plugin == "acme" and impl.supports is None


@pytest.mark.parametrize("where", ["backends", "ops"])
def test_plugin_raising_in_a_hook_is_skipped_with_one_line_warning(where):
    good = make_plugin("good_vendor", ("goodbk",), (("silu_and_mul", _silu, "goodbk"),))
    bad = make_plugin("bad_vendor", ("badbk",), (("silu_and_mul", _silu, "badbk"),), raise_in=where)
    with pytest.warns(HwlayerPluginWarning) as record:
        reg = load_registry(extra_plugins=(bad, good))
    messages = [str(w.message) for w in record if "bad_vendor" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert f"hwlayer_register_{where} raised RuntimeError" in messages[0]
    assert "bad_vendor" in reg.skipped
    assert "goodbk" in reg.backends and reg.implementations("silu_and_mul", "goodbk")
    assert "cpu" in reg.backends
    assert not reg.implementations("silu_and_mul", "badbk") and "badbk" not in reg.backends


def test_strict_mode_makes_a_faulty_plugin_an_error(monkeypatch):
    monkeypatch.setenv("HWLAYER_STRICT", "1")
    with pytest.raises(PluginError, match="bad_vendor.*driver handshake failed"):
        load_registry(extra_plugins=(make_plugin("bad_vendor", ("badbk",), raise_in="backends"),))


def test_unknown_op_and_duplicate_backend_are_skipped():
    bogus = make_plugin("bogus_ops", ("bogusbk",), (("flash_everything", _silu, "bogusbk"),))
    dup = make_plugin("dup_cpu", ("cpu",))
    with pytest.warns(HwlayerPluginWarning):
        reg = load_registry(extra_plugins=(bogus, dup))
    assert "unknown op 'flash_everything'" in reg.skipped["bogus_ops"]
    assert "already registered by 'hwlayer.backends.cpu'" in reg.skipped["dup_cpu"]
    assert reg.backend_plugins["cpu"] == "hwlayer.backends.cpu"


# ---------------------------------------------------------------------------------------------
# Hook-spec versions


V = hookspecs.HOOKSPEC_VERSION


@pytest.mark.parametrize("version", ["1.0", "1.2", "2.0"])
def test_hookspec_versions_accepted(version):
    reg = load_registry(extra_plugins=(make_plugin("vok", ("vokbk",), version=version),))
    assert "vok" in reg.plugins and "vokbk" in reg.backends


def test_a_plugin_repeating_a_taken_backend_name_is_refused_whole():
    """Its other backends must not stay registered without its ops (they would serve generic torch)."""
    both = make_plugin("half_dup", ("freshbk", "cpu"), ops=(("rms_norm", lambda *a: None, "freshbk"),))
    with pytest.warns(HwlayerPluginWarning, match="half_dup"):
        reg = load_registry(extra_plugins=(both,))
    assert "already registered by 'hwlayer.backends.cpu'" in reg.skipped["half_dup"]
    assert "freshbk" not in reg.backends and reg.backend_plugins["cpu"] == "hwlayer.backends.cpu"
    assert not [r for r in reg.ops if r.plugin == "half_dup"]
    twice = make_plugin("self_dup", ("samebk", "samebk"))
    with pytest.warns(HwlayerPluginWarning, match="self_dup"):
        reg = load_registry(extra_plugins=(twice,))
    assert "samebk" not in reg.backends


@pytest.mark.parametrize(
    "version, expected",
    [
        ("3.0", f"built for hook specs 3.0, this hwlayer provides {V} (compatible: 1.0 to 1.2, served on the "
                f"canonical layouts, and 2.0 to {V})"),
        ("1.9", "built for hook specs 1.9"),
        ("2.9", "built for hook specs 2.9"),
        ("garbage", "declares HWLAYER_HOOKSPEC_VERSION='garbage'; expected 'MAJOR.MINOR'"),
    ],
)
def test_hookspec_version_refused(version, expected, monkeypatch):
    plugin = make_plugin(f"vendor_{version}", ("refusedbk",), version=version)
    with pytest.warns(HwlayerPluginWarning, match=f"vendor_{version}"):
        reg = load_registry(extra_plugins=(plugin,))
    assert expected in reg.skipped[f"vendor_{version}"]
    assert "refusedbk" not in reg.backends
    monkeypatch.setenv("HWLAYER_STRICT", "1")
    with pytest.raises(PluginError, match="compatible|MAJOR.MINOR"):
        load_registry(extra_plugins=(plugin,))


# ---------------------------------------------------------------------------------------------
# Installed entry points (a real .dist-info on sys.path, read by importlib.metadata)


@pytest.fixture
def installed_plugins(tmp_path: Path, monkeypatch) -> Path:
    """Two entry-point plugins in group ``hwlayer``: ``goodep`` works, ``raising`` fails on import."""
    (tmp_path / "hwlayer_goodep_plugin.py").write_text(
        "from hwlayer import Backend, hookimpl\n"
        "@hookimpl\n"
        "def hwlayer_register_backends(register):\n"
        "    register(Backend(name='goodep', vendor='t', device_type='cpu', dist_backend='gloo', priority=-100))\n"
    )
    (tmp_path / "hwlayer_raising_plugin.py").write_text("raise ImportError('vendor runtime libfoo.so not found')\n")
    dist = tmp_path / "hwlayer_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hwlayer-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[hwlayer]\ngoodep = hwlayer_goodep_plugin\nraising = hwlayer_raising_plugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_point_raising_on_import_is_skipped(installed_plugins):
    with pytest.warns(HwlayerPluginWarning, match="'raising'.*ImportError: vendor runtime libfoo.so not found"):
        reg = load_registry()
    assert "goodep" in reg.backends and reg.backend_plugins["goodep"] == "goodep"
    assert "raising" in reg.skipped and "cpu" in reg.backends


def test_entry_point_raising_on_import_is_fatal_when_strict(installed_plugins, monkeypatch):
    monkeypatch.setenv("HWLAYER_STRICT", "1")
    with pytest.raises(PluginError, match="'raising' failed: import failed"):
        load_registry()


def test_hwlayer_plugins_filters_entry_points(installed_plugins, monkeypatch):
    monkeypatch.setenv("HWLAYER_PLUGINS", "goodep")
    with warnings.catch_warnings():
        warnings.simplefilter("error", HwlayerPluginWarning)  # 'raising' is not even imported
        reg = load_registry()
    assert "goodep" in reg.backends and "raising" not in reg.skipped
    monkeypatch.setenv("HWLAYER_PLUGINS", "")
    reg = load_registry()
    assert "goodep" not in reg.backends and "raising" not in reg.skipped
    assert "cpu" in reg.backends  # built-ins always load
