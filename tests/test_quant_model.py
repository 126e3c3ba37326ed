"""Quantized weights end to end on tiny checkpoints: quality against the same checkpoint dequantized
to fp32, resident bytes (planned == measured, <= 0.55x bf16), format choice and conversion at load,
modules_to_not_convert, and bad checkpoints / formats failing in one line (exit 2 from the CLIs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hwlayer.backend import Backend
from hwlayer.ops.quant import QuantizedWeight, dequantize_weight, quantize_weight
from model import CheckpointError, ConfigError, load_model
from model.config import ModelConfig
from model.generate import generate, score
from model.loader import load_state, planned_weight_bytes, resident_weight_bytes, resolve_weight_format
from model.tiny import QUANT_TINY_OVERRIDES, make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("fp8_block", "int8")
# Measured on these checkpoints and prompts (seeded, deterministic): fp8_block KL 0.071, top-1 0.625;
# int8 KL 0.030, top-1 0.896 (docs/benchmarks.md). The tiny random model is chaotic -- near-uniform logits (std 0.9),
# discrete expert routing and DSA top-k selection that a small perturbation flips -- so these are
# loose upper bounds on a real model's loss; a wrong scale axis or rounding gives KL > 1.
QUALITY = {"fp8_block": {"kl": 0.15, "top1": 0.5}, "int8": {"kl": 0.06, "top1": 0.8}}
MARGIN = 1.0  # fp32 top-1 over top-2 logit margin above which greedy must agree


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    out = {fmt: make_tiny_checkpoint(root / fmt, QUANT_TINY_OVERRIDES, weight_format=fmt) for fmt in FORMATS}
    out["float"] = make_tiny_checkpoint(root / "float", QUANT_TINY_OVERRIDES)
    return out


def _ids() -> torch.Tensor:
    return torch.randint(20, 500, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_logits_close_to_dequantized_fp32(ckpts, fmt):
    q = load_model(ckpts[fmt], backend="cpu")  # None: the checkpoint's own format, which cpu runs
    ref = load_model(ckpts[fmt], backend="cpu", weight_format="fp32")  # same weights, dequantized at load
    assert q.weight_format == fmt and ref.weight_format == "fp32"
    assert isinstance(q.layers[1].mlp.w13, QuantizedWeight) and q.layers[1].mlp.w13.format == fmt
    assert isinstance(ref.layers[1].mlp.w13, torch.Tensor)
    prompt = generate(ref, _ids()[:, :8], max_new_tokens=16)  # the fp32 greedy continuation, teacher-forced
    a, b = score(q, prompt), score(ref, prompt)
    lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert kl < QUALITY[fmt]["kl"] and top1 >= QUALITY[fmt]["top1"], (fmt, kl, top1)
    # Greedy: wherever fp32's choice is clear by MARGIN, the quantized model picks the same token.
    top2 = b.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > MARGIN
    assert bool((a.argmax(-1) == b.argmax(-1))[clear].all())
    assert int(clear.sum()) >= 1 or fmt == "int8"  # int8's error is small enough that few are clear-cut


def test_quant_ops_are_what_served_the_model(ckpts):
    import hwlayer

    m = load_model(ckpts["int8"], backend="cpu")
    m.plan = traced = hwlayer.plan("cpu", trace=True)
    for obj in [m, *m.layers, *[layer.attn for layer in m.layers], *[layer.mlp for layer in m.layers]]:
        if hasattr(obj, "plan"):
            obj.plan = traced
    for layer in m.layers:
        if getattr(layer.mlp, "shared", None) is not None:
            layer.mlp.shared.plan = traced
    before = traced.call_counts()  # the traced plan is cached: other tests may have run through it
    score(m, _ids()[:1, :6])
    counts = {key: n - before.get(key, 0) for key, n in traced.call_counts().items()}
    assert counts.get(("quant_linear", "generic"), 0) > 0
    assert counts.get(("quant_fused_experts", "generic"), 0) == 2  # the two MoE layers
    assert counts.get(("fused_experts", "generic"), 0) == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_resident_bytes_match_the_plan_and_halve_bf16(ckpts, fmt):
    bf16 = load_model(ckpts[fmt], backend="cpu", dtype="bf16", weight_format="bf16")
    q = load_model(ckpts[fmt], backend="cpu", dtype="bf16")
    cfg = q.config
    for model, f in ((bf16, "bf16"), (q, fmt)):
        planned = planned_weight_bytes(cfg, f, torch.bfloat16)
        assert resident_weight_bytes(model) == planned["replicated"] + planned["experts"], f
    ratio = resident_weight_bytes(q) / resident_weight_bytes(bf16)
    assert ratio <= 0.55, ratio  # fp8_block 0.530, int8 0.545 on this tiny shape
    w = q.layers[0].attn.q_a_proj
    assert w.data.dtype == (torch.float8_e4m3fn if fmt == "fp8_block" else torch.int8)


def test_fp8_checkpoint_on_an_int8_backend_is_requantized_per_channel(ckpts):
    cfg = ModelConfig.from_json(ckpts["fp8_block"])
    int8_only = Backend(name="int8only", vendor="test", device_type="cpu", dist_backend="gloo",
                        weight_formats=("int8",))
    assert resolve_weight_format(cfg, int8_only, None, torch.bfloat16) == "int8"
    state, _ = load_state(ckpts["fp8_block"], cfg, torch.float32, weight_format="int8")
    raw = load_file(str(ckpts["fp8_block"] / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    fp8 = QuantizedWeight("fp8_block", raw[name], raw[name + "_scale_inv"])
    expected = quantize_weight(dequantize_weight(fp8), "int8")
    assert state[name].format == "int8"
    assert torch.equal(state[name].data, expected.data) and torch.equal(state[name].scale, expected.scale)
    w13 = state["model.layers.1.mlp.experts.w13"]
    assert w13.format == "int8" and w13.scale.shape == (cfg.n_routed_experts, 2 * cfg.moe_intermediate_size)
    # kv_b_proj is absorbed into attention (einsum), never a quant_linear: dequantized at load.
    assert state["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_float_checkpoint_quantized_at_load(ckpts, fmt):
    m = load_model(ckpts["float"], backend="cpu", weight_format=fmt)
    assert m.weight_format == fmt and m.layers[1].mlp.w2.format == fmt
    assert m.embed.dtype == torch.float32 and m.layers[1].mlp.gate.dtype == torch.float32  # stay as stored
    assert load_model(ckpts["float"], backend="cpu").weight_format == "fp32"  # None: unquantized as stored
    planned = planned_weight_bytes(m.config, fmt, torch.float32)
    assert resident_weight_bytes(m) == planned["replicated"] + planned["experts"]


def test_modules_to_not_convert_stay_float(tmp_path):
    skip = ("model.layers.0.mlp", "self_attn.o_proj")
    ck = make_tiny_checkpoint(tmp_path / "partial", QUANT_TINY_OVERRIDES, weight_format="int8", not_convert=skip)
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == list(skip)
    for fmt in ("int8", "fp8_block"):  # kept, or converted from int8 to fp8_block: the float ones stay float
        m = load_model(ck, backend="cpu", weight_format=fmt)
        assert isinstance(m.layers[0].mlp.down, torch.Tensor) and isinstance(m.layers[1].attn.o_proj, torch.Tensor)
        assert isinstance(m.layers[1].attn.q_a_proj, QuantizedWeight) and m.layers[1].attn.q_a_proj.format == fmt
        planned = planned_weight_bytes(m.config, fmt, torch.float32)
        assert resident_weight_bytes(m) == planned["replicated"] + planned["experts"]


def test_hookspec_1_0_backend_runs_unquantized_formats_only():
    old = Backend(name="old", vendor="v", device_type="cpu", dist_backend="gloo")  # no weight_formats: a 1.0 plugin
    assert old.native_weight_formats() == ("bf16", "fp16", "fp32")
    broken = Backend(name="b", vendor="v", device_type="cpu", dist_backend="gloo", weight_formats=lambda: 1 / 0)
    assert broken.native_weight_formats() == ("bf16", "fp16", "fp32")
    cfg = ModelConfig.from_dict(_tiny_raw() | {"quantization_config": {"quant_method": "fp8"}})
    assert resolve_weight_format(cfg, old, None, torch.bfloat16) == "bf16"  # dequantized, as before 1.1
    with pytest.raises(ValueError, match=r"^weight format 'int8' is not run by backend 'old' \(it runs: bf16"):
        resolve_weight_format(cfg, old, "int8", torch.bfloat16)


def _tiny_raw() -> dict:
    from model.tiny import TINY_CONFIG

    return dict(TINY_CONFIG)


# ------------------------------------------------------------------------------------ bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _mutate(src: Path, tmp_path: Path, fn) -> Path:
    out = _copy(src, tmp_path / "bad")
    t = load_file(str(out / "model.safetensors"))
    fn(t)
    save_file(t, str(out / "model.safetensors"))
    return out


O_PROJ = "model.layers.0.self_attn.o_proj.weight"
BAD = {
    "fp8-missing-scale": ("fp8_block", lambda t: t.pop(O_PROJ + "_scale_inv"),
                          rf"model\.safetensors: fp8 tensor '{O_PROJ}' has no '{O_PROJ}_scale_inv' \(expected "
                          r"float32"),
    "fp8-misshaped-scale": ("fp8_block", lambda t: t.__setitem__(O_PROJ + "_scale_inv", torch.ones(2, 2)),
                            rf"model\.safetensors: tensor '{O_PROJ}_scale_inv' has shape \[2, 2\], expected "
                            r"float32 \[1, 1\]"),
    "int8-missing-scale": ("int8", lambda t: t.pop(O_PROJ + "_scale"),
                           rf"model\.safetensors: int8 tensor '{O_PROJ}' has no '{O_PROJ}_scale' \(expected "
                           r"float \[N, 1\]"),
    "int8-misshaped-scale": ("int8", lambda t: t.__setitem__(O_PROJ + "_scale", torch.ones(3, 1)),
                             rf"model\.safetensors: tensor '{O_PROJ}_scale' has shape \[3, 1\], expected float "
                             r"\[128, 1\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scales_one_line(ckpts, tmp_path, case):
    fmt, fn, pattern = BAD[case]
    path = _mutate(ckpts[fmt], tmp_path, fn)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(path, backend="cpu")
    assert "\n" not in str(info.value)


def test_unknown_quant_method_and_format(ckpts, tmp_path):
    out = _copy(ckpts["int8"], tmp_path / "awq")
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(raw | {"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'quantization_config\.quant_method' expected one of "
                                          r"fp8, w8a8_int8, compressed-tensors, got 'awq'"):
        load_model(out, backend="cpu")
    with pytest.raises(ValueError, match=r"^weight format: expected one of fp8_block, int8, w8a8_static, w4a8, "
                                         r"bf16, fp16, fp32, got 'fp4'"):
        load_model(ckpts["int8"], backend="cpu", weight_format="fp4")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_weight_format(ckpts, tmp_path):
    r = _cli("--model", str(ckpts["int8"]), "--prompt", "Hello", "--max-new-tokens", "2", "--backend", "cpu",
             "--weight-format", "fp8_block")
    # int8 -> fp8_block needs I % 128 == 0: QUANT_TINY_OVERRIDES has it, so this loads and runs.
    assert r.returncode == 0, r.stderr
    out = _copy(ckpts["int8"], tmp_path / "awq")
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(raw | {"quantization_config": {"quant_method": "awq"}}))
    for args, needle in (
        (("--model", str(out), "--prompt", "hi", "--backend", "cpu"), "quant_method"),
        (("--model", str(ckpts["int8"]), "--prompt", "hi", "--weight-format", "fp4"), "invalid choice: 'fp4'"),
    ):
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fp8_block_expert_stack_needs_block_aligned_intermediate(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "small", {"n_routed_experts": 8})  # moe_intermediate_size 32
    with pytest.raises(ValueError, match=r"moe_intermediate_size 32 is not a multiple of the 128-row block"):
        load_model(ck, backend="cpu", weight_format="fp8_block")
    assert load_model(ck, backend="cpu", weight_format="int8").layers[1].mlp.w13.format == "int8"


def test_plan_cli_formats_and_device_memory(capsys):
    from model.__main__ import main

    path = Path("/work/shared/reference/glm5-config.json")
    if not path.is_file():  # the same lookup as tests/test_model_loader.py
        path = REPO / "shared" / "reference" / "glm5-config.json"
    path = str(path)
    args = ["plan", "--config", path, "--ep", "8", "--device-memory", "141GiB"]
    assert main([*args, "--weight-format", "fp8_block"]) == 0
    out = capsys.readouterr().out
    gib = float(out.split("weights per rank (ep=8, fp8_block): ")[1].split("= ")[1].split(" GiB")[0])
    assert gib <= 110, out  # the goal: GLM-5 FP8 on one 8 x H200 node
    assert "weights FIT" in out
    assert main([*args, "--weight-format", "bf16"]) == 0
    assert "DO NOT FIT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["plan", "--config", path, "--weight-format", "fp4"])
    assert info.value.code == 2
    assert main(["plan", "--config", path, "--device-memory", "lots"]) == 2
    assert "--device-memory 'lots'" in capsys.readouterr().err


def test_expert_parallel_rank_loads_its_quantized_experts_as_planned(ckpts):
    from hwlayer.distributed import local_expert_range

    cfg = ModelConfig.from_json(ckpts["fp8_block"])
    for fmt in FORMATS:  # fp8_block kept as stored; int8 requantized from it
        state, _ = load_state(ckpts["fp8_block"], cfg, torch.float32,
                              expert_range=local_expert_range(1, 2, cfg.n_routed_experts), weight_format=fmt)
        w13 = state["model.layers.1.mlp.experts.w13"]
        assert w13.format == fmt and w13.shape[0] == cfg.n_routed_experts // 2
        held = sum(v.nbytes if isinstance(v, QuantizedWeight) else v.numel() * v.element_size()
                   for v in state.values())
        planned = planned_weight_bytes(cfg, fmt, torch.float32, ep=2)
        assert held == planned["replicated"] + planned["experts"], fmt


def test_hwlayer_info_lists_weight_formats(capsys):
    from hwlayer.cli import main

    assert main(["info", "--json"]) == 0
    backends = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert backends["cpu"]["weight_formats"] == ["fp8_block", "int8", "w8a8_static", "w4a8", "bf16", "fp16", "fp32"]
    assert backends["ascend"]["weight_formats"] == ["int8", "w8a8_static", "w4a8", "bf16", "fp16", "fp32"]  # no FP8
    assert main(["info"]) == 0
    assert "weight formats: int8, w8a8_static, w4a8, bf16, fp16, fp32" in capsys.readouterr().out


def test_conversion_is_tensor_by_tensor(ckpts, monkeypatch):
    """fp8 -> int8 at load quantizes one checkpoint tensor at a time (never a stack or the model)."""
    import model.loader as loader
    from model.loader import expected_tensors

    seen = []
    real = loader.quantize_weight
    monkeypatch.setattr(loader, "quantize_weight", lambda w, fmt: seen.append(w.numel()) or real(w, fmt))
    cfg = ModelConfig.from_json(ckpts["fp8_block"])
    load_state(ckpts["fp8_block"], cfg, torch.float32, weight_format="int8")
    largest = max(int(torch.Size(s).numel()) for s in expected_tensors(cfg).values())
    assert seen and max(seen) <= largest
    assert len(seen) == sum(1 for n in expected_tensors(cfg) if loader.quantized_in_checkpoint(cfg, n))


def test_generic_quant_ops_read_nothing_on_the_host(monkeypatch):
    """Under FakeTensorMode a device->host read (.tolist(), int(t), bool(t)) raises: the generic
    quant_linear / quant_grouped_gemm (padding rows included) size everything from shapes. Value
    checks (HWLAYER_CHECK=1, on in test suites) read values on purpose: off here, as in serving."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv("HWLAYER_CHECK", raising=False)
    from hwlayer.ops import quant as Q

    weights = [quantize_weight(torch.randn(3, 96, 200) * 0.05, f) for f in FORMATS]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x, sizes = torch.randn(9, 200), mode.from_tensor(torch.tensor([4, 0, 3]))  # 2 padding rows
        for qw in weights:
            fake = QuantizedWeight(qw.format, mode.from_tensor(qw.data), mode.from_tensor(qw.scale))
            assert Q.quant_grouped_gemm(x, fake, sizes).shape == (9, 96)
            assert Q.quant_linear(x, fake[0]).shape == (9, 96)


def test_fp8_gate_and_up_off_the_block_grid_run_as_two_weights(tmp_path):
    """A dense MLP whose gate rows (160) do not end on a 128-row scale block cannot be one fp8 [2I, D]
    weight: it keeps gate and up apart and runs two quant_linear calls, same numbers as fused."""
    ck = make_tiny_checkpoint(tmp_path / "odd", QUANT_TINY_OVERRIDES | {"intermediate_size": 160},
                              weight_format="fp8_block")
    m = load_model(ck, backend="cpu")
    dense = m.layers[0].mlp
    assert isinstance(dense.gate_up, tuple) and all(w.format == "fp8_block" for w in dense.gate_up)
    x = torch.randn(3, m.config.hidden_size)
    gate, up = (dequantize_weight(w) for w in dense.gate_up)
    import hwlayer.ops.quant as Q

    h = m.plan.silu_and_mul(torch.cat([Q.quant_linear(x, dense.gate_up[0]), Q.quant_linear(x, dense.gate_up[1])], -1))
    assert torch.equal(dense(x), Q.quant_linear(h, dense.down))
    assert gate.shape == up.shape == (160, m.config.hidden_size)
    planned = planned_weight_bytes(m.config, "fp8_block", torch.float32)
    assert resident_weight_bytes(m) == planned["replicated"] + planned["experts"]
