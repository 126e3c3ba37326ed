"""Checkpoint loading, config parsing, the tiny default model and the `python -m model` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hwlayer.distributed import local_expert_range
from model import CheckpointError, ConfigError, ModelConfig, load_model
from model.generate import score
from model.loader import load_state
from model.tiny import SPECIAL_TOKENS, ensure_default_model, make_tiny_checkpoint, quantize_fp8_blockwise
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GLM5_CONFIG = Path("/work/shared/reference/glm5-config.json")
if not GLM5_CONFIG.is_file():
    GLM5_CONFIG = ROOT / "shared" / "reference" / "glm5-config.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", {"index_topk": 8})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ loading


def test_sharded_checkpoint_loads_identically(tiny, tmp_path):
    tensors = load_file(str(tiny / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    out = _copy(tiny, tmp_path / "sharded")
    (out / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / fname))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(tiny, backend="cpu"), load_model(out, backend="cpu")
    assert torch.equal(score(a, _ids()), score(b, _ids()))


def test_fp8_block_scaled_checkpoint_is_dequantised(tiny, tmp_path):
    """e4m3 weights + fp32 weight_scale_inv per 128x128 block (a 160-row matrix spans 2 row blocks)."""
    cfg = json.loads((tiny / "config.json").read_text())
    out = make_tiny_checkpoint(tmp_path / "fp8", cfg | {"intermediate_size": 160}, seed=1)
    tensors = load_file(str(out / "model.safetensors"))
    quantised, expected = {}, {}
    for name, t in tensors.items():
        skip = ("embed_tokens", "lm_head", "mlp.gate.weight", "weights_proj")
        if t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip):
            q, s = quantize_fp8_blockwise(t)
            quantised[name], quantised[name + "_scale_inv"] = q, s
            # independent dequantisation: view as blocks and multiply by the block's scale
            N, K = q.shape
            full = torch.zeros(-(-N // 128) * 128, -(-K // 128) * 128)
            full[:N, :K] = q.float()
            blocks = full.view(s.shape[0], 128, s.shape[1], 128) * s[:, None, :, None]
            expected[name] = blocks.view_as(full)[:N, :K]
        else:
            quantised[name] = t
            expected[name] = t
    assert any(v.dtype == torch.float8_e4m3fn for v in quantised.values())
    save_file(quantised, str(out / "model.safetensors"))
    ref_dir = _copy(out, tmp_path / "dequantised")
    save_file({k: v.contiguous() for k, v in expected.items()}, str(ref_dir / "model.safetensors"))

    cfg_obj = ModelConfig.from_json(out)
    state, _ = load_state(out, cfg_obj, torch.float32)
    name = "model.layers.0.mlp.gate_proj.weight"  # [160, 64]: two row blocks
    assert torch.equal(state[name], expected[name])
    assert (state[name] - tensors[name]).abs().max() < 0.1 * tensors[name].abs().max()  # close to the original
    a, b = load_model(out, backend="cpu"), load_model(ref_dir, backend="cpu")
    assert torch.equal(score(a, _ids()), score(b, _ids()))


def test_expert_range_loads_only_owned_experts(tiny):
    cfg = ModelConfig.from_json(tiny)
    full, _ = load_state(tiny, cfg, torch.float32)
    part, _ = load_state(tiny, cfg, torch.float32, expert_range=local_expert_range(1, 2, cfg.n_routed_experts))
    key = "model.layers.1.mlp.experts.w13"
    assert part[key].shape[0] == 4
    assert torch.equal(part[key], full[key][4:8])
    assert torch.equal(part["model.layers.2.mlp.experts.w2"], full["model.layers.2.mlp.experts.w2"][4:8])
    # w13 = gate rows then up rows of each HF expert
    raw = load_file(str(tiny / "model.safetensors"))
    inter = cfg.moe_intermediate_size
    assert torch.equal(full[key][5, :inter], raw["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(full[key][5, inter:], raw["model.layers.1.mlp.experts.5.up_proj.weight"])


def test_bf16_load_converts_dtype_but_keeps_router_fp32(tiny):
    m = load_model(tiny, backend="cpu", dtype="bf16")
    assert m.embed.dtype == torch.bfloat16 and m.layers[1].mlp.w13.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.dtype == torch.float32
    assert m.new_cache(2, 16).kv[0].dtype == torch.bfloat16
    assert score(m, _ids()).dtype == torch.float32


# ------------------------------------------------------------------------------- bad checkpoints


def _mutate(tiny: Path, tmp_path: Path, fn) -> Path:
    out = _copy(tiny, tmp_path / "bad")
    t = load_file(str(out / "model.safetensors"))
    fn(t)
    save_file(t, str(out / "model.safetensors"))
    return out


BAD_TENSORS = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
                r"model\.safetensors\S*: missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"),
    "unexpected": (lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)),
                   r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"),
    "wrong_shape": (lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 63)),
                    r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has shape \[64, 63\], "
                    r"expected \[64, 64\]"),
    "bad_dtype": (lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)),
                  r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32, expected a float weight"),
    "fp8_without_scale": (lambda t: t.__setitem__("model.norm.weight", torch.ones(64).to(torch.float8_e4m3fn)),
                          r"tensor 'model\.norm\.weight' is stored quantized \(fp8_block\), expected a 2-D weight"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_checkpoint_one_line_error(tiny, tmp_path, case):
    fn, pattern = BAD_TENSORS[case]
    path = _mutate(tiny, tmp_path, fn)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(path, backend="cpu")
    assert "\n" not in str(info.value)


def test_missing_mtp_tensor_when_mtp_present(tiny, tmp_path):
    path = _mutate(tiny, tmp_path, lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\.eh_proj\.weight'"):
        load_model(path, backend="cpu")


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_truncated_or_corrupt_file(tiny, tmp_path, cut):
    out = _copy(tiny, tmp_path / cut)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if cut == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file") as info:
        load_model(out, backend="cpu")
    assert "\n" not in str(info.value)


def test_pickle_only_and_empty_dirs(tiny, tmp_path):
    out = tmp_path / "pickle"
    out.mkdir()
    shutil.copy(tiny / "config.json", out / "config.json")
    (out / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are supported"):
        load_model(out, backend="cpu")
    (out / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(out, backend="cpu")


def test_index_pointing_at_missing_shard(tiny, tmp_path):
    out = _copy(tiny, tmp_path / "idx")
    index = {"weight_map": {"lm_head.weight": "nope.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'lm_head\.weight' maps to missing file"):
        load_model(out, backend="cpu")


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "deepseek_v3"}, r"config\.json: field 'model_type' expected 'glm_moe_dsa', got 'deepseek_v3'"),
    ({"kv_lora_rank": None}, r"config\.json: missing required field 'kv_lora_rank'"),
    ({"n_group": 3}, r"config\.json: field 'n_group' expected a divisor of n_routed_experts \(8\)"),
    ({"index_topk_pattern": "FXF"}, r"field 'index_topk_pattern' expected a string of 'F' and 'S'"),
    ({"index_topk_pattern": "SFF"}, r"expected layer 0 to be 'full'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"'rope_parameters\.rope_type' expected"),
    ({"hidden_size": "64"}, r"field 'hidden_size' expected an integer >= 1, got '64'"),
])
def test_bad_config_one_line_error(tiny, tmp_path, change, pattern):
    out = _copy(tiny, tmp_path / "cfg")
    raw = json.loads((out / "config.json").read_text()) | change
    raw = {k: v for k, v in raw.items() if v is not None}
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=pattern) as info:
        load_model(out, backend="cpu")
    assert "\n" not in str(info.value) and str(out / "config.json") in str(info.value)


@pytest.mark.parametrize("extra", [
    {},
    {"index_topk_freq": 2, "index_skip_topk_offset": 1},
    {"index_topk_freq": 3},
    {"index_topk_pattern": "FFSSF"},
    {"indexer_types": ["full", "shared", "shared", "full", "full"]},
    {"mlp_layer_types": ["dense", "sparse", "dense", "sparse", "sparse"]},
])
def test_indexshare_and_mlp_kinds_match_transformers(extra):
    transformers = pytest.importorskip("transformers")
    base = {"model_type": "glm_moe_dsa", "num_hidden_layers": 5, "first_k_dense_replace": 2, "vocab_size": 32,
            "hidden_size": 16, "num_attention_heads": 2, "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
            "qk_rope_head_dim": 4, "v_head_dim": 4, "index_head_dim": 8, "intermediate_size": 8,
            "moe_intermediate_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    hf = transformers.GlmMoeDsaConfig(**{k: v for k, v in (base | extra).items() if k != "model_type"})
    ours = ModelConfig.from_dict(base | extra)
    assert ours.indexer_types == list(hf.indexer_types)
    assert ours.mlp_layer_types == list(hf.mlp_layer_types)


def test_real_glm5_config_parses():
    cfg = ModelConfig.from_json(GLM5_CONFIG)
    assert cfg.eos_token_ids == [154820, 154827, 154829]
    assert cfg.first_k_dense_replace == 3 and cfg.indexer_types == ["full"] * 78
    assert cfg.softmax_scale == pytest.approx(256**-0.5)


# ----------------------------------------------------------------------------------- expert parallel


def test_ep_argument_errors(tiny):
    with pytest.raises(ValueError, match=r"ep=3 must divide n_routed_experts \(8\)"):
        load_model(tiny, backend="cpu", ep=3)
    import torch.distributed as dist

    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="ep=2 needs an initialised torch.distributed default group"):
            load_model(tiny, backend="cpu", ep=2)


# -------------------------------------------------------------------------------- tiny default model


def test_ensure_default_model_creates_once_and_is_deterministic(tmp_path):
    p = ensure_default_model(tmp_path)
    assert p == tmp_path / "models" / "glm5-tiny-random"
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == p and (p / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [x for x in (tmp_path / "models").iterdir() if x.name.startswith(".")]  # no temp dirs left
    other = make_tiny_checkpoint(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (p / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (p / "tokenizer.json").read_bytes()

    tok = load_tokenizer(p)
    for s in SPECIAL_TOKENS:
        assert tok.token_to_id(s) is not None, s
    enc = tok.encode("[gMASK]<sop><|user|>Hello, world!<|assistant|><think>")
    assert enc.tokens[:3] == ["[gMASK]", "<sop>", "<|user|>"]
    assert tok.decode(tok.encode("Hello, wörld!").ids) == "Hello, wörld!"  # byte-level round trip
    cfg = ModelConfig.from_json(p)
    assert tok.get_vocab_size() <= cfg.vocab_size
    assert tok.token_to_id("<|endoftext|>") in cfg.eos_token_ids and tok.token_to_id("<|user|>") in cfg.eos_token_ids
    assert "chat_template" in json.loads((p / "tokenizer_config.json").read_text())
    assert json.loads((p / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_ids
    m = load_model(p, backend="cpu")
    assert m.mtp is not None and m.kv_bytes_per_token() == 4 * (4 * (32 + 8 + 16))


def test_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HWLAYER_CACHE", str(tmp_path / "c"))
    assert ensure_default_model() == tmp_path / "c" / "models" / "glm5-tiny-random"


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from model.__main__ import main

    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_cli_on_real_glm5_config(capsys):
    rc, out, err = _main(capsys, "plan", "--config", str(GLM5_CONFIG), "--ep", "8")
    assert rc == 0, err
    assert "= 704 values" in out and "512 latent + 64 rope + 128 indexer key" in out
    assert "weights per rank (ep=8, bf16)" in out
    assert "54912 values" in out  # 78 layers x 704
    rc, out, _ = _main(capsys, "plan", "--config", str(GLM5_CONFIG), "--ep", "8", "--dtype", "fp8")
    assert rc == 0 and "fp8 scales" in out


@pytest.mark.parametrize("args,needle", [
    (("plan", "--config", str(GLM5_CONFIG), "--ep", "3"), "--ep 3 must be >= 1 and divide n_routed_experts (256)"),
    (("plan", "--config", "/nonexistent/config.json"), "no such file"),
    (("plan", "--config", str(GLM5_CONFIG), "--dtype", "fp4"), "invalid choice: 'fp4'"),
    (("--model", "/nonexistent", "--prompt", "hi"), "no such directory"),
])
def test_cli_bad_args_exit_2_one_line(capsys, args, needle):
    rc, _, err = _main(capsys, *args)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_generate_cli_subprocess(tiny):
    r = _cli("--model", str(tiny), "--prompt", "Hello world", "--max-new-tokens", "5", "--backend", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_speculative_cli_reports_acceptance_rate(capsys, tiny):
    rc, out, err = _main(capsys, "--model", str(tiny), "--prompt", "Hello world", "--max-new-tokens", "4",
                         "--backend", "cpu", "--speculative")
    assert rc == 0, err
    assert out.strip() and "[MTP acceptance rate: " in err


def test_speculative_cli_without_mtp_exits_2_one_line(capsys, tmp_path):
    path = make_tiny_checkpoint(tmp_path / "no-mtp", {"num_nextn_predict_layers": 0})
    rc, _, err = _main(capsys, "--model", str(path), "--prompt", "hi", "--backend", "cpu", "--speculative")
    assert rc == 2
    assert "speculative decoding needs an MTP layer" in err and len(err.strip().splitlines()) == 1, err


def test_default_model_written_by_an_older_hwlayer_is_rebuilt(tmp_path):
    """A cached glm5-tiny-random without this revision's stamp (an older template, tokenizer or config) is
    replaced, not served; a current one is reused as is."""
    from model.tiny import DEFAULT_MODEL_REVISION, REVISION_FILE, ensure_default_model

    path = ensure_default_model(cache_dir=tmp_path)
    (path / REVISION_FILE).unlink()
    (path / "left-by-old-version").write_text("x")
    again = ensure_default_model(cache_dir=tmp_path)
    assert again == path and (path / REVISION_FILE).read_text() == DEFAULT_MODEL_REVISION
    assert not (path / "left-by-old-version").exists()
    (path / "kept").write_text("x")
    assert ensure_default_model(cache_dir=tmp_path) == path and (path / "kept").exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
