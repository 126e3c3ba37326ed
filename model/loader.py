"""Safetensors checkpoint loading for glm_moe_dsa (HF layout), memory-mapped, tensor by tensor.

* HF files (``model.safetensors`` or sharded with ``model.safetensors.index.json``) and msmodelslim
  files (``quant_model_weights*.safetensors`` + ``quant_model_weights.safetensors.index.json``, with
  ``quant_model_description.json`` giving a quant type per tensor; Ascend/msmodelslim@3de0a3c4
  ``save/ascendv1.py`` and ``save/utils/safetensors.py``, read as vllm-project/vllm-ascend@182b75ea
  ``quantization/methods/w8a8_static.py``, ``w8a8_dynamic.py``, ``w4a8.py`` read them);
* only safetensors (never pickle), opened with ``safetensors.safe_open`` (mmap): a tensor is read
  only when it is needed, so a rank loads only what it owns;
* every name, shape and dtype -- and every scale, offset and description entry a quantized tensor
  needs -- is checked against the config BEFORE any tensor is read, so a bad checkpoint fails with
  one line naming the file, the tensor and what was expected, and nothing half-loaded is returned;
* quantized weights are kept in their stored format for the linear layers and experts when the
  backend runs it (``fp8_block``: e4m3 + ``weight_scale_inv`` (``weight_scale`` in
  compressed-tensors), 128x128 blocks; ``int8``: + ``weight_scale`` ``[N, 1]`` (+ zero
  ``weight_offset`` in msmodelslim); ``w8a8_static``: + ``deq_scale``, ``quant_bias``,
  ``input_scale``, ``input_offset``; ``w4a8``: packed int4 + ``weight_scale``, ``weight_offset``,
  ``scale_bias``), converted tensor by tensor otherwise (lossless where the integers fit: w4a8 and
  w8a8_static weights -> int8; fp8 -> int8 per channel is lossy and logged with its measured weight
  error), dequantized where the model does not run them through ``quant_linear`` (``kv_b_proj``) or
  when the format is unquantized. Never a full float copy of the model: one tensor at a time.
  :func:`resolve_weight_format` picks the format; :func:`planned_weight_bytes` predicts the bytes;
* per-expert tensors are stacked into ``w13 [E_local, 2I, D]`` (gate rows then up rows) and
  ``w2 [E_local, D, I]`` for ``plan.fused_experts``;
* every resident weight then goes once through ``plan.prepare_weight`` (the backend's load-time
  layout: transposes, NZ casts), never again in a forward.

QuaRot and smoothing (the GLM-5 msmodelslim recipes) are fused into the stored weights and norm
weights offline: the main model runs them unchanged. The one run-time piece is the MTP draft of a
rotated checkpoint (``is_rot_used``): vllm-ascend ``models/deepseek_mtp.py`` applies ``rot.weight``
to the target's final hidden state before ``hnorm``; hwlayer does not, so it loads such a
checkpoint without its MTP layer (one log line) rather than draft from the wrong basis.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from hwlayer.ops.quant import (
    FP8_BLOCK,
    QUANTIZED_FORMATS,
    UNQUANTIZED_FORMATS,
    WEIGHT_FORMATS,
    QuantizedWeight,
    quantize_weight,
    unpack_int4,
)

from .config import MSMODELSLIM_DESCRIPTION, ModelConfig

log = logging.getLogger(__name__)

_SUPPORTED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
              "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_FLOAT_ST = ("F32", "BF16", "F16")
# Weights the model multiplies through ``hwlayer.ops.quant.linear`` / ``quant_fused_experts``: the
# ones a quantized format keeps quantized. Not here, so kept as floats: embeddings, lm_head, norms,
# the router (``mlp.gate``), the indexer's ``weights_proj`` and ``kv_b_proj`` (absorbed into
# attention through einsum, dequantized at load).
LINEAR_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight",
                   "indexer.wq_b.weight", "indexer.wk.weight", "gate_proj.weight", "up_proj.weight",
                   "down_proj.weight", "eh_proj.weight")
# Where each stored format keeps its scales (HF layouts; compressed-tensors names fp8 scales _scale).
SCALE_SUFFIX = {"fp8_block": "_scale_inv", "int8": "_scale"}
# Kept in fp32 whatever the model dtype (transformers' _keep_in_fp32_modules): router and indexer weights.
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")
MSMODELSLIM_PREFIX = "quant_model_weights"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: one line naming the file and the tensor."""


def is_linear_weight(name: str) -> bool:
    return name.endswith(LINEAR_SUFFIXES)


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def checkpoint_format(cfg: ModelConfig) -> str | None:
    """The quantized format the checkpoint declares (its main one for a mixed msmodelslim
    checkpoint), None when unquantized."""
    return cfg.quant.weight_format if cfg.quant is not None else None


def resolve_weight_format(cfg: ModelConfig, backend, requested: str | None, dtype: torch.dtype) -> str:
    """The weight format to load: ``requested`` if the backend runs it (else ValueError, one line);
    None: the checkpoint's own format when the backend runs it, else the best quantized format the
    backend runs (fp8_block before int8), else unquantized -- returned as ``dtype``'s name.
    (A mixed msmodelslim checkpoint loaded in its own format keeps each tensor's stored format.)"""
    native = backend.native_weight_formats()
    float_name = {v: k for k, v in UNQUANTIZED_FORMATS.items()}[dtype]
    if requested is not None:
        if requested not in WEIGHT_FORMATS:
            raise ValueError(f"weight format: expected one of {', '.join(WEIGHT_FORMATS)}, got {requested!r}")
        if requested not in native:
            raise ValueError(f"weight format {requested!r} is not run by backend {backend.name!r} "
                             f"(it runs: {', '.join(native)})")
        if requested in UNQUANTIZED_FORMATS and UNQUANTIZED_FORMATS[requested] != dtype:
            raise ValueError(f"weight format {requested!r} contradicts dtype {float_name!r}")
        if requested == "w8a8_static" and (cfg.quant is None or "w8a8_static" not in _stored_formats(cfg)):
            raise ValueError("weight format 'w8a8_static' needs calibrated activation scales: only a checkpoint "
                             "that stores it (msmodelslim W8A8) can be loaded in it")
        return requested
    stored = checkpoint_format(cfg)
    if stored is None:
        return float_name
    if stored in native:
        return stored
    return next((f for f in ("fp8_block", "int8") if f in native), float_name)


def _stored_formats(cfg: ModelConfig) -> set[str]:
    if cfg.quant is None:
        return set()
    if cfg.quant.tensor_types is not None:
        return {cfg.quant.stored_format(module_of(n)) for n in cfg.quant.tensor_types} - {None}
    return {cfg.quant.weight_format}


def quantized_in_checkpoint(cfg: ModelConfig, name: str) -> bool:
    """Whether a quantized checkpoint stores ``name`` quantized (linear weights its config converts)."""
    return cfg.quant is not None and is_linear_weight(name) and cfg.quant.converts(module_of(name))


# ------------------------------------------------------------------------------------------------
# msmodelslim GLM-5 recipes (Ascend/msmodelslim@3de0a3c4 lab_practice/glm_5/glm_5_w8a8.yaml,
# glm_5_w4a8.yaml): the quant type of each linear weight. Used by ``plan`` for the GLM-5 config (no
# description there) and by the tiny msmodelslim checkpoints the tests write.


def msmodelslim_recipe(cfg: ModelConfig, kind: str) -> dict[str, str]:
    """Tensor name -> msmodelslim quant type for every linear weight, as the GLM-5 recipe ``kind``
    (``"w8a8"`` | ``"w4a8"``) assigns them. W8A8: attention (``*self_attn*`` except ``kv_b_proj``,
    ``wk``, ``weights_proj``) static ``W8A8``; ``*mlp*`` except the router ``*gate``:
    ``W8A8_DYNAMIC``. W4A8: routed experts ``W4A8_DYNAMIC``; the same attention and the dense /
    shared MLPs ``W8A8_DYNAMIC``; the MTP layer (``model.layers.78.*``) left float."""
    if kind not in ("w8a8", "w4a8"):
        raise ValueError(f"msmodelslim recipe: expected 'w8a8' or 'w4a8', got {kind!r}")
    out = {}
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    for name in expected_tensors(cfg, with_mtp=True):
        if not name.endswith(".weight") or "norm" in name.rsplit(".", 2)[-2]:
            continue
        module = module_of(name)
        attn = ".self_attn." in module and not module.endswith(("kv_b_proj", ".wk", "weights_proj"))
        mlp = ".mlp." in module and not module.endswith("gate")
        if not (attn or mlp) or module.endswith(("kv_a_layernorm", "q_a_layernorm")):
            continue
        if kind == "w8a8":
            out[name] = "W8A8" if attn else "W8A8_DYNAMIC"
        elif not name.startswith(mtp):
            out[name] = "W4A8_DYNAMIC" if ".mlp.experts." in module else "W8A8_DYNAMIC"
    return out


_RECIPE_OF_FORMAT = {"w8a8_static": "w8a8", "w4a8": "w4a8"}


def _format_bytes(fmt: str, shape: tuple[int, ...], group_size: int = 0) -> tuple[int, int]:
    """(data bytes, scale-and-parameter bytes) a weight of logical ``shape`` occupies in ``fmt``."""
    N, K = shape
    if fmt == "fp8_block":
        return N * K, 4 * -(-N // FP8_BLOCK) * -(-K // FP8_BLOCK)
    if fmt == "int8":
        return N * K, 4 * N
    if fmt == "w8a8_static":
        return N * K, 4 * N + 4 * N + 4 + 4  # deq_scale fp32, quant_bias int32, input scale + offset
    if fmt == "w4a8":
        return N * K // 2, 4 * N * (K // group_size if group_size else 1)
    raise ValueError(fmt)


def _planned_format(cfg: ModelConfig, name: str, weight_format: str,
                    recipe: dict[str, str] | None) -> str | None:
    """The resident format of linear weight ``name`` under the loader's rules (None: float)."""
    from .config import MSMODELSLIM_TYPES

    if weight_format not in QUANTIZED_FORMATS or not is_linear_weight(name):
        return None
    if recipe is not None:
        return MSMODELSLIM_TYPES.get(recipe.get(name, "FLOAT"))
    if cfg.quant is None:
        return weight_format
    stored = cfg.quant.stored_format(module_of(name))
    if stored is None:
        return None
    return stored if weight_format == cfg.quant.weight_format else weight_format


def planned_weight_bytes(cfg: ModelConfig, weight_format: str, dtype: torch.dtype, ep: int = 1,
                         with_mtp: bool = True, tp: int = 1) -> dict[str, int]:
    """Bytes of weights one rank keeps resident, as :func:`load_state` + the model hold them.

    Returns ``{"replicated": ..., "experts": ..., "scales": ...}`` (scales included in the two
    others, reported apart). Quantized: the linear weights the checkpoint stores quantized (all of
    them for a float checkpoint quantized at load; for ``w8a8_static`` / ``w4a8`` on a config
    without msmodelslim description, the GLM-5 msmodelslim recipe of :func:`msmodelslim_recipe`,
    each linear in its recipe type); floats in ``dtype``; router and indexer ``weights_proj`` in
    fp32. ``tp > 1`` (plan only, hwlayer's model runs EP only): the non-expert weights sharded
    ``tp`` ways as vLLM / vllm-ascend shard attention, dense MLP, embeddings and lm_head.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    recipe = None
    if weight_format in _RECIPE_OF_FORMAT and (cfg.quant is None or cfg.quant.tensor_types is None):
        recipe = msmodelslim_recipe(cfg, _RECIPE_OF_FORMAT[weight_format])
    group = cfg.quant.group_size if cfg.quant is not None else 0
    out = {"replicated": 0, "experts": 0, "scales": 0}
    for name, shape in expected_tensors(cfg, with_mtp=with_mtp).items():
        n = int(torch.Size(shape).numel())
        fmt = _planned_format(cfg, name, weight_format, recipe)
        if fmt is not None:
            data, scales = _format_bytes(fmt, shape, group if fmt == "w4a8" else 0)
            b = data + scales
        else:
            scales, b = 0, n * (4 if name.endswith(_FP32_SUFFIXES) else elem)
        if ".mlp.experts." in name:
            out["experts"] += b
            out["scales"] += scales // ep
        else:
            out["replicated"] += b // tp
            out["scales"] += scales // tp
    out["experts"] //= ep
    return out


def resident_weight_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes (QuantizedWeight
    data, scales and static parameters included), skipping the RoPE table: what the loaded weights
    really occupy."""
    seen: dict[int, int] = {}
    visited: set[int] = set()

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(o, QuantizedWeight):
            for t in o.tensors():
                walk(t)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif hasattr(o, "__dict__") and id(o) not in visited and type(o).__module__.startswith("model"):
            visited.add(id(o))
            for k, v in vars(o).items():
                if k not in ("cos_sin", "plan", "config", "ep_group"):
                    walk(v)

    walk(obj)
    return sum(seen.values())


def expected_tensors(cfg: ModelConfig, with_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor a glm_moe_dsa checkpoint must hold, with its shape (HF per-expert layout)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    dl, dr, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    Id, Im, E = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (cfg.vocab_size, D),
    }
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_a_proj.weight": (cfg.q_lora_rank, D),
            p + "self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
            p + "self_attn.q_b_proj.weight": (H * (dn + dr), cfg.q_lora_rank),
            p + "self_attn.kv_a_proj_with_mqa.weight": (dl + dr, D),
            p + "self_attn.kv_a_layernorm.weight": (dl,),
            p + "self_attn.kv_b_proj.weight": (H * (dn + dv), dl),
            p + "self_attn.o_proj.weight": (D, H * dv),
        }
        if cfg.layer_has_indexer(i):
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            out |= {
                p + "self_attn.indexer.wq_b.weight": (Hi * Di, cfg.q_lora_rank),
                p + "self_attn.indexer.wk.weight": (Di, D),
                p + "self_attn.indexer.k_norm.weight": (Di,),
                p + "self_attn.indexer.k_norm.bias": (Di,),
                p + "self_attn.indexer.weights_proj.weight": (Hi, D),
            }
        if cfg.layer_is_moe(i):
            out |= {p + "mlp.gate.weight": (E, D), p + "mlp.gate.e_score_correction_bias": (E,)}
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out |= {q + "gate_proj.weight": (Im, D), q + "up_proj.weight": (Im, D), q + "down_proj.weight": (D, Im)}
            if cfg.n_shared_experts:
                Is = Im * cfg.n_shared_experts
                q = p + "mlp.shared_experts."
                out |= {q + "gate_proj.weight": (Is, D), q + "up_proj.weight": (Is, D), q + "down_proj.weight": (D, Is)}
        else:
            q = p + "mlp."
            out |= {q + "gate_proj.weight": (Id, D), q + "up_proj.weight": (Id, D), q + "down_proj.weight": (D, Id)}
        if i >= cfg.num_hidden_layers:  # MTP extras
            out |= {
                p + "enorm.weight": (D,),
                p + "hnorm.weight": (D,),
                p + "eh_proj.weight": (D, 2 * D),
                p + "shared_head.norm.weight": (D,),
            }
    return out


def _optional_mtp_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Copies of the embedding / lm_head some MTP exports carry (DeepSeek-V3 layout); used if present."""
    out = {}
    for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        out[f"model.layers.{i}.embed_tokens.weight"] = (cfg.vocab_size, cfg.hidden_size)
        out[f"model.layers.{i}.shared_head.head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return out


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index (sharded) or the single file's header.
    HF names (``model.safetensors[.index.json]``), or msmodelslim's (``quant_model_weights*``) when
    ``quant_model_description.json`` is there."""
    msmodelslim = (path / MSMODELSLIM_DESCRIPTION).is_file()
    prefix = MSMODELSLIM_PREFIX if msmodelslim else "model"
    index = path / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map'): {exc}") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: tensor {name!r} maps to missing file {fname!r}")
            files[name] = f
        return files
    singles = [path / f"{prefix}.safetensors"] if (path / f"{prefix}.safetensors").is_file() else []
    if msmodelslim and not singles:  # shards without their index: every quant_model_weight*.safetensors
        singles = sorted(path.glob("quant_model_weight*.safetensors"))
    if not singles:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path}: only safetensors checkpoints are supported (found pickle .bin/.pt files)")
        if msmodelslim:
            raise CheckpointError(f"{path}: {MSMODELSLIM_DESCRIPTION} found but no {MSMODELSLIM_PREFIX}.safetensors, "
                                  f"{MSMODELSLIM_PREFIX}-*-of-*.safetensors or {index.name} (msmodelslim's file names)")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files = {}
    for single in singles:
        with _open(single) as f:
            files |= {name: single for name in f.keys()}
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a bad header / short file
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


# Auxiliary tensors of a stored quantized weight ``<module>.weight``: suffix -> (required, what).
def _aux_spec(cfg: ModelConfig, fmt: str) -> dict[str, tuple[bool, str]]:
    ms = cfg.quant is not None and cfg.quant.method == "msmodelslim"
    if fmt == "fp8_block":
        suffix = "weight_scale" if cfg.quant is not None and cfg.quant.method == "compressed-tensors" \
            else "weight_scale_inv"
        return {suffix: (True, "float32 [ceil(N/128), ceil(K/128)] block scales")}
    if fmt == "int8":
        spec = {"weight_scale": (True, "float [N, 1] per-channel scales")}
        return spec | ({"weight_offset": (True, "float [N, 1] zeros (symmetric weights)")} if ms else {})
    if fmt == "w8a8_static":
        return {"deq_scale": (True, "[N] float32 (or its bit pattern in int64)"),
                "quant_bias": (True, "int32 [N]"), "input_scale": (True, "float [1]"),
                "input_offset": (True, "float [1] (an integer)"), "weight_scale": (False, ""),
                "weight_offset": (False, "")}
    return {"weight_scale": (True, "float [N, 1] (or [N, K/group_size]) scales"),
            "weight_offset": (True, "float zeros like weight_scale (symmetric int4)"),
            "scale_bias": (True, "float32 [N, 1] or [N, 16]: 8 x rowsum(w) for the NPU kernel")}


def _scale_f32(t: torch.Tensor) -> torch.Tensor:
    """A deq_scale stored as float, or as the fp32 bit pattern in int64 (msmodelslim ``deqscale2int64``)."""
    if t.dtype == torch.int64:
        return (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return t.float()


def _build_quantized(cfg: ModelConfig, name: str, fmt: str, t: torch.Tensor, aux: dict[str, torch.Tensor],
                     where: dict[str, Path]) -> QuantizedWeight:
    """A stored quantized weight and its auxiliary tensors as a :class:`QuantizedWeight`, every
    shape, dtype and value rule checked (one line naming the file and tensor on failure)."""
    module = module_of(name)
    N = t.shape[0] * (2 if fmt == "w4a8" else 1)
    K = t.shape[1]

    def bad(suffix: str, expected: str, got: str) -> CheckpointError:
        return CheckpointError(f"{where[suffix]}: tensor {module + '.' + suffix!r} {got}, expected {expected} "
                               f"(for {fmt} weight {name!r} [{N}, {K}])")

    def shaped(suffix: str, shapes: tuple[tuple[int, ...], ...], what: str) -> torch.Tensor:
        v = aux[suffix]
        if tuple(v.shape) not in shapes:
            raise bad(suffix, what, f"has shape {list(v.shape)}")
        if not v.dtype.is_floating_point and not (suffix == "deq_scale" and v.dtype == torch.int64):
            raise bad(suffix, what, f"has dtype {v.dtype}")
        return v

    act = cfg.quant.scale_fmt if cfg.quant is not None else None
    if fmt == "fp8_block":
        suffix = next(iter(_aux_spec(cfg, fmt)))
        want = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
        s = shaped(suffix, (want,), f"float32 {list(want)} (one scale per {FP8_BLOCK}x{FP8_BLOCK} block)")
        return QuantizedWeight(fmt, t, s.float().contiguous(), act_scale_fmt=act)
    if fmt in ("int8", "w4a8"):
        group = cfg.quant.group_size if (fmt == "w4a8" and cfg.quant is not None) else 0
        if group and K % group:
            raise CheckpointError(f"{where['weight']}: w4a8 tensor {name!r} [{N}, {K}]: group_size {group} (from "
                                  f"{MSMODELSLIM_DESCRIPTION}) does not divide K={K}")
        cols = K // group if group else 1
        s = shaped("weight_scale", ((N, cols),) + (((N,),) if not group else ()), f"float [{N}, {cols}]")
        s = s.float().reshape(N, cols)
        if "weight_offset" in aux:
            off = shaped("weight_offset", ((N, cols), (N,)), f"float [{N}, {cols}] zeros")
            if bool((off != 0).any()):
                raise bad("weight_offset", "zeros (symmetric weights: vllm-ascend passes no weight offset)",
                          f"has non-zero values (max |offset| {float(off.abs().max()):.3g})")
        if fmt == "int8":
            return QuantizedWeight(fmt, t, s.reshape(N).contiguous(), act_scale_fmt=act if fmt == "int8" else None)
        qw = QuantizedWeight(fmt, t, (s if group else s.reshape(N)).contiguous(), group_size=group)
        sb = shaped("scale_bias", ((N, 1), (N, 16)), "float32 [N, 1] or [N, 16]")
        want = 8 * qw.dequantize(torch.float32).sum(-1)
        if not torch.allclose(sb.float().sum(-1), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
            raise bad("scale_bias", "8 x rowsum(dequantized int4 weight) (msmodelslim pack.py process_scale): is the "
                      "int4 nibble order as msmodelslim packs it?", "disagrees with the packed weight")
        return qw
    # w8a8_static
    deq = _scale_f32(shaped("deq_scale", ((N,), (N, 1)), f"[{N}] float32 or int64 bit pattern")).reshape(N)
    bias = aux["quant_bias"]
    if tuple(bias.shape) not in ((N,), (N, 1)) or bias.dtype != torch.int32:
        raise bad("quant_bias", f"int32 [{N}]", f"is {bias.dtype} {list(bias.shape)}")
    s_in = shaped("input_scale", ((1,), ()), "float [1]").float().reshape(1)
    off = shaped("input_offset", ((1,), ()), "float [1]").float().reshape(1)
    if not bool(s_in > 0) or float(off) != round(float(off)) or not -128 <= float(off) <= 127:
        raise bad("input_scale", "a positive input_scale and an integer input_offset in [-128, 127]",
                  f"is {float(s_in):.4g} with offset {float(off):.4g}")
    return QuantizedWeight(fmt, t, deq.contiguous(), s_in, off, bias.reshape(N).contiguous())


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``w_fp8 [N, K]`` times one fp32 scale per 128x128 block -> fp32 (kept for callers of the old API)."""
    return QuantizedWeight("fp8_block", w, scale_inv.float()).dequantize(torch.float32)


def _convert_quantized(t: QuantizedWeight, target: str) -> QuantizedWeight:
    """``t`` in another quantized format. Lossless where the integers fit int8 (w4a8 -> int8;
    w8a8_static -> int8: the weight scale is ``deq_scale / input_scale``, activations become
    dynamic), otherwise dequantized and quantized again."""
    if target == "int8" and t.format == "w4a8" and not t.group_size:
        return QuantizedWeight("int8", unpack_int4(t.data).contiguous(), t.scale)
    if target == "int8" and t.format == "w8a8_static":
        return QuantizedWeight("int8", t.data, (t.scale / t.input_scale).contiguous())
    return quantize_weight(t.dequantize(torch.float32), target)


def load_state(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    expert_range: range | None = None,
    progress: bool | None = None,
    weight_format: str | None = None,
    native_formats: tuple[str, ...] | None = None,
    prepare: Callable | None = None,
) -> tuple[dict[str, torch.Tensor | QuantizedWeight], bool]:
    """Load the tensors this process owns. Returns ``(state, has_mtp)``.

    ``state`` uses HF names, except each MoE layer's experts appear as ``...mlp.experts.w13``
    ``[E_local, 2I, D]`` and ``...mlp.experts.w2`` ``[E_local, D, I]`` (the experts in
    ``expert_range``, default all; an EP rank passes ``hwlayer.distributed.local_expert_range``).
    Router and indexer-weight tensors stay fp32.

    ``weight_format`` (see :func:`resolve_weight_format`; None = unquantized in ``dtype``): with a
    quantized format the linear weights (:data:`LINEAR_SUFFIXES`) are
    :class:`~hwlayer.ops.quant.QuantizedWeight` -- as stored when the checkpoint stores that
    format (a mixed msmodelslim checkpoint loaded in its own format: each tensor as stored, if
    ``native_formats`` (default: all) holds it, else converted to int8), converted one tensor at a
    time otherwise. A quantized checkpoint's float linear weights stay floats; a float checkpoint
    is quantized entirely. ``prepare`` (``plan.prepare_weight``): applied once to every resident
    weight at the end.
    """
    path = Path(path)
    files = checkpoint_files(path)
    E = cfg.n_routed_experts
    experts = expert_range if expert_range is not None else range(E)
    if experts.step != 1 or not 0 <= experts.start <= experts.stop <= E:
        raise ValueError(f"expert_range: expected a contiguous range within [0, {E}), got {experts}")
    lo, hi = experts.start, experts.stop
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format: expected one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    target = weight_format if weight_format in QUANTIZED_FORMATS else None
    native = tuple(native_formats) if native_formats is not None else WEIGHT_FORMATS
    as_stored = target is not None and cfg.quant is not None and target == cfg.quant.weight_format
    if target == "fp8_block" and cfg.n_routed_experts and cfg.moe_intermediate_size % FP8_BLOCK:
        raise ValueError(f"weight format 'fp8_block': moe_intermediate_size {cfg.moe_intermediate_size} is not a "
                         f"multiple of the {FP8_BLOCK}-row block, so gate and up rows cannot share one expert stack "
                         f"(use int8)")
    desc_types = cfg.quant.tensor_types if cfg.quant is not None else None
    desc_file = path / MSMODELSLIM_DESCRIPTION

    want = expected_tensors(cfg, with_mtp=False)
    mtp = {k: v for k, v in expected_tensors(cfg, with_mtp=True).items() if k not in want}
    has_mtp = bool(mtp) and any(k in files for k in mtp)
    skip_mtp = has_mtp and cfg.quant is not None and cfg.quant.rotated
    if skip_mtp:
        log.warning("%s: msmodelslim QuaRot checkpoint (is_rot_used): MTP layer not loaded (its draft needs rot.weight "
                    "applied to the target hidden state, vllm-ascend models/deepseek_mtp.py; not implemented)", path)
        has_mtp = False
    if has_mtp:
        want |= mtp  # an MTP layer that is present must be complete
    optional = _optional_mtp_tensors(cfg) if has_mtp else {}
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(cfg.num_hidden_layers,
                                                           cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    ignorable = {n for n in files if n.startswith(mtp_prefixes)} if skip_mtp else set()

    # ---- the stored format of every weight, from the description (msmodelslim) or the dtype ----
    def stored_fmt(name: str, st_dtype: str) -> str | None:
        if desc_types is not None:
            from .config import MSMODELSLIM_TYPES

            return MSMODELSLIM_TYPES[desc_types[name]]
        return {"F8_E4M3": "fp8_block", "I8": "int8"}.get(st_dtype)

    if desc_types is not None:
        missing_desc = [n for n in files if n not in desc_types and not n.startswith("rot.")]
        if missing_desc:
            n = missing_desc[0]
            raise CheckpointError(f"{desc_file}: no entry for tensor {n!r} (in {files[n].name}; expected a quant type "
                                  f"W8A8 | W8A8_DYNAMIC | W4A8_DYNAMIC | FLOAT per tensor)")
        phantom = [n for n in desc_types if n not in files]
        if phantom:
            raise CheckpointError(f"{desc_file}: names tensor {phantom[0]!r} ({desc_types[phantom[0]]}) which no "
                                  f"{MSMODELSLIM_PREFIX}*.safetensors file holds")

    # ---- validate names, shapes, dtypes from the headers only (nothing is read yet) ----
    handles: dict[Path, object] = {}

    def handle(f: Path):
        if f not in handles:
            handles[f] = _open(f)
        return handles[f]

    def header(name: str) -> tuple[tuple[int, ...], str]:
        f = files[name]
        try:
            sl = handle(f).get_slice(name)
            return tuple(sl.get_shape()), sl.get_dtype()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r}: {exc}") from None

    missing = [n for n in want if n not in files]
    if missing:
        if desc_types is not None:
            where = path / f"{MSMODELSLIM_PREFIX}.safetensors.index.json"
        else:
            index = path / "model.safetensors.index.json"
            where = index if index.is_file() else path / "model.safetensors"
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))

    def owned(name: str) -> bool:
        if ".mlp.experts." not in name:
            return True
        e = int(name.split(".mlp.experts.")[1].split(".")[0])
        return lo <= e < hi

    names = [n for n in want] + [n for n in optional if n in files]
    shapes = want | optional
    aux_of: dict[str, dict[str, str]] = {}  # quantized weight -> {suffix: aux tensor name}
    fmt_of: dict[str, str] = {}
    for name in names:
        if name not in files:
            continue
        shape, st_dtype = header(name)
        f = files[name]
        if st_dtype not in _SUPPORTED:
            raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {st_dtype} "
                                  f"(expected one of {', '.join(_SUPPORTED)})")
        fmt = stored_fmt(name, st_dtype)
        expect = shapes[name]
        if fmt is not None:
            if len(expect) != 2:
                raise CheckpointError(f"{f}: tensor {name!r} is stored quantized ({fmt}), expected a 2-D weight")
            want_dtype = "F8_E4M3" if fmt == "fp8_block" else "I8"
            if st_dtype != want_dtype:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {st_dtype}, expected {want_dtype} for its "
                                      f"{fmt} quant type")
            if fmt == "w4a8":
                group = cfg.quant.group_size if cfg.quant is not None else 0
                if group and expect[1] % group:
                    raise CheckpointError(f"{f}: w4a8 tensor {name!r} {list(expect)}: group_size {group} (from "
                                          f"{MSMODELSLIM_DESCRIPTION}) does not divide K={expect[1]}")
                if expect[0] % 2:
                    raise CheckpointError(f"{f}: w4a8 tensor {name!r}: N={expect[0]} is odd, expected two int4 per "
                                          f"byte along N")
                expect = (expect[0] // 2, expect[1])
            fmt_of[name] = fmt
            aux = {}
            for suffix, (required, what) in _aux_spec(cfg, fmt).items():
                aname = f"{module_of(name)}.{suffix}"
                if aname in files:
                    aux[suffix] = aname
                elif required:
                    label = {"fp8_block": "fp8", "int8": "int8"}.get(fmt, fmt)
                    raise CheckpointError(f"{f}: {label} tensor {name!r} has no {aname!r} (expected {what})")
            aux_of[name] = aux
        elif st_dtype not in _FLOAT_ST:
            why = f"FLOAT in {MSMODELSLIM_DESCRIPTION}" if desc_types is not None else "F32/BF16/F16"
            raise CheckpointError(f"{f}: tensor {name!r} has dtype {st_dtype}, expected a float weight ({why})")
        if shape != expect:
            extra = " (two int4 per byte along N)" if fmt == "w4a8" else ""
            raise CheckpointError(f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(expect)}{extra}")
    known_aux = {a for aux in aux_of.values() for a in aux.values()}
    unexpected = [n for n in files if n not in want and n not in known_aux and n not in optional
                  and n not in ignorable and not n.startswith("rot.")]
    if unexpected:
        n = unexpected[0]
        aux_names = r"\.(weight_scale(_inv)?|weight_offset|input_scale|input_offset|deq_scale|quant_bias|scale_bias)$"
        hint = " (a scale / offset of a weight stored unquantized?)" if re.search(aux_names, n) else ""
        raise CheckpointError(f"{files[n]}: unexpected tensor {n!r} (not in a glm_moe_dsa checkpoint for this "
                              f"config.json){hint}")
    names = [n for n in names if owned(n) and n in files]
    total_bytes = 0
    for name in names:
        shape, st_dtype = header(name)
        total_bytes += torch.Size(shape).numel() * torch.empty((), dtype=_SUPPORTED[st_dtype]).element_size()

    # ---- read, convert, stack ----
    show = progress if progress is not None else total_bytes > (1 << 30)
    from tqdm import tqdm

    converted: dict[tuple[str, str], list[float]] = {}  # (from, to) -> [n, sum err^2, sum w^2, worst rel]
    recipe = (msmodelslim_recipe(cfg, _RECIPE_OF_FORMAT[target])
              if cfg.quant is None and target in _RECIPE_OF_FORMAT else None)

    def convert(name: str, t: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        """One tensor into its resident form (at most this tensor's fp32 copy exists meanwhile)."""
        linear = is_linear_weight(name)
        if isinstance(t, QuantizedWeight):
            if target is not None and linear:
                keep = t.format in native and (t.format == target or as_stored)
                goal = t.format if keep else (target if target in native else "int8")
                if goal == "w8a8_static" and t.format != goal:  # needs calibrated activations: only as stored
                    goal = "int8"
                if goal == t.format:
                    return t.to(device)
                new = _convert_quantized(t, goal)
                acc = converted.setdefault((t.format, goal), [0, 0.0, 0.0, 0.0])
                acc[0] += 1
                lossless = goal == "int8" and (t.format == "w8a8_static" or (t.format == "w4a8" and not t.group_size))
                if not lossless:
                    ref, got = t.dequantize(torch.float32), new.dequantize(torch.float32)
                    err, ref2 = (got - ref).pow(2).sum().item(), ref.pow(2).sum().item()
                    acc[1] += err
                    acc[2] += ref2
                    acc[3] = max(acc[3], (err / max(ref2, 1e-30)) ** 0.5)
                return new.to(device)
            t = t.dequantize(torch.float32)
        if target is not None and linear and cfg.quant is None:  # a float checkpoint quantized at load
            fmt = _planned_format(cfg, name, target, recipe)
            if fmt is not None:
                return quantize_weight(t.to(device), fmt)
        return t.to(device=device, dtype=torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype)

    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    stacks: dict[str, torch.Tensor | QuantizedWeight] = {}

    def stack_for(key: str, rows: int, like: torch.Tensor | QuantizedWeight, name: str
                  ) -> torch.Tensor | QuantizedWeight:
        n = hi - lo
        if key not in stacks:
            if isinstance(like, QuantizedWeight):
                drows = rows // 2 if like.format == "w4a8" else rows
                srows = -(-rows // FP8_BLOCK) if like.format == "fp8_block" else rows
                stacks[key] = like.replace(
                    data=torch.empty(n, drows, like.data.shape[-1], dtype=like.data.dtype, device=device),
                    scale=torch.empty(n, srows, *like.scale.shape[1:], dtype=torch.float32, device=device))
            else:
                stacks[key] = torch.empty(n, rows, like.shape[-1], dtype=like.dtype, device=device)
        dst = stacks[key]
        if isinstance(dst, QuantizedWeight) != isinstance(like, QuantizedWeight) or (
                isinstance(dst, QuantizedWeight) and (dst.format, dst.group_size) != (like.format, like.group_size)):
            what = like.format if isinstance(like, QuantizedWeight) else "unquantized"
            have = dst.format if isinstance(dst, QuantizedWeight) else "unquantized"
            raise CheckpointError(f"{files[name]}: expert tensor {name!r} is stored {what}, unlike the other experts "
                                  f"of its layer ({have})")
        return dst

    def put(dst: torch.Tensor | QuantizedWeight, e: int, rows: slice, t: torch.Tensor | QuantizedWeight) -> None:
        if isinstance(dst, QuantizedWeight):
            r0, r1 = rows.start or 0, rows.stop
            if dst.format == "w4a8":
                dst.data[e, r0 // 2 : r1 // 2] = t.data
            else:
                dst.data[e, rows] = t.data
            if dst.format == "fp8_block":  # gate/up row blocks: I % 128 == 0 was checked above
                start = r0 // FP8_BLOCK
                dst.scale[e, start : start + t.scale.shape[0]] = t.scale
            else:
                dst.scale[e, rows] = t.scale
        else:
            dst[e, rows] = t

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show)
    for name in names:
        f = files[name]
        try:
            t = handle(f).get_tensor(name)
            nbytes = t.numel() * t.element_size()
            if name in fmt_of:
                aux = {s: handle(files[a]).get_tensor(a) for s, a in aux_of[name].items()}
                where = {s: files[a] for s, a in aux_of[name].items()} | {"weight": f}
                t = _build_quantized(cfg, name, fmt_of[name], t, aux, where)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} (truncated or corrupt file?): {exc}") from None
        bar.update(nbytes)
        t = convert(name, t)
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".")[0], rest.split(".")[1]
            e_local = int(e) - lo
            Im, D = cfg.moe_intermediate_size, cfg.hidden_size
            if proj in ("gate_proj", "up_proj"):
                dst = stack_for(prefix + ".mlp.experts.w13", 2 * Im, t, name)
                put(dst, e_local, slice(0, Im) if proj == "gate_proj" else slice(Im, 2 * Im), t)
            else:
                put(stack_for(prefix + ".mlp.experts.w2", D, t, name), e_local, slice(0, D), t)
        else:
            state[name] = t
    bar.close()
    state |= stacks
    for (src, dst), (n, err2, ref2, worst) in converted.items():
        if ref2:
            log.warning("%s: weight format changed at load: %d %s weights requantized to %s (relative weight error: "
                        "%.2e overall, %.2e worst tensor)", path, n, src, dst, (err2 / ref2) ** 0.5, worst)
        else:
            log.warning("%s: weight format changed at load: %d %s weights converted to %s (lossless)",
                        path, n, src, dst)
    if prepare is not None:
        state = {k: prepare(k, v) for k, v in state.items()}
    return state, has_mtp
