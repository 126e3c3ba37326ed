"""Safetensors checkpoint loading for glm_moe_dsa (HF layout), memory-mapped, tensor by tensor.

* single ``model.safetensors`` or sharded with ``model.safetensors.index.json``;
* only safetensors (never pickle), opened with ``safetensors.safe_open`` (mmap): a tensor is read
  only when it is needed, so a rank loads only what it owns;
* every name, shape and dtype is checked against the config BEFORE any tensor is read, so a bad
  checkpoint fails with one line naming the file and tensor and nothing half-loaded is returned;
* quantized weights (``fp8_block``: ``float8_e4m3fn`` + ``weight_scale_inv``, 128x128 blocks;
  ``int8``: ``int8`` + ``weight_scale`` ``[N, 1]``) are kept quantized for the linear layers and
  experts when the chosen weight format is theirs, converted tensor by tensor otherwise (fp8 ->
  int8 per channel; a float checkpoint quantized at load), dequantized where the model does not
  run them through ``quant_linear`` (``kv_b_proj``: absorbed into the attention) or when the
  format is unquantized. Never a full float copy of the model: one tensor at a time.
  :func:`resolve_weight_format` picks the format; :func:`planned_weight_bytes` predicts the bytes;
* per-expert tensors are stacked into ``w13 [E_local, 2I, D]`` (gate rows then up rows) and
  ``w2 [E_local, D, I]`` for ``plan.fused_experts``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hwlayer.ops.quant import (
    FP8_BLOCK,
    QUANTIZED_FORMATS,
    UNQUANTIZED_FORMATS,
    WEIGHT_FORMATS,
    QuantizedWeight,
    quantize_weight,
)

from .config import ModelConfig

_SUPPORTED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
              "I8": torch.int8}
# Weights the model multiplies through ``hwlayer.ops.quant.linear`` / ``quant_fused_experts``: the
# ones a quantized format keeps quantized. Not here, so kept as floats: embeddings, lm_head, norms,
# the router (``mlp.gate``), the indexer's ``weights_proj`` and ``kv_b_proj`` (absorbed into
# attention through einsum, dequantized at load).
LINEAR_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight",
                   "indexer.wq_b.weight", "indexer.wk.weight", "gate_proj.weight", "up_proj.weight",
                   "down_proj.weight", "eh_proj.weight")
# Where each stored format keeps its scales.
SCALE_SUFFIX = {"fp8_block": "_scale_inv", "int8": "_scale"}
# Kept in fp32 whatever the model dtype (transformers' _keep_in_fp32_modules): router and indexer weights.
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: one line naming the file and the tensor."""


def is_linear_weight(name: str) -> bool:
    return name.endswith(LINEAR_SUFFIXES)


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def checkpoint_format(cfg: ModelConfig) -> str | None:
    """The quantized format the checkpoint declares (``quantization_config``), None when unquantized."""
    return cfg.quant.weight_format if cfg.quant is not None else None


def resolve_weight_format(cfg: ModelConfig, backend, requested: str | None, dtype: torch.dtype) -> str:
    """The weight format to load: ``requested`` if the backend runs it (else ValueError, one line);
    None: the checkpoint's own format when the backend runs it, else the best quantized format the
    backend runs (fp8_block before int8), else unquantized -- returned as ``dtype``'s name."""
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
        return requested
    stored = checkpoint_format(cfg)
    if stored is None:
        return float_name
    if stored in native:
        return stored
    return next((f for f in QUANTIZED_FORMATS if f in native), float_name)


def quantized_in_checkpoint(cfg: ModelConfig, name: str) -> bool:
    """Whether a quantized checkpoint stores ``name`` quantized (linear weights its config converts)."""
    return cfg.quant is not None and is_linear_weight(name) and cfg.quant.converts(module_of(name))


def planned_weight_bytes(cfg: ModelConfig, weight_format: str, dtype: torch.dtype, ep: int = 1,
                         with_mtp: bool = True) -> dict[str, int]:
    """Bytes of weights one rank keeps resident, as :func:`load_state` + the model hold them.

    Returns ``{"replicated": ..., "experts": ..., "scales": ...}`` (scales included in the two
    others, reported apart). Quantized: the linear weights the checkpoint stores quantized (all of
    them for a float checkpoint quantized at load); floats in ``dtype``; router and indexer
    ``weights_proj`` in fp32.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    quantizing = weight_format in QUANTIZED_FORMATS
    out = {"replicated": 0, "experts": 0, "scales": 0}
    for name, shape in expected_tensors(cfg, with_mtp=with_mtp).items():
        n = int(torch.Size(shape).numel())
        quantized = quantizing and is_linear_weight(name) and (cfg.quant is None or quantized_in_checkpoint(cfg, name))
        if quantized:
            N, K = shape
            scales = 4 * (-(-N // FP8_BLOCK) * -(-K // FP8_BLOCK) if weight_format == "fp8_block" else N)
            b = n + scales
        else:
            scales, b = 0, n * (4 if name.endswith(_FP32_SUFFIXES) else elem)
        if ".mlp.experts." in name:
            out["experts"] += b
            out["scales"] += scales // ep
        else:
            out["replicated"] += b
            out["scales"] += scales
    out["experts"] //= ep
    return out


def resident_weight_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes (QuantizedWeight
    data and scales included), skipping the RoPE table: what the loaded weights really occupy."""
    seen: dict[int, int] = {}
    visited: set[int] = set()

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(o, QuantizedWeight):
            walk(o.data)
            walk(o.scale)
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
    """tensor name -> safetensors file, from the index (sharded) or the single file's header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map'): {exc}") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: tensor {name!r} maps to missing file {fname!r}")
            files[name] = f
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path}: only safetensors checkpoints are supported (found pickle .bin/.pt files)")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a bad header / short file
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _stored_quantized(name: str, t: torch.Tensor, scale: torch.Tensor, file: Path, scale_file: Path) -> QuantizedWeight:
    """A checkpoint tensor and its scales as a :class:`QuantizedWeight`, the scale shape checked."""
    N, K = t.shape
    if t.dtype == torch.float8_e4m3fn:
        fmt, want = "fp8_block", (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
        what = f"one scale per {FP8_BLOCK}x{FP8_BLOCK} block"
    else:
        fmt, want = "int8", (N, 1)
        what = "one scale per output channel"
        if tuple(scale.shape) == (N,):
            scale = scale.view(N, 1)
    sname = name + SCALE_SUFFIX[fmt]
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{scale_file}: tensor {sname!r} has shape {list(scale.shape)}, expected "
                              f"{list(want)} ({what} of {name!r} {[N, K]})")
    if not scale.dtype.is_floating_point:
        raise CheckpointError(f"{scale_file}: tensor {sname!r} has dtype {scale.dtype}, expected float32")
    scale = scale.float()
    return QuantizedWeight(fmt, t, scale.view(N) if fmt == "int8" else scale.contiguous())


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``w_fp8 [N, K]`` times one fp32 scale per 128x128 block -> fp32 (kept for callers of the old API)."""
    return _stored_quantized(name, w, scale_inv, file, file).dequantize(torch.float32)


def load_state(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    expert_range: range | None = None,
    progress: bool | None = None,
    weight_format: str | None = None,
) -> tuple[dict[str, torch.Tensor | QuantizedWeight], bool]:
    """Load the tensors this process owns. Returns ``(state, has_mtp)``.

    ``state`` uses HF names, except each MoE layer's experts appear as ``...mlp.experts.w13``
    ``[E_local, 2I, D]`` and ``...mlp.experts.w2`` ``[E_local, D, I]`` (the experts in
    ``expert_range``, default all; an EP rank passes ``hwlayer.distributed.local_expert_range``).
    Router and indexer-weight tensors stay fp32.

    ``weight_format`` (see :func:`resolve_weight_format`; None = unquantized in ``dtype``): with
    ``fp8_block`` / ``int8`` the linear weights (:data:`LINEAR_SUFFIXES`) are
    :class:`~hwlayer.ops.quant.QuantizedWeight` -- as stored when the checkpoint stores that format,
    converted one tensor at a time otherwise. A quantized checkpoint's float linear weights
    (``modules_to_not_convert``) stay floats; a float checkpoint is quantized entirely.
    """
    path = Path(path)
    files = checkpoint_files(path)
    E = cfg.n_routed_experts
    experts = expert_range if expert_range is not None else range(E)
    if experts.step != 1 or not 0 <= experts.start <= experts.stop <= E:
        raise ValueError(f"expert_range: expected a contiguous range within [0, {E}), got {experts}")
    lo, hi = experts.start, experts.stop
    target = weight_format if weight_format in QUANTIZED_FORMATS else None
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format: expected one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    if target == "fp8_block" and cfg.n_routed_experts and cfg.moe_intermediate_size % FP8_BLOCK:
        raise ValueError(f"weight format 'fp8_block': moe_intermediate_size {cfg.moe_intermediate_size} is not a "
                         f"multiple of the {FP8_BLOCK}-row block, so gate and up rows cannot share one expert stack "
                         f"(use int8)")

    want = expected_tensors(cfg, with_mtp=False)
    mtp = {k: v for k, v in expected_tensors(cfg, with_mtp=True).items() if k not in want}
    has_mtp = bool(mtp) and any(k in files for k in mtp)
    if has_mtp:
        want |= mtp  # an MTP layer that is present must be complete
    optional = _optional_mtp_tensors(cfg) if has_mtp else {}

    # ---- validate names, shapes, dtypes from the headers only (nothing is read yet) ----
    scales = {n for n in files if n.endswith(("_scale_inv", "_scale"))}
    missing = [n for n in want if n not in files]
    if missing:
        index = path / "model.safetensors.index.json"
        where = index if index.is_file() else path / "model.safetensors"
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))
    unexpected = [n for n in files if n not in want and n not in scales and n not in optional]
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} (not in a glm_moe_dsa "
                              f"checkpoint for this config.json)")
    handles: dict[Path, object] = {}

    def handle(f: Path):
        if f not in handles:
            handles[f] = _open(f)
        return handles[f]

    def owned(name: str) -> bool:
        if ".mlp.experts." not in name:
            return True
        e = int(name.split(".mlp.experts.")[1].split(".")[0])
        return lo <= e < hi

    names = [n for n in want if owned(n)] + [n for n in optional if n in files]
    shapes = want | optional
    stored_scale: dict[str, str] = {}  # quantized tensor -> its scale tensor's name
    total_bytes = 0
    for name in names:
        f = files[name]
        try:
            sl = handle(f).get_slice(name)
            shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r}: {exc}") from None
        if shape != shapes[name]:
            raise CheckpointError(f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(shapes[name])}")
        if st_dtype not in _SUPPORTED:
            raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {st_dtype} "
                                  f"(expected one of {', '.join(_SUPPORTED)})")
        if st_dtype in ("F8_E4M3", "I8"):
            fmt = "fp8_block" if st_dtype == "F8_E4M3" else "int8"
            sname = name + SCALE_SUFFIX[fmt]
            if sname not in files:
                raise CheckpointError(f"{f}: {fmt.removesuffix('_block')} tensor {name!r} has no {sname!r} scales")
            if len(shape) != 2:
                raise CheckpointError(f"{f}: {fmt} tensor {name!r} has shape {list(shape)}, expected a 2-D weight")
            stored_scale[name] = sname
        total_bytes += torch.Size(shape).numel() * torch.empty((), dtype=_SUPPORTED[st_dtype]).element_size()

    # ---- read, convert, stack ----
    show = progress if progress is not None else total_bytes > (1 << 30)
    from tqdm import tqdm

    def convert(name: str, t: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        """One tensor into its resident form (at most this tensor's fp32 copy exists meanwhile)."""
        quantize = target is not None and is_linear_weight(name) and (
            isinstance(t, QuantizedWeight) or (cfg.quant is None or quantized_in_checkpoint(cfg, name)))
        if isinstance(t, QuantizedWeight):
            if quantize and t.format == target:
                return t.to(device)
            t = t.dequantize(torch.float32)
        if quantize:
            return quantize_weight(t.to(device), target)
        return t.to(device=device, dtype=torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype)

    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    stacks: dict[str, torch.Tensor | QuantizedWeight] = {}

    def stack_for(key: str, rows: int, cols: int,
                  like: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        if key not in stacks:
            n = hi - lo
            if isinstance(like, QuantizedWeight):
                srows = rows if like.format == "int8" else -(-rows // FP8_BLOCK)
                sshape = (n, srows) if like.format == "int8" else (n, srows, like.scale.shape[-1])
                stacks[key] = QuantizedWeight(like.format, torch.empty(n, rows, cols, dtype=like.data.dtype,
                                                                       device=device),
                                              torch.empty(sshape, dtype=torch.float32, device=device))
            else:
                stacks[key] = torch.empty(n, rows, cols, dtype=like.dtype, device=device)
        return stacks[key]

    def put(dst: torch.Tensor | QuantizedWeight, e: int, rows: slice, t: torch.Tensor | QuantizedWeight,
            name: str) -> None:
        if isinstance(dst, QuantizedWeight) != isinstance(t, QuantizedWeight):
            raise CheckpointError(f"{files[name]}: expert tensor {name!r} is stored "
                                  f"{'un' if isinstance(dst, QuantizedWeight) else ''}quantized, unlike the other "
                                  f"experts of its layer")
        if isinstance(dst, QuantizedWeight):
            dst.data[e, rows] = t.data
            if dst.format == "int8":
                dst.scale[e, rows] = t.scale
            else:  # gate/up row blocks: I % 128 == 0 was checked above
                start = (rows.start or 0) // FP8_BLOCK
                dst.scale[e, start : start + t.scale.shape[0]] = t.scale
        else:
            dst[e, rows] = t

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show)
    for name in names:
        f = files[name]
        try:
            t = handle(f).get_tensor(name)
            nbytes = t.numel() * t.element_size()
            if name in stored_scale:
                sname = stored_scale[name]
                t = _stored_quantized(name, t, handle(files[sname]).get_tensor(sname), f, files[sname])
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
                dst = stack_for(prefix + ".mlp.experts.w13", 2 * Im, D, t)
                put(dst, e_local, slice(0, Im) if proj == "gate_proj" else slice(Im, 2 * Im), t, name)
            else:
                put(stack_for(prefix + ".mlp.experts.w2", D, Im, t), e_local, slice(0, D), t, name)
        else:
            state[name] = t
    bar.close()
    state |= stacks
    return state, has_mtp
