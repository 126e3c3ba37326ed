"""ModelConfig: the fields of a `glm_moe_dsa` config.json that change the math.

Derivations follow transformers' ``GlmMoeDsaConfig`` (5.24): IndexShare layer kinds from
``indexer_types`` / ``index_topk_pattern`` / ``index_topk_freq`` + ``index_skip_topk_offset``,
MLP kinds from ``mlp_layer_types`` / ``first_k_dense_replace``, RoPE from ``rope_parameters``
(or the legacy ``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A config.json that is not a usable glm_moe_dsa config (one line naming file and field)."""


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class RopeConfig:
    rope_type: str  # "default" | "yarn"
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint is quantized: the weight format it stores and what it left unquantized.

    * ``quant_method`` ``"fp8"`` (``fmt`` e4m3, ``weight_block_size`` [128, 128], dynamic
      activations: the DeepSeek-V3 / GLM-5-FP8 layout, ``*.weight_scale_inv``) -> ``fp8_block``;
      ``"w8a8_int8"`` (SGLang's per-channel INT8 layout, ``*.weight_scale`` ``[N, 1]``) -> ``int8``.
      ``modules_to_not_convert`` (HF) / ``ignored_layers`` (vLLM): modules the checkpoint keeps
      unquantized, matched as module-name prefixes on dot boundaries (``mlp.gate`` catches
      ``model.layers.3.mlp.gate`` but not ``mlp.gate_proj``), never as substrings. ``scale_fmt``:
      ``"ue8m0"`` (DeepSeek-V3.1/3.2) = power-of-two activation scales.
    * ``"compressed-tensors"`` (vLLM's W8A8 int8: channel weights + dynamic token activations ->
      ``int8``; FP8_BLOCK: 128x128 weight blocks + dynamic 128-wide activation groups ->
      ``fp8_block``; scales named ``weight_scale``); ``ignore``: exact module names or ``re:``
      regular expressions matched with ``re.match`` (vLLM ``compressed_tensors/utils.py``
      ``_is_equal_or_regex_match``).
    * ``"msmodelslim"`` (no ``quantization_config``: its saver deletes it; a
      ``quant_model_description.json`` next to config.json gives a quant type per tensor):
      ``tensor_types`` maps tensor names to ``W8A8`` (-> ``w8a8_static``), ``W8A8_DYNAMIC`` (->
      ``int8``), ``W4A8_DYNAMIC`` (-> ``w4a8``) or ``FLOAT``; ``weight_format`` is the lowest-bit
      format present (what the routed experts use).
    """

    method: str
    weight_format: str
    not_convert: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    scale_fmt: str | None = None
    scale_suffix: str = "_scale"
    tensor_types: dict[str, str] | None = field(default=None, compare=False, hash=False, repr=False)
    group_size: int = 0
    rotated: bool = False  # msmodelslim QuaRot (is_rot_used): the MTP draft needs rot.weight
    source: str = ""

    def converts(self, module: str) -> bool:
        """Whether the checkpoint stores ``module``'s weight quantized (by its config's rules)."""
        if self.tensor_types is not None:
            return self.tensor_types.get(module + ".weight", "FLOAT") != "FLOAT"
        if any(_prefix_match(module, m) for m in self.not_convert):
            return False
        return not any(_ct_match(module, m) for m in self.ignore)

    def stored_format(self, module: str) -> str | None:
        """The format ``module``'s weight is stored in (None: float), by the config alone."""
        if self.tensor_types is not None:
            return MSMODELSLIM_TYPES.get(self.tensor_types.get(module + ".weight", "FLOAT"))
        return self.weight_format if self.converts(module) else None


def _prefix_match(module: str, entry: str) -> bool:
    """``entry`` names ``module`` or a module above it, on dot boundaries, anywhere in the dotted
    path (``mlp.gate`` matches ``model.layers.3.mlp.gate`` and ``...mlp.gate.sub``; never
    ``...mlp.gate_proj``): vLLM's module-prefix rule for ``ignored_layers``."""
    if not entry:
        return False
    m, e = "." + module + ".", "." + entry.strip(".") + "."
    return e in m


def _ct_match(module: str, target: str) -> bool:
    """compressed-tensors ``ignore`` / ``targets``: ``re:`` + a regular expression (``re.match``),
    otherwise the exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


_QUANT_METHODS = {"fp8": "fp8_block", "w8a8_int8": "int8", "compressed-tensors": None}
# msmodelslim quant types (quant_model_description.json) -> our weight format (None: float).
MSMODELSLIM_TYPES: dict[str, str | None] = {"W8A8": "w8a8_static", "W8A8_DYNAMIC": "int8",
                                             "W4A8_DYNAMIC": "w4a8", "FLOAT": None}
MSMODELSLIM_DESCRIPTION = "quant_model_description.json"
_DESC_META_KEYS = ("version", "model_quant_type", "metadata", "group_size", "optional", "is_rot_used")


def _compressed_tensors(qc: dict[str, Any], src: str) -> tuple[str, tuple[str, ...]]:
    """(weight format, ignore list) of a compressed-tensors config: one config group, W8A8 int8
    (channel weights, dynamic per-token activations) or FP8_BLOCK (128x128 blocks, dynamic
    128-wide groups) -- vLLM's ``CompressedTensorsW8A8Int8`` / ``CompressedTensorsW8A8Fp8`` readings."""
    where = "quantization_config.config_groups"
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ConfigError(f"{src}: field '{where}' expected one group (W8A8 int8 or FP8_BLOCK), got {groups!r}")
    name, g = next(iter(groups.items()))
    w, a = (g or {}).get("weights") or {}, (g or {}).get("input_activations") or {}
    int8 = (w.get("num_bits"), w.get("type"), w.get("strategy"), a.get("num_bits"), a.get("type"),
            a.get("strategy"), a.get("dynamic")) == (8, "int", "channel", 8, "int", "token", True)
    fp8 = (w.get("num_bits"), w.get("type"), w.get("strategy"), list(w.get("block_structure") or []),
           a.get("num_bits"), a.get("type"), a.get("strategy"), a.get("group_size"), a.get("dynamic")) == (
               8, "float", "block", [128, 128], 8, "float", "group", 128, True)
    if not (int8 or fp8) or w.get("symmetric", True) is not True:
        raise ConfigError(f"{src}: field '{where}.{name}' expected W8A8 int8 (weights int8 channel, activations "
                          f"int8 token dynamic) or FP8_BLOCK (weights float8 block [128, 128], activations float8 "
                          f"group 128 dynamic), got weights {w!r}, input_activations {a!r}")
    fmt = qc.get("format")
    if fmt not in (None, "int-quantized", "float-quantized"):
        raise ConfigError(f"{src}: field 'quantization_config.format' expected 'int-quantized' or 'float-quantized' "
                          f"(quantized weights stored as such), got {fmt!r}")
    targets = g.get("targets") or ["Linear"]
    if targets != ["Linear"]:
        raise ConfigError(f"{src}: field '{where}.{name}.targets' expected ['Linear'], got {targets!r}")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{src}: field 'quantization_config.ignore' expected a list of strings, got {ignore!r}")
    for i in ignore:
        if i.startswith("re:"):
            try:
                re.compile(i[3:])
            except re.error as exc:
                raise ConfigError(f"{src}: field 'quantization_config.ignore' entry {i!r} is not a valid regular "
                                  f"expression ({exc})") from None
    return ("int8" if int8 else "fp8_block"), tuple(ignore)


def _parse_quant(raw: dict[str, Any], src: str) -> QuantConfig | None:
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    where = "quantization_config"
    if not isinstance(qc, dict):
        raise ConfigError(f"{src}: field '{where}' expected an object, got {qc!r}")
    method = qc.get("quant_method")
    if method not in _QUANT_METHODS:
        raise ConfigError(f"{src}: field '{where}.quant_method' expected one of {', '.join(_QUANT_METHODS)}, "
                          f"got {method!r}")
    if method == "compressed-tensors":
        fmt, ignore = _compressed_tensors(qc, src)
        return QuantConfig(method, fmt, ignore=ignore, scale_suffix="_scale", source=src)
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{src}: field '{where}.activation_scheme' expected 'dynamic', "
                          f"got {qc.get('activation_scheme')!r}")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"{src}: field '{where}.fmt' expected 'e4m3', got {qc.get('fmt')!r}")
        if list(qc.get("weight_block_size") or [128, 128]) != [128, 128]:
            raise ConfigError(f"{src}: field '{where}.weight_block_size' expected [128, 128], "
                              f"got {qc.get('weight_block_size')!r}")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{src}: field '{where}.scale_fmt' expected 'ue8m0' or absent, got {scale_fmt!r}")
    skip = list(qc.get("modules_to_not_convert") or []) + list(qc.get("ignored_layers") or [])
    if not all(isinstance(m, str) for m in skip):
        raise ConfigError(f"{src}: field '{where}.modules_to_not_convert' expected a list of strings, got {skip!r}")
    return QuantConfig(method, _QUANT_METHODS[method], tuple(skip), scale_fmt=scale_fmt,
                       scale_suffix="_scale_inv" if method == "fp8" else "_scale", source=src)


def parse_msmodelslim_description(path: Path) -> QuantConfig:
    """``quant_model_description.json`` -> QuantConfig (method ``msmodelslim``). Every tensor entry
    must name a known quant type (one line naming the file, tensor and the types we read)."""
    try:
        desc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(desc, dict):
        raise ConfigError(f"{path}: expected a JSON object of tensor name -> quant type, got {type(desc).__name__}")
    types: dict[str, str] = {}
    for key, value in desc.items():
        if key in _DESC_META_KEYS or not isinstance(value, str) or "." not in key:
            continue
        if value not in MSMODELSLIM_TYPES:
            raise ConfigError(f"{path}: tensor {key!r} has quant type {value!r}, expected one of "
                              f"{', '.join(MSMODELSLIM_TYPES)} (the types hwlayer reads)")
        types[key] = value
    group = desc.get("group_size", 0) or 0
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ConfigError(f"{path}: field 'group_size' expected an integer >= 0, got {group!r}")
    present = {MSMODELSLIM_TYPES[t] for t in types.values()} - {None}
    fmt = next((f for f in ("w4a8", "w8a8_static", "int8") if f in present), "int8")
    return QuantConfig("msmodelslim", fmt, tensor_types=types, group_size=group,
                       rotated=bool(desc.get("is_rot_used")), source=str(path))


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_types: list[str]
    mlp_layer_types: list[str]
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope: RopeConfig
    max_position_embeddings: int
    rms_norm_eps: float
    num_nextn_predict_layers: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None
    dtype: torch.dtype
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    quant: QuantConfig | None = None  # the checkpoint's quantization_config, None when unquantized

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def first_k_dense_replace(self) -> int:
        return next((i for i, t in enumerate(self.mlp_layer_types) if t == "sparse"), self.num_hidden_layers)

    def layer_is_moe(self, i: int) -> bool:
        """Layer ``i`` uses the MoE block; the MTP layer (index num_hidden_layers) is MoE like GLM-5's."""
        return self.mlp_layer_types[i] == "sparse" if i < self.num_hidden_layers else self.n_routed_experts > 0

    def layer_has_indexer(self, i: int) -> bool:
        return self.indexer_types[i] == "full" if i < self.num_hidden_layers else True

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5``, times YaRN's ``mscale(factor, mscale_all_dim)^2`` as transformers does."""
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.rope_type != "default" and r.mscale_all_dim:
            m = yarn_get_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Parse ``path`` (a config.json or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (expected a glm_moe_dsa config.json)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        cfg = cls.from_dict(raw, source=str(path))
        desc = path.parent / MSMODELSLIM_DESCRIPTION
        if desc.is_file():  # msmodelslim: its saver removed quantization_config; the description rules
            if cfg.quant is not None:
                raise ConfigError(f"{path}: has a quantization_config ({cfg.quant.method}) and {desc.name} is next to "
                                  f"it: expected one of the two (msmodelslim's saver removes quantization_config)")
            cfg.quant = parse_msmodelslim_description(desc)
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse(raw, source)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse(raw: dict[str, Any], src: str) -> ModelConfig:
    def bad(name: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{src}: field '{name}' expected {expected}, got {got!r}")

    model_type = raw.get("model_type")
    if model_type != "glm_moe_dsa":
        raise ConfigError(f"{src}: field 'model_type' expected 'glm_moe_dsa', got {model_type!r}")

    def integer(name: str, default: Any = ..., minimum: int = 1) -> int:
        if name not in raw or raw[name] is None:
            if default is ...:
                raise ConfigError(f"{src}: missing required field '{name}'")
            return default
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise bad(name, f"an integer >= {minimum}", v)
        return v

    def number(name: str, default: Any = ..., positive: bool = True) -> float:
        if name not in raw or raw[name] is None:
            if default is ...:
                raise ConfigError(f"{src}: missing required field '{name}'")
            return default
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and v <= 0):
            raise bad(name, "a positive number" if positive else "a number", v)
        return float(v)

    L = integer("num_hidden_layers")
    hidden = integer("hidden_size")
    heads = integer("num_attention_heads")
    rope_dim = integer("qk_rope_head_dim")
    if rope_dim % 2:
        raise bad("qk_rope_head_dim", "an even number", rope_dim)
    index_head_dim = integer("index_head_dim", 128)
    if index_head_dim < rope_dim:
        raise bad("index_head_dim", f">= qk_rope_head_dim ({rope_dim})", index_head_dim)

    # IndexShare: which layers run their own indexer (transformers GlmMoeDsaConfig.__post_init__).
    indexer_types = raw.get("indexer_types")
    if indexer_types is None:
        pattern = raw.get("index_topk_pattern")
        if pattern is not None:
            if isinstance(pattern, str):
                if any(c not in "FS" for c in pattern):
                    raise bad("index_topk_pattern", "a string of 'F' and 'S'", pattern)
                indexer_types = [{"F": "full", "S": "shared"}[c] for c in pattern]
            else:
                indexer_types = list(pattern)
        else:
            freq = max(integer("index_topk_freq", 1), 1)
            offset = integer("index_skip_topk_offset", 2, minimum=0)
            indexer_types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(L)]
    field_name = "indexer_types" if raw.get("indexer_types") is not None else "index_topk_pattern"
    if not isinstance(indexer_types, list) or len(indexer_types) != L or any(
        t not in ("full", "shared") for t in indexer_types
    ):
        raise bad(field_name, f"{L} entries of 'full'/'shared'", indexer_types)
    if indexer_types and indexer_types[0] == "shared":
        raise bad(field_name, "layer 0 to be 'full' (a shared layer reuses an earlier full layer)", indexer_types)

    mlp_layer_types = raw.get("mlp_layer_types")
    if mlp_layer_types is None:
        n_dense = min(integer("first_k_dense_replace", 3, minimum=0), L)
        mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (L - n_dense)
    if not isinstance(mlp_layer_types, list) or len(mlp_layer_types) != L or any(
        t not in ("dense", "sparse") for t in mlp_layer_types
    ):
        raise bad("mlp_layer_types", f"{L} entries of 'dense'/'sparse'", mlp_layer_types)

    n_experts = integer("n_routed_experts", raw.get("num_experts", 256))
    top_k = integer("num_experts_per_tok", 8)
    if top_k > n_experts:
        raise bad("num_experts_per_tok", f"<= n_routed_experts ({n_experts})", top_k)
    n_group = integer("n_group", 1)
    if n_experts % n_group:
        raise bad("n_group", f"a divisor of n_routed_experts ({n_experts})", n_group)
    topk_group = integer("topk_group", 1)
    if topk_group > n_group:
        raise bad("topk_group", f"<= n_group ({n_group})", topk_group)

    for flag, name in ((raw.get("tie_word_embeddings"), "tie_word_embeddings"),):
        if flag:
            raise bad(name, "false (GLM-5 has an untied lm_head)", flag)
    for act_name in ("hidden_act",):
        if raw.get(act_name, "silu") != "silu":
            raise bad(act_name, "'silu'", raw.get(act_name))
    if raw.get("attention_bias"):
        raise bad("attention_bias", "false", raw.get("attention_bias"))
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise bad("scoring_func", "'sigmoid'", raw.get("scoring_func"))
    norm_topk_prob = raw.get("norm_topk_prob", True)
    if not isinstance(norm_topk_prob, bool):
        raise bad("norm_topk_prob", "true or false", norm_topk_prob)

    max_pos = integer("max_position_embeddings", 202752)
    rope = _parse_rope(raw, src, max_pos)

    eos = raw.get("eos_token_id", 1)
    eos_ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(eos_ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise bad("eos_token_id", "an integer or a list of integers", eos)

    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if dtype_name not in _DTYPES:
        raise bad("dtype", f"one of {', '.join(_DTYPES)}", dtype_name)

    return ModelConfig(
        vocab_size=integer("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=L,
        num_attention_heads=heads,
        q_lora_rank=integer("q_lora_rank"),
        kv_lora_rank=integer("kv_lora_rank"),
        qk_nope_head_dim=integer("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=integer("v_head_dim"),
        index_n_heads=integer("index_n_heads", 32),
        index_head_dim=index_head_dim,
        index_topk=integer("index_topk", 2048),
        indexer_types=list(indexer_types),
        mlp_layer_types=list(mlp_layer_types),
        intermediate_size=integer("intermediate_size"),
        moe_intermediate_size=integer("moe_intermediate_size"),
        n_routed_experts=n_experts,
        n_shared_experts=integer("n_shared_experts", 1, minimum=0),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=number("routed_scaling_factor", 1.0),
        rope=rope,
        max_position_embeddings=max_pos,
        rms_norm_eps=number("rms_norm_eps", 1e-5),
        num_nextn_predict_layers=integer("num_nextn_predict_layers", 0, minimum=0),
        eos_token_ids=list(eos_ids),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        dtype=_DTYPES[dtype_name],
        raw=raw,
        quant=_parse_quant(raw, src),
    )


def _parse_rope(raw: dict[str, Any], src: str, max_pos: int) -> RopeConfig:
    params = raw.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:  # legacy layout: rope_theta + rope_scaling
        params = dict(raw.get("rope_scaling") or {})
        field_name = "rope_scaling"
        if "rope_theta" in raw:
            params.setdefault("rope_theta", raw["rope_theta"])
    if not isinstance(params, dict):
        raise ConfigError(f"{src}: field '{field_name}' expected an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{src}: field '{field_name}.rope_theta' expected a positive number, got {theta!r}")
    if rope_type == "default":
        return RopeConfig("default", float(theta))
    if rope_type != "yarn":
        raise ConfigError(f"{src}: field '{field_name}.rope_type' expected 'default' or 'yarn', got {rope_type!r}")
    orig = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ConfigError(f"{src}: field '{field_name}.factor' expected a positive number, got {factor!r}")
    return RopeConfig(
        "yarn",
        float(theta),
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rope_dim/2]`` and the cos/sin scaling (transformers' rope init)."""
    dim, r = cfg.qk_rope_head_dim, cfg.rope
    base_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if r.rope_type == "default":
        return 1.0 / base_freqs, 1.0
    factor = r.factor
    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, r.mscale) / yarn_get_mscale(factor, r.mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(r.theta)
        )

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * base_freqs)) * (1 - extrapolation_weight) + (1.0 / base_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)
