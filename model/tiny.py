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
from .config import ModelConfig
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
        if (is_linear_weight(name) or name.endswith("kv_b_proj.weight")) and not any(m in module for m in not_convert):
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
