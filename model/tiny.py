"""Deterministic tiny GLM-5-architecture checkpoints (random weights; the output is noise).

Written without transformers: torch init -> safetensors in the real HF per-expert layout, a
byte-level BPE tokenizer.json trained with the `tokenizers` library on a fixed corpus plus the GLM
special tokens, tokenizer_config.json (with a chat template) and generation_config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .chat_template import GLM_CHAT_TEMPLATE
from .config import ModelConfig, _prefix_match
from .loader import FP8_BLOCK, SCALE_SUFFIX, expected_tensors, is_linear_weight, module_of

DEFAULT_MODEL_NAME = "glm5-tiny-random"
# Bump when what make_tiny_checkpoint writes changes (template, tokenizer, config): cached copies are rebuilt.
DEFAULT_MODEL_REVISION = "2"
REVISION_FILE = ".hwlayer-revision"
SPECIAL_TOKENS = [
    "<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "<tool_response>", "</tool_response>",
]
TINY_VOCAB = 512

# Small enough that the CPU serves it in milliseconds per token, shaped like GLM-5: first layer
# dense, MoE with grouped routing, DSA with index_topk below typical prompt lengths, one MTP layer.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 8,
    "index_n_heads": 8,
    "index_head_dim": 16,
    "index_topk": 16,
    "indexer_rope_interleave": True,
    "rope_interleave": True,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 128,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "routed_scaling_factor": 2.5,
    "n_group": 2,
    "topk_group": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "dtype": "float32",
    "initializer_range": 0.02,
}

CHAT_TEMPLATE = GLM_CHAT_TEMPLATE  # the full GLM template: tools, thinking, observations

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, world! This is a tiny random model used to test
the hwlayer serving stack. It speaks noise, but it speaks it deterministically. Tokens, layers, experts,
attention, cache, prefill, decode, sparse indexer, latent attention, mixture of experts, rotary position.
def main():\n    print("hello")\n    return 0\n{"name": "get_weather", "arguments": {"city": "Paris"}}
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions? Answers! The user asks and the assistant answers.
"""


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A deterministic byte-level BPE: the 256 byte symbols, GLM special tokens and merges learnt
    from a fixed corpus, ``vocab_size`` entries in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def _init_tensors(cfg: ModelConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(cfg, with_mtp=True).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.contiguous()
    return out


# The tiny model for quantized tests: fp8_block expert stacks need I a multiple of the 128-row scale
# block (gate and up rows share one [2I, D] stack; GLM-5: I = 2048), and the linear weights must
# outweigh the float embeddings / lm_head / norms as in the real model (tiny: 0.53x (fp8) and
# 0.55x (int8) of the bf16 bytes; GLM-5: about 0.5x).
QUANT_TINY_OVERRIDES: dict[str, Any] = {"moe_intermediate_size": 128, "hidden_size": 128, "n_routed_experts": 16}
# The checkpoint's quantization_config per format (the keys the real checkpoints use).
QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8_block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
    "int8": {"quant_method": "w8a8_int8", "activation_scheme": "dynamic"},
}


def quantize_checkpoint(tensors: dict[str, torch.Tensor], weight_format: str,
                        not_convert: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Quantize a float checkpoint's linear weights and ``kv_b_proj`` the way the published
    checkpoints store them: ``fp8_block`` -> e4m3 + ``weight_scale_inv`` per 128x128 block;
    ``int8`` -> int8 + ``weight_scale`` ``[N, 1]``. Modules matching ``not_convert`` stay float."""
    from hwlayer.ops.quant import quantize_weight

    out = {}
    for name, t in tensors.items():
        module = module_of(name)
        keep_float = any(_prefix_match(module, m) for m in not_convert)
        if (is_linear_weight(name) or name.endswith("kv_b_proj.weight")) and not keep_float:
            q = quantize_weight(t, weight_format)
            out[name] = q.data
            out[name + SCALE_SUFFIX[weight_format]] = q.scale if weight_format == "fp8_block" else q.scale[:, None]
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def make_tiny_checkpoint(path: str | Path, config_overrides: dict[str, Any] | None = None, seed: int = 0,
                         dtype: torch.dtype = torch.float32, std: float = 0.08, weight_format: str | None = None,
                         not_convert: tuple[str, ...] = ()) -> Path:
    """Write a deterministic tiny glm_moe_dsa checkpoint into ``path`` (created; files overwritten).

    ``weight_format`` ``"fp8_block"`` / ``"int8"``: the same random weights, quantized (see
    :func:`quantize_checkpoint`) with a matching ``quantization_config`` in config.json, its
    ``modules_to_not_convert`` = ``not_convert``. fp8_block needs :data:`QUANT_TINY_OVERRIDES`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(TINY_CONFIG) | dict(config_overrides or {})
    tok = build_tokenizer()
    specials = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    raw.setdefault("eos_token_id", [specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]])
    raw.setdefault("pad_token_id", specials["<|endoftext|>"])
    raw.setdefault("bos_token_id", None)
    cfg = ModelConfig.from_dict(raw, source=str(path / "config.json"))
    if cfg.vocab_size < tok.get_vocab_size():
        raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()}")
    tensors = {k: v.to(dtype) for k, v in _init_tensors(cfg, seed, std).items()}
    if weight_format is not None:
        if weight_format not in QUANT_CONFIGS:
            raise ValueError(f"weight_format: expected one of {', '.join(QUANT_CONFIGS)}, got {weight_format!r}")
        tensors = quantize_checkpoint(tensors, weight_format, not_convert)
        raw["quantization_config"] = QUANT_CONFIGS[weight_format] | (
            {"modules_to_not_convert": list(not_convert)} if not_convert else {})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": cfg.max_position_embeddings,
    }, indent=2))
    (path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": cfg.eos_token_ids, "pad_token_id": raw["pad_token_id"], "do_sample": False,
    }, indent=2))
    return path


def quantize_fp8_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (e4m3 weights, fp32 ``weight_scale_inv [ceil(N/128), ceil(K/128)]``), one scale
    per 128x128 block (the GLM-5-FP8 / DeepSeek-V3 layout): ``w ~= w_fp8 * scale_inv[block]``."""
    N, K = w.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    padded = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK, dtype=torch.float32)
    padded[:N, :K] = w.float()
    blocks = padded.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:N, :K].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()


def default_cache_dir() -> Path:
    return Path(os.environ.get("HWLAYER_CACHE") or Path.home() / ".cache" / "hwlayer")


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """The ``glm5-tiny-random`` checkpoint under ``<cache>/models/``, created on first use (written to a
    temp dir, then renamed into place, so a concurrent or interrupted creation never leaves half a model)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / DEFAULT_MODEL_NAME
    stamp = target / REVISION_FILE
    if (target / "model.safetensors").is_file() and stamp.is_file() and stamp.read_text() == DEFAULT_MODEL_REVISION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # written by an older hwlayer (another chat template, tokenizer or config): replace it
        stale = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-stale-", dir=target.parent))
        try:
            os.rename(target, stale / "old")
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp)
        (tmp / REVISION_FILE).write_text(DEFAULT_MODEL_REVISION)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------
# msmodelslim (Ascend/msmodelslim@3de0a3c4) and compressed-tensors layouts of the same tiny model
#
# The GLM-5 W8A8 recipe (msmodelslim@3de0a3c4 lab_practice/glm_5/glm_5_w8a8.yaml) runs, in order:
# ``quarot`` (export_extra_info), ``flex_smooth_quant`` on the ``norm-linear`` and ``ov`` subgraphs,
# then ``linear_quant``: ``*self_attn*`` except kv_b_proj / wk / weights_proj static W8A8 (activations
# per-tensor asymmetric ``minmax``, weights per-channel symmetric ``minmax``), ``*mlp*`` except the
# router ``*gate`` W8A8_DYNAMIC (per-token symmetric activations), everything else float.
# make_msmodelslim_checkpoint follows those steps; the W4A8 recipe's (quarot, flex_awq_ssz, ssz
# int4 weights) are not reproduced: its tiny checkpoint is the recipe's quant types on unprocessed
# weights (model/loader.py msmodelslim_recipe).

RECIPE_PROCESSES: dict[str, tuple[str, ...]] = {"w8a8": ("quarot", "flex_smooth_quant"), "w4a8": ()}
QUAROT_SEED = 1234  # create_rot seeds every rotation with seed_all(1234) (processor/quarot/common/quarot_utils.py)
STATIC_ATTRS = {"q_a_proj.weight": "q_a_proj", "q_b_proj.weight": "q_b_proj", "kv_a_proj_with_mqa.weight": "kv_a_proj",
                "o_proj.weight": "o_proj", "indexer.wq_b.weight": "wq_b"}  # checkpoint suffix -> Attention attr


def _hadamard(n: int) -> torch.Tensor:
    """msmodelslim's ``random_hadamard_matrix(n)`` under ``create_rot``'s seed (msmodelslim@3de0a3c4
    ``processor/quarot/common/hadamard.py``): ``diag(random +-1) @ H_n / sqrt(n)`` with the Sylvester
    ``H_n`` its fast Walsh-Hadamard transform produces (checked equal to it). float64, powers of two
    only (the tiny model's sizes; msmodelslim also has 12 * 2^k, 20 * 2^k, ... tables)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"quarot: Hadamard size must be a power of two here, got {n}")
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(QUAROT_SEED)).double() * 2 - 1
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return signs[:, None] * h / n**0.5


def _block_hadamard_shifted(n: int, block: int = 32, shift: int = 16) -> torch.Tensor:
    """``create_rot(BLOCK_HADAMARD_SHIFTED)`` (rot_step 1, block_size -1 -> 32): ``R @ P @ R``, ``R``
    the block-diagonal of ``block``-size Hadamards, ``P`` the cyclic shift of the columns by 16."""
    if n % block:
        raise ValueError(f"quarot: block Hadamard size {n} is not a multiple of {block}")
    r = torch.block_diag(*[_hadamard(block)] * (n // block))
    eye = torch.eye(n, dtype=torch.float64)
    return r @ torch.cat([eye[:, -shift:], eye[:, :-shift]], 1) @ r


def quarot_glm5(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """msmodelslim's offline QuaRot for GLM-5, fused into the float ``tensors`` in place (msmodelslim@3de0a3c4
    ``model/glm_5/quarot.py`` ``get_ln_fuse_map`` / ``get_rotate_map`` with ``model_adapter.py``'s
    indexer additions; ``processor/quarot/common/quarot_utils.py`` ``fuse_ln_linear`` /
    ``rotate_linear``): every RMSNorm weight is folded into the linears it feeds and set to 1, then
    ``rot`` (Hadamard, hidden size) turns the residual stream (embedding, lm_head, q_a / kv_a / wk /
    weights_proj / MLP / router inputs, o_proj / down_proj outputs, the MTP eh_proj), ``rot_b_proj``
    (shifted block Hadamard) the q_a -> q_b / indexer wq_b latent, ``rot_uv`` (Hadamard, v_head_dim,
    per head) the kv_b_proj value rows -> o_proj input, ``rot_kv_b_proj`` the kv_a -> kv_b latent.
    The float model is unchanged (RMSNorm commutes with an orthogonal rotation). The MTP layer gets
    its own embed_tokens / shared_head.head copies, as msmodelslim's MTP wrapper saves them.
    Returns (global rotation ``Q``, ``rot.weight = Q^T diag(model.norm) Q``: ``ascendv1_save_postprocess``)."""
    D, dn, dv, dl, dr = (cfg.hidden_size, cfg.qk_nope_head_dim, cfg.v_head_dim,
                         cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    rot, rot_b, rot_uv, rot_kv = (_hadamard(D), _block_hadamard_shifted(cfg.q_lora_rank), _hadamard(dv),
                                  _hadamard(dl))
    dtypes = {k: v.dtype for k, v in tensors.items()}
    t = {k: v.double() for k, v in tensors.items()}
    n_all = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    mtp = [f"model.layers.{i}." for i in range(cfg.num_hidden_layers, n_all)]
    for p in mtp:  # the MTP layer's own copies (glm_5/model_adapter.py get_mtp_layer)
        for own, shared in (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight",
                                                                                    "lm_head.weight")):
            if p + own not in t:
                t[p + own], dtypes[p + own] = t[shared].clone(), dtypes[shared]
    rot_weight = rot.T @ torch.diag(t["model.norm.weight"]) @ rot

    def fuse(norms: list[str], linears: list[str]) -> None:
        ln = torch.cat([t[n] for n in norms])
        for name in linears:
            if name in t:
                t[name] = t[name] * ln
        for n in norms:
            t[n] = torch.ones_like(t[n])

    def turn(name: str, r: torch.Tensor, right: bool) -> None:
        if name not in t:
            return
        dim = t[name].shape[1 if right else 0]
        full = torch.block_diag(*[r] * (dim // r.shape[0]))  # rotate_linear's automatic block diagonal
        t[name] = t[name] @ full if right else full.T @ t[name]

    def mlp_modules(p: str) -> list[str]:
        if p + "mlp.gate_proj.weight" in t:
            return [p + "mlp."]
        return [f"{p}mlp.experts.{e}." for e in range(cfg.n_routed_experts)] + [p + "mlp.shared_experts."]

    # fuse_ln_linear first (the processor fuses, then rotates)
    for i in range(n_all):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        fuse([p + "input_layernorm.weight"], [a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight",
                                              a + "indexer.wk.weight", a + "indexer.weights_proj.weight"])
        fuse([a + "q_a_layernorm.weight"], [a + "q_b_proj.weight", a + "indexer.wq_b.weight"])
        fuse([a + "kv_a_layernorm.weight"], [a + "kv_b_proj.weight"])
        fuse([p + "post_attention_layernorm.weight"],
             [m + w for m in mlp_modules(p) for w in ("gate_proj.weight", "up_proj.weight")] + [p + "mlp.gate.weight"])
    fuse(["model.norm.weight"], ["lm_head.weight"])
    for p in mtp:
        fuse([p + "enorm.weight", p + "hnorm.weight"], [p + "eh_proj.weight"])
        fuse([p + "shared_head.norm.weight"], [p + "shared_head.head.weight"])
    # then the rotation pairs
    turn("model.embed_tokens.weight", rot, True)
    turn("lm_head.weight", rot, True)
    for i in range(n_all):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        for name in ("q_a_proj", "kv_a_proj_with_mqa", "indexer.wk", "indexer.weights_proj"):
            turn(a + name + ".weight", rot, True)
        turn(a + "o_proj.weight", rot, False)
        for m in mlp_modules(p):
            turn(m + "gate_proj.weight", rot, True)
            turn(m + "up_proj.weight", rot, True)
            turn(m + "down_proj.weight", rot, False)
        turn(p + "mlp.gate.weight", rot, True)
        turn(a + "q_a_proj.weight", rot_b, False)
        turn(a + "q_b_proj.weight", rot_b, True)
        turn(a + "indexer.wq_b.weight", rot_b, True)
        turn(a + "kv_b_proj.weight", torch.block_diag(torch.eye(dn, dtype=torch.float64), rot_uv), False)
        turn(a + "o_proj.weight", rot_uv, True)
        turn(a + "kv_a_proj_with_mqa.weight", torch.block_diag(rot_kv, torch.eye(dr, dtype=torch.float64)), False)
        turn(a + "kv_b_proj.weight", rot_kv, True)
    for p in mtp:
        turn(p + "embed_tokens.weight", rot, True)
        turn(p + "eh_proj.weight", torch.block_diag(rot, rot), True)
        turn(p + "eh_proj.weight", rot, False)
        turn(p + "shared_head.head.weight", rot, True)
    for k, v in t.items():
        tensors[k] = v.to(dtypes[k])
    return rot.float(), rot_weight.to(dtypes["model.norm.weight"])


def _record_attention_inputs(path: Path, prompts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every attention projection's input activations ``[tokens, K]`` (fp32) when the float
    checkpoint at ``path`` scores ``prompts``: what msmodelslim's calibration hooks see (its flex
    smooth stats collector and the ``minmax`` observers). Layers the prompts never reach (the MTP
    layer: ``score`` does not run it) are absent."""
    from . import glm5, load_model
    from .generate import score

    model = load_model(path, backend="cpu", weight_format="fp32")
    seen: dict[int, list[torch.Tensor]] = {}
    original = glm5.linear

    def recording_linear(plan, x, w):
        seen.setdefault(id(w), []).append(x.reshape(-1, x.shape[-1]).float().clone())
        return original(plan, x, w)

    glm5.linear = recording_linear  # the network's one linear call (hwlayer.ops.quant.linear)
    try:
        score(model, prompts)
    finally:
        glm5.linear = original
    out = {}
    for i, layer in enumerate(model.layers):  # the model holds the loaded tensors themselves
        for suffix, attr in STATIC_ATTRS.items():
            w = getattr(layer.attn, attr, None)
            if w is not None and id(w) in seen:
                out[f"model.layers.{i}.self_attn.{suffix}"] = torch.cat(seen[id(w)])
    return out


def _int8sym(x: torch.Tensor) -> torch.Tensor:
    """alpha_beta_search.py ``quant_int8sym``: per-row symmetric int8 round trip."""
    step = x.abs().amax(-1, keepdim=True) / 127
    return (x / step).round().clamp(-127, 127) * step


def _flex_error(act: torch.Tensor, w: torch.Tensor, alpha: float, beta: float) -> float:
    """``FlexSmoothAlphaBetaSearcher.evaluate_alpha_beta`` (act_sym=True): relative RMS error of the
    int8 (per-token activations, per-row weights) product after smoothing with ``alpha, beta``."""
    golden = act @ w.T
    s = act.abs().amax(0, keepdim=True) ** alpha * w.abs().amax(0, keepdim=True) ** (-beta)
    out = _int8sym(act / s) @ _int8sym(w * s).T
    return float((out - golden).pow(2).mean().sqrt() / golden.pow(2).mean().sqrt())


def flex_smooth_search(act: torch.Tensor, w: torch.Tensor, step: float = 0.05) -> tuple[float, float]:
    """``FlexSmoothAlphaBetaSearcher.search_alpha_beta`` (msmodelslim@3de0a3c4
    ``processor/anti_outlier/flex_smooth/alpha_beta_search.py``, as ``api.py``
    ``get_optimal_alpha_beta_flex_smooth`` calls it when the recipe gives no alpha / beta): alpha
    over 0, 0.05, .., 1 with beta = 1 - alpha, then beta over the same grid at that alpha; ties go
    to the later value (``<=``)."""
    grid = [round(i * step, 2) for i in range(int(round(1 / step)) + 1)]
    best_a, best = 0.0, float("inf")
    for a in grid:
        e = _flex_error(act, w, a, 1.0 - a)
        if e <= best:
            best_a, best = a, e
    best_b = 0.0
    for b in grid:
        e = _flex_error(act, w, best_a, b)
        if e <= best:
            best_b, best = b, e
    return best_a, best_b


def flex_smooth_quant(tensors: dict[str, torch.Tensor], cfg: ModelConfig, acts: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """msmodelslim's ``flex_smooth_quant`` on GLM-5's ``norm-linear`` and ``ov`` subgraphs (the W8A8
    recipe's ``enable_subgraph_type``), fused into the float ``tensors`` in place (msmodelslim@3de0a3c4
    ``processor/anti_outlier/flex_smooth/api.py``, ``common/scale_computation.py``
    ``FlexSmoothScaleCalculator`` / ``compute_multi_weight_scale``, ``common/subgraph_fusion.py``;
    subgraphs from ``model/glm_5/model_adapter.py`` ``get_adapter_config_for_subgraph``):
    input_layernorm -> q_a_proj, kv_a_proj_with_mqa, indexer.wk, indexer.weights_proj;
    q_a_layernorm -> q_b_proj, indexer.wq_b; kv_b_proj (value rows) -> o_proj (``group_method``
    max; one KV group per head here). Per subgraph: (alpha, beta) from :func:`flex_smooth_search`
    on the calibration activations and the stacked consumer weights, ``s = amax|x|^alpha /
    amax|W|^beta`` (clamped at 1e-5), the producer divided by ``s`` and every consumer's columns
    multiplied by it. Returns ``s`` per static weight (its input is now ``x / s``). Subgraphs
    without calibration activations (the MTP layer) are left alone."""
    H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    scales: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        subgraphs = [(p + "input_layernorm.weight", [a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight",
                                                     a + "indexer.wk.weight", a + "indexer.weights_proj.weight"]),
                     (a + "q_a_layernorm.weight", [a + "q_b_proj.weight", a + "indexer.wq_b.weight"]),
                     (None, [a + "o_proj.weight"])]  # ov: the producer is kv_b_proj's value rows
        for producer, consumers in subgraphs:
            consumers = [c for c in consumers if c in tensors]
            if consumers[0] not in acts:
                continue
            act = acts[consumers[0]]
            ws = [tensors[c].float() for c in consumers]
            alpha, beta = flex_smooth_search(act, torch.cat(ws))
            a_scale = act.abs().amax(0)
            w_scale = torch.stack([w.abs().amax(0) for w in ws]).amax(0).clamp(min=1e-5)
            s = (a_scale.pow(alpha) / w_scale.pow(beta)).clamp(min=1e-5)
            for c, w in zip(consumers, ws, strict=True):
                tensors[c] = (w * s).to(tensors[c].dtype)
                scales[c] = s
            if producer is not None:
                tensors[producer] = (tensors[producer].float() / s).to(tensors[producer].dtype)
            else:  # kv_b_proj [H*(dn+dv), dl]: value rows of head h are h*(dn+dv)+dn ..; o_proj column h*dv+d
                kv_b = tensors[a + "kv_b_proj.weight"].float().view(H, dn + dv, -1).clone()
                kv_b[:, dn:] /= s.view(H, dv, 1)
                tensors[a + "kv_b_proj.weight"] = kv_b.view(H * (dn + dv), -1).to(tensors[a + "kv_b_proj.weight"].dtype)
    return scales


def static_ranges(names: list[str], acts: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
                  ) -> dict[str, tuple[float, float]]:
    """Per static W8A8 weight: the (min, max) of its input over every calibration token after
    smoothing (``x / s``): msmodelslim's per-tensor ``minmax`` activation observer. A weight the
    calibration never reached (the MTP layer) takes the widest range of the same projection in
    the other layers."""
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        if name in acts:
            x = acts[name] / scales[name] if name in scales else acts[name]
            out[name] = (float(x.min()), float(x.max()))
    for name in names:
        if name in out:
            continue
        proj = name.split(".self_attn.")[1]
        same = [r for n, r in out.items() if n.split(".self_attn.")[1] == proj]
        if not same:
            raise ValueError(f"calibration: no activations reached {name} or its peers")
        out[name] = (min(r[0] for r in same), max(r[1] for r in same))
    return out


def write_msmodelslim(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                      ranges: dict[str, tuple[float, float]] | None = None, shards: int = 2,
                      types: dict[str, str] | None = None,
                      rotation: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write ``tensors`` (a float checkpoint) into ``path`` as msmodelslim's AscendV1 saver does
    (Ascend/msmodelslim@3de0a3c4 ``core/quant_service/modelslim_v1/save/ascendv1.py``
    ``on_w8a8_static`` / ``on_w8a8_dynamic_per_channel`` / ``on_w4a8_dynamic``; ``save/utils/pack.py``
    ``w4a8_pack_int4``, ``process_scale``; ``save/utils/safetensors.py`` shard and index names):
    every tensor under its quant type in ``quant_model_description.json`` (with ``version``,
    ``model_quant_type``, ``metadata``, ``group_size``, ``optional``), weights in
    ``quant_model_weights-0000i-of-0000N.safetensors`` (no safetensors metadata) + index.
    ``types``: tensor -> quant type (default: the GLM-5 recipe ``kind``, :func:`msmodelslim_recipe`);
    ``ranges``: calibrated activation (min, max) of every W8A8 weight. ``deq_scale`` is the fp32 bit
    pattern in int64 unless the model dtype is bfloat16 (``deqscale2int64_by_dtype``). ``rotation``:
    QuaRot's (global rotation, ``rot.weight``) from :func:`quarot_glm5`, written as the recipe's
    ``export_extra_info`` has them written: ``optional/quarot.safetensors`` (``global_rotation``,
    ``on_quarot_extra_info_wrapper``; ``optional.quarot.rotation_map`` in the description) and
    ``rot.safetensors`` (``rot.weight``, in the index; ``is_rot_used: true`` appended to the
    description: ``model/glm_5/model_adapter.py`` ``ascendv1_save_postprocess``)."""
    from hwlayer.ops.quant import quantize_weight, quantize_weight_static, static_activation_params

    from .loader import MSMODELSLIM_PREFIX, msmodelslim_recipe

    path = Path(path)
    types = dict(types if types is not None else msmodelslim_recipe(cfg, kind))
    bf16 = cfg.dtype == torch.bfloat16
    out: dict[str, torch.Tensor] = {}
    desc: dict[str, Any] = {}

    def put(name: str, kind_: str, t: torch.Tensor) -> None:
        out[name] = t.contiguous()
        desc[name] = kind_

    for name, t in tensors.items():
        qtype = types.get(name, "FLOAT")
        module = module_of(name)
        if qtype == "W8A8":
            s, o = static_activation_params(*ranges[name])
            q = quantize_weight_static(t.float(), s, o)
            deq = q.scale if bf16 else q.scale.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            put(name, qtype, q.data)
            put(module + ".quant_bias", qtype, q.bias)
            put(module + ".input_scale", qtype, q.input_scale)
            put(module + ".input_offset", qtype, q.input_offset)
            put(module + ".deq_scale", qtype, deq)
        elif qtype == "W8A8_DYNAMIC":
            q = quantize_weight(t.float(), "int8")
            put(name, qtype, q.data)
            put(module + ".weight_scale", qtype, q.scale[:, None])
            put(module + ".weight_offset", qtype, torch.zeros_like(q.scale[:, None]))
        elif qtype == "W4A8_DYNAMIC":
            q = quantize_weight(t.float(), "w4a8")
            deq = q.dequantize(torch.float32)  # [N, K]
            if module.endswith("down_proj"):  # [N, 16]: 8 x the row sums of 16 column chunks (tp_num 16)
                scale_bias = 8 * deq.reshape(deq.shape[0], 16, -1).sum(-1)
            else:
                scale_bias = 8 * deq.sum(-1, keepdim=True)
            put(name, qtype, q.data)
            put(module + ".weight_scale", qtype, q.scale[:, None])
            put(module + ".weight_offset", qtype, torch.zeros_like(q.scale[:, None]))
            put(module + ".scale_bias", qtype, scale_bias)
        else:
            put(name, "FLOAT", t)
    ranks = {"W4A8_DYNAMIC": 3, "W8A8": 2, "W8A8_DYNAMIC": 1}  # the saver's QUANT_TYPE_PRIORITY, W4A8 hidden
    present = [t for t in desc.values() if t in ranks and t != "W4A8_DYNAMIC"]
    optional: dict[str, Any] = {}
    if rotation is not None:
        (path / "optional").mkdir(exist_ok=True)
        save_file({"global_rotation": rotation[0].contiguous()}, str(path / "optional" / "quarot.safetensors"))
        optional["quarot"] = {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}
    desc |= {"version": "1.0.0", "model_quant_type": max(present, key=ranks.get) if present else "FLOAT",
             "metadata": {}, "group_size": 0, "optional": optional}
    names = list(out)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        fname = f"{MSMODELSLIM_PREFIX}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: out[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(path / fname))
        weight_map |= {n: fname for n in part}
        total += sum(v.numel() * v.element_size() for v in part.values())
    if rotation is not None:
        save_file({"rot.weight": rotation[1].contiguous()}, str(path / "rot.safetensors"))
        weight_map["rot.weight"] = "rot.safetensors"
        desc["is_rot_used"] = True
    (path / f"{MSMODELSLIM_PREFIX}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "quant_model_description.json").write_text(json.dumps(desc, indent=2))


def calibration_prompts(n: int = 16, length: int = 8, seed: int = 1) -> torch.Tensor:
    """Token ids the tiny msmodelslim checkpoints are calibrated on (disjoint seed from the tests')."""
    return torch.randint(20, 500, (n, length), generator=torch.Generator().manual_seed(seed))


def make_msmodelslim_checkpoint(path: str | Path, kind: str = "w8a8", config_overrides: dict[str, Any] | None = None,
                                seed: int = 0, shards: int = 2, processes: tuple[str, ...] | None = None,
                                only: str | None = None, keep_float: str | Path | None = None) -> Path:
    """A tiny msmodelslim-layout checkpoint (``kind`` ``"w8a8"`` | ``"w4a8"``, the GLM-5 recipes) of the
    float model :func:`make_tiny_checkpoint` writes with the same arguments: config.json without
    ``quantization_config`` (the saver removes it), description, sharded ``quant_model_weights``.
    ``processes`` (default: the recipe's, :data:`RECIPE_PROCESSES`): ``"quarot"``
    (:func:`quarot_glm5`; the checkpoint then carries ``is_rot_used``, ``rot.weight`` and
    ``optional/quarot.safetensors`` as the saver writes them) and ``"flex_smooth_quant"``
    (:func:`flex_smooth_quant`), fused into the float weights in that order. W8A8 activation
    ranges: per-tensor min / max over the processed float model's inputs to each static projection
    on its greedy continuations of :func:`calibration_prompts` (msmodelslim's ``minmax``; msmodelslim
    calibrates layer by layer on the previous layers' fake-quantized outputs, here every layer sees
    the float model's).
    ``only``: quantize just the linears whose name contains it, the rest FLOAT (the per-projection
    error breakdown of bench/bench_quant_formats.py). ``keep_float``: also write the processed float
    model (rotated and smoothed, before quantization) there as a plain float checkpoint."""
    from safetensors.torch import load_file

    from .loader import msmodelslim_recipe

    path = Path(path)
    processes = RECIPE_PROCESSES[kind] if processes is None else tuple(processes)
    unknown = set(processes) - {"quarot", "flex_smooth_quant"}
    if unknown:
        raise ValueError(f"msmodelslim processes: expected 'quarot' / 'flex_smooth_quant', got {sorted(unknown)}")
    make_tiny_checkpoint(path, config_overrides if config_overrides is not None else QUANT_TINY_OVERRIDES, seed=seed)
    cfg = ModelConfig.from_json(path)
    types = msmodelslim_recipe(cfg, kind)
    if only is not None:
        types = {n: t for n, t in types.items() if only in n}
    static = [n for n, t in types.items() if t == "W8A8"]
    tensors = load_file(str(path / "model.safetensors"))
    rotation = None
    if "quarot" in processes:  # data-free; the float model it leaves is what the later steps calibrate on
        rotation = quarot_glm5(tensors, cfg)
        save_file(tensors, str(path / "model.safetensors"))
    ranges: dict[str, tuple[float, float]] = {}
    if static or "flex_smooth_quant" in processes:
        from . import load_model
        from .generate import generate

        prompts = generate(load_model(path, backend="cpu", weight_format="fp32"), calibration_prompts(), 24)
        acts = _record_attention_inputs(path, prompts)
        scales = flex_smooth_quant(tensors, cfg, acts) if "flex_smooth_quant" in processes else {}
        ranges = static_ranges(static, acts, scales)
    if keep_float is not None:
        shutil.copytree(path, keep_float)
        save_file(tensors, str(Path(keep_float) / "model.safetensors"))
    write_msmodelslim(path, kind, tensors, cfg, ranges, shards, types, rotation)
    (path / "model.safetensors").unlink()
    return path


def make_compressed_tensors_checkpoint(path: str | Path, scheme: str = "int8",
                                       ignore: tuple[str, ...] = ("lm_head", r"re:.*mlp\.gate$",
                                                                  r"re:.*\.weights_proj$"),
                                       config_overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """The tiny model as an llm-compressor / compressed-tensors checkpoint: every Linear (incl.
    ``kv_b_proj`` and the indexer's ``wk``) quantized unless ``ignore`` matches its module name
    (exact, or ``re:`` + ``re.match``); ``scheme`` ``"int8"`` (W8A8: int8 channel weights
    ``weight_scale [N, 1]``, dynamic per-token int8 activations) or ``"fp8_block"`` (FP8_BLOCK: e4m3
    weights with ``weight_scale`` -- not ``_inv`` -- per 128x128 block, dynamic 128-wide activation
    groups), as vLLM's ``compressed_tensors`` reader expects them."""
    from safetensors.torch import load_file

    from hwlayer.ops.quant import quantize_weight

    from .config import _ct_match

    path = Path(path)
    make_tiny_checkpoint(path, config_overrides if config_overrides is not None else QUANT_TINY_OVERRIDES, seed=seed)
    tensors = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        module = module_of(name)
        linear = name.endswith(".weight") and t.dim() == 2 and not name.endswith(("embed_tokens.weight",))
        if linear and not any(_ct_match(module, i) for i in ignore):
            q = quantize_weight(t, scheme)
            out[name] = q.data
            out[module + ".weight_scale"] = q.scale if scheme == "fp8_block" else q.scale[:, None]
        else:
            out[name] = t
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    if scheme == "int8":
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                       "dynamic": True}}
        fmt = "int-quantized"
    else:
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128],
                             "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                                       "symmetric": True, "dynamic": True}}
        fmt = "float-quantized"
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt,
                                  "config_groups": {"group_0": group}, "ignore": list(ignore)}
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def make_bigram_checkpoint(path: str | Path, seed: int = 0, mtp_noise: float = 0.0,
                           config_overrides: dict[str, Any] | None = None) -> Path:
    """A tiny checkpoint on which the MTP layer agrees with the model: speculative decoding's test bed.

    Every attention ``o_proj`` and every MLP ``down_proj`` (dense, routed and shared experts) is zeroed,
    so each decoder layer adds nothing to the residual stream: the model's logits at a position are
    ``lm_head(norm(embed(token)))``, a bigram table. The MTP layer gets all-ones norms and
    ``eh_proj = [I, 0]`` (it keeps the embedding half and drops the hidden half), and its decoder
    layer is zeroed too, so it predicts token ``i + 2`` from token ``i + 1`` with the same bigram
    table: its greedy draft is the model's greedy token (up to rms-norm epsilon). ``mtp_noise`` > 0
    adds Gaussian noise of that std to ``eh_proj`` (lower agreement); ``config_overrides`` as for
    :func:`make_tiny_checkpoint` (e.g. more layers)."""
    path = make_tiny_checkpoint(path, config_overrides=config_overrides, seed=seed)
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    D = int(TINY_CONFIG["hidden_size"])
    gen = torch.Generator().manual_seed(seed + 1)
    for name, t in tensors.items():
        if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(t)
        elif name.endswith(("enorm.weight", "hnorm.weight", "shared_head.norm.weight")) or name == "model.norm.weight":
            tensors[name] = torch.ones_like(t)
        elif name.endswith("eh_proj.weight"):
            eh = torch.zeros_like(t)
            eh[:, :D] = torch.eye(D, dtype=t.dtype)
            if mtp_noise > 0:
                eh += mtp_noise * torch.randn(eh.shape, generator=gen, dtype=t.dtype)
            tensors[name] = eh
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
