"""The checkpoint formats deployments have (issue 21): msmodelslim W8A8 (static attention + dynamic
MLP) and W4A8 (int4 experts), compressed-tensors W8A8 int8 / FP8_BLOCK, each written by a test
helper that follows its writer (model/tiny.py cites msmodelslim's saver) and loaded against the
float model it came from; the config rules (module-prefix ``modules_to_not_convert``, ``re:``
ignore patterns, ``scale_fmt: ue8m0``); requantization logged with its price; bad input in one line."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ConfigError, load_model
from model.config import ModelConfig, QuantConfig, _ct_match, _prefix_match
from model.generate import generate, score
from model.loader import load_state, planned_weight_bytes, resident_weight_bytes
from model.tiny import (
    QUANT_TINY_OVERRIDES,
    make_compressed_tensors_checkpoint,
    make_msmodelslim_checkpoint,
    make_tiny_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent
ATTN = "model.layers.1.self_attn."
EXPERT = "model.layers.1.mlp.experts.0."
# Logits KL(float || quantized) and top-1 agreement on these seeded checkpoints and prompts (measured,
# docs/benchmarks.md): int8 from float 0.011 / 0.83; msmodelslim W8A8 (the GLM-5 recipe: QuaRot +
# flex_smooth_quant, then static attention) 0.038 / 0.81; W4A8 0.043 / 0.67; compressed-tensors int8
# ~= int8, FP8_BLOCK 0.11 / 0.40 (kv_b_proj and wk quantized too). Bounds are loose (the tiny random
# model is chaotic: on these 2 x 24 tokens a float-equivalent rotation alone moves W8A8's KL between
# 0.012 and 0.038), but a wrong scale, offset, nibble order or bias gives KL > 1.
QUALITY = {"w8a8": (0.06, 0.75), "w4a8": (0.09, 0.6), "ct-int8": (0.03, 0.75), "ct-fp8_block": (0.2, 0.3)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {"float": make_tiny_checkpoint(root / "float", QUANT_TINY_OVERRIDES),
            "w8a8": make_msmodelslim_checkpoint(root / "w8a8", "w8a8", keep_float=root / "w8a8-float"),
            "w8a8-float": root / "w8a8-float",  # the recipe's rotated + smoothed float model, before quantization
            "w4a8": make_msmodelslim_checkpoint(root / "w4a8", "w4a8"),
            "ct-int8": make_compressed_tensors_checkpoint(root / "ct-int8", "int8"),
            "ct-fp8_block": make_compressed_tensors_checkpoint(root / "ct-fp8", "fp8_block")}


def _kl_top1(q, ref) -> tuple[float, float]:
    ids = torch.randint(20, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    prompt = generate(ref, ids[:, :8], max_new_tokens=16)  # the float greedy continuation, teacher-forced
    a, b = score(q, prompt), score(ref, prompt)
    lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- msmodelslim ----------------------------------------------------------------------------------


def test_msmodelslim_files_as_the_saver_writes_them(ckpts):
    p = ckpts["w8a8"]
    assert not (p / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((p / "config.json").read_text())
    index = json.loads((p / "quant_model_weights.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"quant_model_weights-00001-of-00002.safetensors",
                                                 "quant_model_weights-00002-of-00002.safetensors", "rot.safetensors"}
    desc = json.loads((p / "quant_model_description.json").read_text())
    # QuaRot's export_extra_info: the global rotation Q in optional/, rot.weight = Q^T diag(model.norm) Q
    assert desc["is_rot_used"] is True and index["weight_map"]["rot.weight"] == "rot.safetensors"
    assert desc["optional"] == {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    q = load_file(str(p / "optional" / "quarot.safetensors"))["global_rotation"].double()
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-6)
    norm = load_file(str(ckpts["float"] / "model.safetensors"))["model.norm.weight"].double()
    rot = load_file(str(p / "rot.safetensors"))["rot.weight"].double()
    assert torch.allclose(rot, q.T @ torch.diag(norm) @ q, atol=1e-5)
    assert desc[ATTN + "q_a_proj.weight"] == desc[ATTN + "q_a_proj.deq_scale"] == "W8A8"
    assert desc[EXPERT + "gate_proj.weight_offset"] == "W8A8_DYNAMIC" and desc[ATTN + "kv_b_proj.weight"] == "FLOAT"
    assert desc["model_quant_type"] == "W8A8" and desc["version"] == "1.0.0"
    shard = load_file(str(p / index["weight_map"][ATTN + "q_a_proj.deq_scale"]))
    assert shard[ATTN + "q_a_proj.deq_scale"].dtype == torch.int64  # fp32 model: deq_scale's bits in int64


@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_msmodelslim_loads_and_agrees_with_its_float_model(ckpts, kind):
    m = load_model(ckpts[kind], backend="cpu")
    ref = load_model(ckpts["float"], backend="cpu")
    attn, mlp = m.layers[1].attn, m.layers[1].mlp
    if kind == "w8a8":
        assert m.weight_format == "w8a8_static"
        assert attn.q_a_proj.format == attn.o_proj.format == attn.wq_b.format == "w8a8_static"
        assert mlp.w13.format == "int8" and m.layers[0].mlp.down.format == "int8"
    else:
        assert m.weight_format == "w4a8" and mlp.w13.format == mlp.w2.format == "w4a8"
        assert attn.q_a_proj.format == "int8" and isinstance(m.mtp.eh_proj, torch.Tensor)  # MTP layer left float
    assert isinstance(attn.wk, torch.Tensor)  # FLOAT in both recipes
    kl, top1 = _kl_top1(m, ref)
    assert kl < QUALITY[kind][0] and top1 >= QUALITY[kind][1], (kind, kl, top1)


@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_msmodelslim_resident_bytes_match_plan_and_recipe(ckpts, kind):
    m = load_model(ckpts[kind], backend="cpu")
    fmt = m.weight_format
    mtp = m.mtp is not None  # the W8A8 recipe's checkpoint is rotated: loaded without its MTP layer
    from_desc = planned_weight_bytes(m.config, fmt, torch.float32, with_mtp=mtp)
    from_recipe = planned_weight_bytes(ModelConfig.from_json(ckpts["float"]), fmt, torch.float32,
                                       with_mtp=mtp)  # plan's view
    assert resident_weight_bytes(m) == from_desc["replicated"] + from_desc["experts"]
    assert from_desc == from_recipe


def test_msmodelslim_on_a_backend_without_its_formats_converts_losslessly(ckpts, caplog):
    cfg = ModelConfig.from_json(ckpts["w4a8"])
    with caplog.at_level(logging.WARNING, logger="model.loader"):
        state, _ = load_state(ckpts["w4a8"], cfg, torch.float32, weight_format="w4a8",
                              native_formats=("int8", "fp32"))
    as_int8 = state["model.layers.1.mlp.experts.w13"]
    assert as_int8.format == "int8"
    native, _ = load_state(ckpts["w4a8"], cfg, torch.float32, weight_format="w4a8")
    assert torch.equal(as_int8.dequantize(), native["model.layers.1.mlp.experts.w13"].dequantize())
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "weight format changed at load: 96 w4a8 weights converted to int8 (lossless)"]  # 2 MoE layers x 16 x 3


def test_prepare_weight_called_once_per_resident_weight(ckpts):
    seen: list[str] = []

    def prepare(name, w):
        seen.append(name)
        return w

    cfg = ModelConfig.from_json(ckpts["w8a8"])
    state, _ = load_state(ckpts["w8a8"], cfg, torch.float32, weight_format="w8a8_static", prepare=prepare)
    assert sorted(seen) == sorted(state)


def _edit(src: Path, dst: Path, tensors=None, desc=None, index_drop: str | None = None) -> Path:
    """A copy of msmodelslim checkpoint ``src`` with ``tensors(shard_dict)`` applied to every shard and
    ``desc(dict)`` to the description."""
    out = _copy(src, dst)
    if tensors is not None:
        index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
        for f in sorted(set(index["weight_map"].values())):
            t = load_file(str(out / f))
            tensors(t)
            save_file(t, str(out / f))
            for name in [n for n, g in index["weight_map"].items() if g == f and n not in t]:
                del index["weight_map"][name]
        (out / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index))
    if desc is not None:
        d = json.loads((out / "quant_model_description.json").read_text())
        desc(d)
        (out / "quant_model_description.json").write_text(json.dumps(d))
    return out


def _pop(name):
    return lambda t: t.pop(name, None)


def _set(name, value):
    return lambda t: t.__setitem__(name, value) if name in t else None


def _swap_nibbles(name):
    def fn(t):
        if name in t:
            b = t[name].to(torch.int16) & 0xFF
            s = ((b & 0xF) << 4) | (b >> 4)
            t[name] = torch.where(s > 127, s - 256, s).to(torch.int8)
    return fn


BAD = {
    "missing-input-offset": ("w8a8", _pop(ATTN + "o_proj.input_offset"), _pop(ATTN + "o_proj.input_offset"),
                             rf"quant_model_weights-0000\d-of-00002\.safetensors: w8a8_static tensor "
                             rf"'{ATTN}o_proj\.weight' has no '{ATTN}o_proj\.input_offset' \(expected float \[1\]"),
    "missing-scale": ("w8a8", _pop(EXPERT + "up_proj.weight_scale"), _pop(EXPERT + "up_proj.weight_scale"),
                      rf"int8 tensor '{EXPERT}up_proj\.weight' has no '{EXPERT}up_proj\.weight_scale'"),
    "missing-description-entry": ("w8a8", None, lambda d: d.pop(ATTN + "q_b_proj.quant_bias"),
                                  rf"quant_model_description\.json: no entry for tensor '{ATTN}q_b_proj\.quant_bias'"),
    "phantom-tensor": ("w8a8", None, lambda d: d.__setitem__(ATTN + "q_proj.weight", "W8A8"),
                       rf"quant_model_description\.json: names tensor '{ATTN}q_proj\.weight' \(W8A8\) which no "
                       rf"quant_model_weights\*\.safetensors file holds"),
    "unknown-type": ("w8a8", None, lambda d: d.__setitem__(ATTN + "o_proj.weight", "W4A4_MXFP4"),
                     rf"quant_model_description\.json: tensor '{ATTN}o_proj\.weight' has quant type 'W4A4_MXFP4', "
                     rf"expected one of W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC, FLOAT"),
    "group-size": ("w4a8", None, lambda d: d.__setitem__("group_size", 48),
                   r"w4a8 tensor 'model\.layers\.\d\.mlp\.experts\.\d+\.\w+_proj\.weight' \[\d+, 128\]: group_size 48 "
                   r"\(from quant_model_description\.json\) does not divide K=128"),
    "nonzero-offset": ("w8a8", _set(EXPERT + "down_proj.weight_offset", torch.ones(128, 1)), None,
                       rf"tensor '{EXPERT}down_proj\.weight_offset' has non-zero values .*expected zeros"),
    "nibble-order": ("w4a8", _swap_nibbles(EXPERT + "gate_proj.weight"), None,
                     rf"tensor '{EXPERT}gate_proj\.scale_bias' disagrees with the packed weight, expected 8 x "
                     rf"rowsum"),
    "static-dtype": ("w8a8", _set(ATTN + "o_proj.quant_bias", torch.zeros(128)), None,
                     rf"tensor '{ATTN}o_proj\.quant_bias' is torch\.float32 \[128\], expected int32 \[128\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_msmodelslim_checkpoint_one_line(ckpts, tmp_path, case):
    kind, tensors, desc, pattern = BAD[case]
    bad = _edit(ckpts[kind], tmp_path / case, tensors, desc)
    with pytest.raises((CheckpointError, ConfigError), match=pattern) as info:
        load_model(bad, backend="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.slow  # two subprocesses
def test_cli_and_server_exit_2_on_a_bad_checkpoint(ckpts, tmp_path):
    bad = _edit(ckpts["w8a8"], tmp_path / "bad", _pop(ATTN + "o_proj.input_scale"), _pop(ATTN + "o_proj.input_scale"))
    r = subprocess.run([sys.executable, "-m", "model", "--model", str(bad), "--prompt", "hi", "--backend", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.strip().splitlines() if "MTP layer not loaded" not in ln]  # rotated: 1 warning
    assert r.returncode == 2 and r.stdout == "" and len(errors) == 1, r.stderr
    assert f"has no '{ATTN}o_proj.input_scale'" in r.stderr
    r = subprocess.run([sys.executable, "serve.py", str(bad), "--port", "0"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "GLM_BACKEND": "cpu"})
    assert r.returncode == 2 and f"has no '{ATTN}o_proj.input_scale'" in r.stderr  # never listened half-loaded
    assert "Uvicorn running" not in r.stderr + r.stdout


def test_rotated_checkpoint_loads_without_its_mtp_layer(ckpts, tmp_path, caplog):
    """QuaRot is fused offline; only the MTP draft of a rotated checkpoint needs rot.weight at run time
    (vllm-ascend models/deepseek_mtp.py), which hwlayer does not apply: the MTP layer is left out.
    The W8A8 recipe's checkpoint is rotated; without ``is_rot_used`` its MTP layer loads."""
    with caplog.at_level(logging.WARNING, logger="model.loader"):
        m = load_model(ckpts["w8a8"], backend="cpu")
    assert m.mtp is None
    assert any("MTP layer not loaded" in r.getMessage() for r in caplog.records)
    unrot = _edit(ckpts["w8a8"], tmp_path / "unrot", desc=lambda d: d.pop("is_rot_used"))
    assert load_model(unrot, backend="cpu").mtp is not None


def test_msmodelslim_recipe_processing_leaves_the_float_model_unchanged(ckpts):
    """QuaRot (norms folded into the linears, Hadamard rotations) and flex_smooth_quant are fused
    offline into the float weights: the processed float model scores as the original does, though its
    weights and norms differ (so a rotation applied on one side only, or a scale not divided back out
    of its producer, fails here)."""
    got, want = (load_file(str(ckpts[k] / "model.safetensors")) for k in ("w8a8-float", "float"))
    assert torch.equal(got["model.norm.weight"], torch.ones_like(want["model.norm.weight"]))
    assert not torch.allclose(got[ATTN + "o_proj.weight"], want[ATTN + "o_proj.weight"], atol=1e-3)
    assert not torch.allclose(got["model.layers.1.input_layernorm.weight"], torch.ones(128), atol=1e-3)  # 1/s
    ids = torch.randint(20, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    a = score(load_model(ckpts["w8a8-float"], backend="cpu"), ids)
    b = score(load_model(ckpts["float"], backend="cpu"), ids)
    assert (a - b).abs().max() < 1e-4 * b.abs().max(), float((a - b).abs().max())


# ---- compressed-tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "fp8_block"])
def test_compressed_tensors_loads(ckpts, scheme):
    key = f"ct-{scheme}"
    cfg = ModelConfig.from_json(ckpts[key])
    assert cfg.quant.method == "compressed-tensors" and cfg.quant.weight_format == scheme
    m = load_model(ckpts[key], backend="cpu")
    assert m.weight_format == scheme and m.layers[1].mlp.w13.format == scheme
    assert isinstance(m.layers[1].mlp.gate, torch.Tensor) and m.layers[1].mlp.gate.dtype == torch.float32  # ignored
    assert m.layers[1].attn.wk.format == scheme  # a Linear: quantized, not in ignore
    kl, top1 = _kl_top1(m, load_model(ckpts["float"], backend="cpu"))
    assert kl < QUALITY[key][0] and top1 >= QUALITY[key][1], (scheme, kl, top1)
    planned = planned_weight_bytes(m.config, scheme, torch.float32)
    assert resident_weight_bytes(m) == planned["replicated"] + planned["experts"]


def test_ignore_and_not_convert_matching_rules():
    # compressed-tensors / vLLM: "re:" + re.match from the start, else the exact module name
    assert _ct_match("model.layers.3.mlp.gate", r"re:.*mlp\.gate$")
    assert not _ct_match("model.layers.3.mlp.gate_proj", r"re:.*mlp\.gate$")
    assert not _ct_match("model.layers.3.mlp.gate", "mlp.gate")  # no substring, no suffix
    assert not _ct_match("model.layers.3.self_attn.q_a_proj", r"re:q_a_proj")  # re.match anchors at the start
    # modules_to_not_convert: module prefixes on dot boundaries, never substrings
    assert _prefix_match("model.layers.3.mlp.gate", "mlp.gate")
    assert not _prefix_match("model.layers.3.mlp.gate_proj", "mlp.gate")
    assert _prefix_match("model.layers.0.mlp.down_proj", "model.layers.0.mlp")
    assert not _prefix_match("model.layers.10.mlp.down_proj", "model.layers.1")
    qc = QuantConfig("fp8", "fp8_block", ("mlp.gate", "lm_head"))
    assert not qc.converts("model.layers.3.mlp.gate") and qc.converts("model.layers.3.mlp.gate_proj")


def test_compressed_tensors_bad_configs(tmp_path):
    raw = json.loads((make_tiny_checkpoint(tmp_path / "c") / "config.json").read_text())
    group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
             "input_activations": None}
    with pytest.raises(ConfigError, match=r"field 'quantization_config\.config_groups\.group_0' expected W8A8 int8"):
        ModelConfig.from_dict(raw | {"quantization_config": {"quant_method": "compressed-tensors",
                                                             "config_groups": {"group_0": group}}})
    ok = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
          "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}
    with pytest.raises(ConfigError, match=r"ignore' entry 're:\(' is not a valid regular expression"):
        ModelConfig.from_dict(raw | {"quantization_config": {"quant_method": "compressed-tensors",
                                                             "config_groups": {"g": ok}, "ignore": ["re:("]}})


# ---- fp8 config options, requantization, format vs dtype ------------------------------------------


def test_ue8m0_is_honoured(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ue8m0", QUANT_TINY_OVERRIDES, weight_format="fp8_block")
    raw = json.loads((ck / "config.json").read_text())
    raw["quantization_config"]["scale_fmt"] = "ue8m0"
    (ck / "config.json").write_text(json.dumps(raw))
    m = load_model(ck, backend="cpu")
    assert m.layers[1].attn.q_a_proj.act_scale_fmt == "ue8m0" and m.layers[1].mlp.w13.act_scale_fmt == "ue8m0"
    w = m.layers[1].attn.q_a_proj
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(m.plan.quant_linear(x, w), m.plan.quant_linear(x, w.replace(act_scale_fmt=None)))
    raw["quantization_config"]["scale_fmt"] = "e8m0x"
    with pytest.raises(ConfigError, match=r"field 'quantization_config\.scale_fmt' expected 'ue8m0' or absent"):
        ModelConfig.from_dict(raw)


def test_fp8_to_int8_logs_its_weight_error(tmp_path, caplog):
    ck = make_tiny_checkpoint(tmp_path / "fp8", QUANT_TINY_OVERRIDES, weight_format="fp8_block")
    with caplog.at_level(logging.WARNING, logger="model.loader"):
        m = load_model(ck, backend="cpu", weight_format="int8")
    assert m.layers[1].mlp.w13.format == "int8"
    lines = [r.getMessage() for r in caplog.records if "weight format changed" in r.getMessage()]
    assert len(lines) == 1 and "fp8_block weights requantized to int8 (relative weight error: " in lines[0], lines
    err = float(lines[0].split("relative weight error: ")[1].split(" ")[0])
    assert 1e-3 < err < 5e-2  # measured, not a placeholder


def test_unquantized_format_chooses_the_dtype(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "f")
    m = load_model(ck, backend="cpu", weight_format="bf16")  # default dtype: the format's, not fp32
    assert m.weight_format == "bf16" and m.layers[0].attn.q_a_proj.dtype == torch.bfloat16
