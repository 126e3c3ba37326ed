"""CUDA-family and Ascend detection, with the machine's signals injected (no hardware here)."""

from __future__ import annotations

import pytest

import hwlayer
from hwlayer.backends.cuda import BACKENDS
from hwlayer.backends.cuda.detect import FAMILY, Probes, detect, identify


def probes(
    *, hip: str | None = None, cuda: bool = True, name: str = "", modules: tuple[str, ...] = (),
    tools: tuple[str, ...] = (), import_ok: bool = True,
) -> Probes:
    return Probes(
        hip_version=lambda: hip,
        cuda_available=lambda: cuda,
        device_name=lambda: name,
        module_available=lambda m: m in modules,
        on_path=lambda t: t in tools,
        import_module=lambda m: import_ok and m in modules,
    )


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (dict(name="NVIDIA H200"), "cuda"),
        (dict(name="NVIDIA H200", modules=("flash_mla", "deep_gemm")), "cuda"),
        (dict(hip="6.2", name="DCU K100_AI", tools=("hy-smi",)), "hygon"),
        (dict(hip="6.2", name="Hygon Z100"), "hygon"),
        (dict(name="MetaX C500"), "metax"),
        (dict(name="Device 4000", modules=("mcoplib",)), "metax"),
        (dict(name="Iluvatar BI-V150"), "iluvatar"),
        (dict(name="NVIDIA-compatible", modules=("torch_xmlir",)), "kunlunxin"),
    ],
)
def test_each_vendor_is_recognised(signals: dict, expected: str) -> None:
    found, reason = identify(probes(**signals))
    assert found == expected, reason
    assert detect(expected, probes(**signals)).available
    for other in FAMILY:
        if other != expected:
            status = detect(other, probes(**signals))
            assert not status.available
            assert "not" in status.reason


def test_vendor_signals_win_over_plain_nvidia() -> None:
    # A MetaX device whose name mimics NVIDIA's is still MetaX when mcoplib is importable.
    assert identify(probes(name="NVIDIA A100", modules=("mcoplib",)))[0] == "metax"
    # torch_xmlir beats every other signal: the device is reached through it.
    assert identify(probes(name="MetaX C500", modules=("torch_xmlir", "mcoplib")))[0] == "kunlunxin"
    # A HIP build is Hygon even if mcoplib happens to be installed.
    assert identify(probes(hip="6.2", name="DCU", tools=("hy-smi",), modules=("mcoplib",)))[0] == "hygon"
    # An Iluvatar device stays Iluvatar when NVIDIA kernels are installed too.
    assert identify(probes(name="Iluvatar MR-V100", modules=("flash_mla",)))[0] == "iluvatar"


def test_no_device_and_amd_are_reported_not_guessed() -> None:
    found, reason = identify(probes(cuda=False))
    assert found is None and "no CUDA-compatible device" in reason
    found, reason = identify(probes(hip="6.2", name="AMD Instinct MI300X"))
    assert found is None and "AMD" in reason and "triton" in reason
    found, reason = identify(probes(cuda=False, modules=("torch_xmlir",)))
    assert found is None and "torch_xmlir" in reason
    found, _ = identify(probes(modules=("torch_xmlir",), import_ok=False))
    assert found is None  # a torch_xmlir that fails to import is not a usable Kunlunxin


def test_family_facts() -> None:
    by_name = {b.name: b for b in BACKENDS}
    # Kunlunxin is detected here (so NVIDIA is never claimed on its machines) but registered by its
    # out-of-tree plugin, plugins/hwlayer-kunlun.
    assert set(by_name) == set(FAMILY) - {"kunlunxin"}
    by_name["kunlunxin"] = hwlayer.registry().backends["kunlunxin"]
    assert all(b.device_type == "cuda" and b.dist_backend == "nccl" for b in BACKENDS)
    assert by_name["hygon"].visible_devices_env == "HIP_VISIBLE_DEVICES"
    assert by_name["cuda"].visible_devices_env == "CUDA_VISIBLE_DEVICES"
    for name in ("cuda", "hygon", "metax", "iluvatar"):
        assert by_name[name].inherits == ("triton",)
    assert "triton" not in by_name["kunlunxin"].inherits  # no Kunlunxin Triton backend is documented
    for b in by_name.values():
        assert b.install_hint
        if b.name == "cuda":  # conformance ran on an H200, but without the libraries its adapters call
            assert "H200" in b.verified and "not run with those libraries" in b.verified
        elif b.name == "kunlunxin":
            assert "not run on Kunlunxin hardware" in b.verified
        elif b.name == "iluvatar":
            assert "emulated in CI, not run on Iluvatar hardware" in b.verified
        else:
            assert "not run on hardware" in b.verified
    for name in ("cuda", "hygon", "metax", "kunlunxin"):  # native adapters: emulated in CI
        assert "emulated in CI" in by_name[name].verified
    assert "unverified" in by_name["kunlunxin"].verified and "unverified" in by_name["hygon"].verified


def test_registry_knows_every_vendor_and_glm_backend_accepts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = hwlayer.registry()
    for name in (*FAMILY, "ascend", "triton", "cpu"):
        assert name in reg.backends
    # On this machine (no accelerator) each vendor name is accepted and refused with its reason.
    for name in (*FAMILY, "ascend"):
        monkeypatch.setenv("GLM_BACKEND", name.upper())
        with pytest.raises(hwlayer.BackendError, match=f"backend '{name}' is unavailable: .+"):
            hwlayer.select_backend()
    monkeypatch.setenv("GLM_BACKEND", "nvidia")
    with pytest.raises(hwlayer.BackendError, match="unknown backend 'nvidia'"):
        hwlayer.select_backend()


def test_auto_detection_ranks_vendors_above_cpu_and_triton_below() -> None:
    reg = hwlayer.registry()
    cpu = reg.backends["cpu"].priority
    assert reg.backends["triton"].priority < cpu
    assert all(reg.backends[n].priority > cpu for n in (*FAMILY, "ascend"))
