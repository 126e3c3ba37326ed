"""Safetensors checkpoint loading for glm_moe_dsa (HF layout), memory-mapped, tensor by tensor.

* single ``model.safetensors`` or sharded with ``model.safetensors.index.json``;
* only safetensors (never pickle), opened with ``safetensors.safe_open`` (mmap): a tensor is read
  only when it is needed, so a rank loads only what it owns;
* every name, shape and dtype is checked against the config BEFORE any tensor is read, so a bad
  checkpoint fails with one line naming the file and tensor and nothing half-loaded is returned;
* FP8 block-scaled weights (``float8_e4m3fn`` + ``weight_scale_inv``, 128x128 blocks) are
  dequantised on load;
* per-expert tensors are stacked into ``w13 [E_local, 2I, D]`` (gate rows then up rows) and
  ``w2 [E_local, D, I]`` for ``plan.fused_experts``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig

FP8_BLOCK = 128
_SUPPORTED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn}
# Kept in fp32 whatever the model dtype (transformers' _keep_in_fp32_modules): router and indexer weights.
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: one line naming the file and the tensor."""


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


def _open(file: Path):  # noqa: ANN202 - safetensors handle
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a bad header / short file
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``w_fp8 [N, K]`` times one fp32 scale per 128x128 block -> fp32."""
    N, K = w.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    if tuple(scale_inv.shape) != (nb, kb):
        raise CheckpointError(
            f"{file}: tensor {name}_scale_inv has shape {list(scale_inv.shape)}, expected [{nb}, {kb}] "
            f"(one scale per {FP8_BLOCK}x{FP8_BLOCK} block)"
        )
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]
    return w.float() * s


def load_state(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    expert_range: range | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors this process owns. Returns ``(state, has_mtp)``.

    ``state`` uses HF names, except each MoE layer's experts appear as ``...mlp.experts.w13``
    ``[E_local, 2I, D]`` and ``...mlp.experts.w2`` ``[E_local, D, I]`` (the experts in
    ``expert_range``, default all; an EP rank passes ``hwlayer.distributed.local_expert_range``).
    Router and indexer-weight tensors stay fp32.
    """
    path = Path(path)
    files = checkpoint_files(path)
    E = cfg.n_routed_experts
    experts = expert_range if expert_range is not None else range(E)
    if experts.step != 1 or not 0 <= experts.start <= experts.stop <= E:
        raise ValueError(f"expert_range: expected a contiguous range within [0, {E}), got {experts}")
    lo, hi = experts.start, experts.stop

    want = expected_tensors(cfg, with_mtp=False)
    mtp = {k: v for k, v in expected_tensors(cfg, with_mtp=True).items() if k not in want}
    has_mtp = bool(mtp) and any(k in files for k in mtp)
    if has_mtp:
        want |= mtp  # an MTP layer that is present must be complete
    optional = _optional_mtp_tensors(cfg) if has_mtp else {}

    # ---- validate names, shapes, dtypes from the headers only (nothing is read yet) ----
    scales = {n for n in files if n.endswith("_scale_inv")}
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

    def handle(f: Path):  # noqa: ANN202
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
        if st_dtype == "F8_E4M3" and name + "_scale_inv" not in files:
            raise CheckpointError(f"{f}: fp8 tensor {name!r} has no {name + '_scale_inv'!r} block scales")
        total_bytes += torch.Size(shape).numel() * torch.empty((), dtype=_SUPPORTED[st_dtype]).element_size()

    # ---- read, convert, stack ----
    show = progress if progress is not None else total_bytes > (1 << 30)
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    stacks: dict[str, torch.Tensor] = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show)
    for name in names:
        f = files[name]
        try:
            t = handle(f).get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                t = _dequant_fp8(t, handle(files[name + "_scale_inv"]).get_tensor(name + "_scale_inv"), name, f)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} (truncated or corrupt file?): {exc}") from None
        bar.update(t.numel() * t.element_size())
        target = torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype
        t = t.to(device=device, dtype=target)
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".")[0], rest.split(".")[1]
            e_local = int(e) - lo
            if proj in ("gate_proj", "up_proj"):
                key = prefix + ".mlp.experts.w13"
                if key not in stacks:
                    stacks[key] = torch.empty(hi - lo, 2 * cfg.moe_intermediate_size, cfg.hidden_size,
                                              dtype=dtype, device=device)
                half = slice(0, cfg.moe_intermediate_size) if proj == "gate_proj" else slice(
                    cfg.moe_intermediate_size, None)
                stacks[key][e_local, half] = t
            else:
                key = prefix + ".mlp.experts.w2"
                if key not in stacks:
                    stacks[key] = torch.empty(hi - lo, cfg.hidden_size, cfg.moe_intermediate_size,
                                              dtype=dtype, device=device)
                stacks[key][e_local] = t
        else:
            state[name] = t
    bar.close()
    state |= stacks
    return state, has_mtp
