"""``python -m model plan`` knows the real devices and reproduces vllm-ascend's GLM-5 single-node
deployments (vllm-project/vllm-ascend@182b75ea docs/source/tutorials/models/GLM5.md, "5.1 Single-Node
Online Deployment": w4a8 and w8a8 on one Atlas 800 A3 (64GB x 16) at tp16 + expert parallel; only
w4a8 on one Atlas 800 A2 (64GB x 8) at tp8; bf16 needs two A3 nodes); the loader's resident bytes
agree with the plan for every format a tiny checkpoint can be loaded in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import load_model
from model.__main__ import DEVICES, H200_BYTES, main
from model.loader import planned_weight_bytes, resident_weight_bytes
from model.tiny import QUANT_TINY_OVERRIDES, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GLM5_CONFIG = Path("/work/shared/reference/glm5-config.json")
if not GLM5_CONFIG.is_file():
    GLM5_CONFIG = ROOT / "shared" / "reference" / "glm5-config.json"
needs_glm5 = pytest.mark.skipif(not GLM5_CONFIG.is_file(), reason="the GLM-5 reference config.json is not here")


def _table(capsys, node: str) -> dict[str, tuple[bool, bool]]:
    assert main(["plan", "--config", str(GLM5_CONFIG), "--node", node]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        cells = line.split()
        rows[cells[0]] = (cells[3] == "FITS", cells[6] == "FITS")  # (hwlayer EP, vLLM TP=EP)
    return rows


def test_device_memory_as_the_tools_report_it():
    assert round(H200_BYTES / 2**30, 1) == 140.4 and H200_BYTES != 141 * 10**9
    assert DEVICES["h20"].memory == 96 * 2**30 and DEVICES["910b"].memory == 64 * 2**30
    assert (DEVICES["a2"].per_node, DEVICES["a3"].per_node) == (8, 16)


@pytest.mark.slow  # 30 plans of the full GLM-5 config (60k tensors each): ~10 s
@needs_glm5
def test_plan_reproduces_the_vllm_ascend_glm5_single_node_deployments(capsys):
    a3 = _table(capsys, "a3")
    assert a3["w4a8"][1] and a3["w8a8_static"][1]  # one A3, tp16 + EP16
    assert not a3["bf16"][1]  # bf16: two A3 nodes in the tutorial
    a2 = _table(capsys, "a2")
    assert a2["w4a8"][1] and not a2["w8a8_static"][1] and not a2["bf16"][1]  # one A2: w4a8 only, tp8
    # hwlayer's own layout replicates attention on every EP rank: one A3 holds only w4a8
    assert a3["w4a8"][0] and not a3["int8"][0] and not a2["w4a8"][0]
    h200 = _table(capsys, "h200")
    assert h200["fp8_block"][0] and not h200["bf16"][0]


@needs_glm5
def test_plan_device_and_tp_flags(capsys):
    args = ["plan", "--config", str(GLM5_CONFIG), "--ep", "16"]
    assert main([*args, "--weight-format", "int8", "--device", "910b"]) == 0
    out = capsys.readouterr().out
    assert "= 64.13 GiB" in out and "device memory 64.0 GiB: weights DO NOT FIT" in out  # the figure
    assert main(["plan", "--config", str(GLM5_CONFIG), "--ep", "16", "--tp", "16", "--weight-format", "w4a8",
                 "--device", "a3"]) == 0
    assert "tp=16 (vLLM-style, plan only), w4a8" in capsys.readouterr().out
    assert main(["plan", "--config", str(GLM5_CONFIG), "--tp", "0"]) == 2
    assert "--tp 0 must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "fp8_block", "w4a8"])
def test_resident_bytes_agree_with_plan(tmp_path, fmt):
    """Every format a float tiny checkpoint loads in (w4a8: the GLM-5 W4A8 recipe applied at load);
    msmodelslim and compressed-tensors checkpoints: tests/test_quant_checkpoints.py."""
    ck = make_tiny_checkpoint(tmp_path / "f", QUANT_TINY_OVERRIDES)
    m = load_model(ck, backend="cpu", weight_format=fmt)
    dtype = {"bf16": torch.bfloat16}.get(fmt, torch.float32)
    planned = planned_weight_bytes(m.config, fmt, dtype)
    assert resident_weight_bytes(m) == planned["replicated"] + planned["experts"]
    if fmt == "w4a8":
        assert m.layers[1].mlp.w13.format == "w4a8" and m.layers[1].attn.q_a_proj.format == "int8"
