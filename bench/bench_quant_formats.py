"""Quality price of every quantized path on the same tiny model (issue 21): logits KL(float ||
quantized) and top-1 agreement against the float model each checkpoint came from, plus the weight
error of the FP8 -> int8 requantization the loader logs, and one op-level output error with
activation outliers.

Paths (all from the same seeded float weights, ``QUANT_TINY_OVERRIDES``):

* ``fp8 native``      -- an fp8_block checkpoint (DeepSeek / GLM-5-FP8 layout) kept in fp8_block;
* ``int8 from bf16``  -- the float checkpoint quantized to int8 per channel at load;
* ``int8 from fp8``   -- the fp8_block checkpoint requantized to int8 at load (an int8-only backend);
* ``msmodelslim W8A8`` -- the GLM-5 recipe (msmodelslim@3de0a3c4 lab_practice/glm_5/glm_5_w8a8.yaml):
  QuaRot + flex_smooth_quant fused into the float weights, then attention static W8A8 (minmax-calibrated
  on the processed float model), MLP W8A8_DYNAMIC; and the same quant types without QuaRot /
  smoothing, as an ablation;
* ``msmodelslim W4A8`` -- routed experts int4 (W4A8_DYNAMIC), attention / dense / shared W8A8_DYNAMIC,
  the MTP layer float;
* ``compressed-tensors int8 / FP8_BLOCK`` -- every Linear (kv_b_proj and the indexer's wk too) quantized.

Logits on 2 sequences x 24 tokens (8 random prompt tokens + the float model's 16 greedy tokens,
teacher-forced; the set tests/test_quant_checkpoints.py bounds), and on a wider set of 128 such
sequences (mean KL with its standard error over sequences: the 2-sequence figure swings with
which of its 48 tokens flip a route or a DSA top-k), fp32 activations, cpu backend (generic ops:
the contract's arithmetic).

Then the msmodelslim W8A8 error breakdown, per attention projection and layer: the relative output
error ``|quant_linear(x, W_q) - x W^T| / |x W^T|`` on the wide set's own activations for our int8
path (per-token dynamic activations), msmodelslim static W8A8 on the unprocessed weights, and the
recipe (QuaRot + flex_smooth_quant, then static W8A8, each on the processed model's inputs); and
the wide-set KL with that projection alone static (recipe-processed, everything else float).

    PYTHONPATH=. .venv/bin/python bench/bench_quant_formats.py [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from hwlayer.ops import quant as Q
from model import load_model
from model.generate import generate, score
from model.tiny import (
    QUANT_TINY_OVERRIDES,
    make_compressed_tensors_checkpoint,
    make_msmodelslim_checkpoint,
    make_tiny_checkpoint,
)


def kl_top1(q, ref, ids: torch.Tensor) -> tuple[float, float]:
    prompt = generate(ref, ids[:, :8], max_new_tokens=16)
    a, b = score(q, prompt), score(ref, prompt)
    lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def kl_wide(q, prompt: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(float || q) over ``prompt``'s sequences and its standard error (per-sequence means)."""
    lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(score(q, prompt), -1)
    per_seq = (lp.exp() * (lp - lq)).sum(-1).mean(-1)
    return float(per_seq.mean()), float(per_seq.std() / len(per_seq) ** 0.5)


def projection_errors(root: Path, flt: Path, prompt: torch.Tensor, ref_logits: torch.Tensor) -> list[dict]:
    """Per static attention projection and layer: relative output error of our int8 path, static W8A8
    on unprocessed weights, and the recipe's static W8A8 (each against the float model it runs on),
    and the wide-set KL with that projection alone static under the recipe."""
    from model.config import ModelConfig
    from model.tiny import STATIC_ATTRS, _record_attention_inputs

    raw = make_msmodelslim_checkpoint(root / "bd-raw", "w8a8", processes=())
    recipe = make_msmodelslim_checkpoint(root / "bd-recipe", "w8a8", keep_float=root / "bd-recipe-float")
    cfg = ModelConfig.from_json(flt)
    models = {"int8": load_model(flt, backend="cpu", weight_format="int8"),
              "static, unprocessed": load_model(raw, backend="cpu"),
              "static, recipe": load_model(recipe, backend="cpu")}
    floats = {"int8": flt, "static, unprocessed": flt, "static, recipe": root / "bd-recipe-float"}
    acts = {key: _record_attention_inputs(path, prompt) for key, path in floats.items()}
    float_models = {key: load_model(path, backend="cpu", weight_format="fp32") for key, path in floats.items()}
    rows = []
    for suffix, attr in STATIC_ATTRS.items():
        alone = make_msmodelslim_checkpoint(root / f"bd-{attr}", "w8a8", only=f"self_attn.{suffix}")
        kl_alone = kl_wide(load_model(alone, backend="cpu"), prompt, ref_logits)
        for i in range(cfg.num_hidden_layers):
            name = f"model.layers.{i}.self_attn.{suffix}"
            if name not in acts["int8"]:
                continue
            row = {"projection": suffix.removesuffix(".weight"), "layer": i, "kl_alone": kl_alone}
            for key, m in models.items():
                x = acts[key][name]
                want = x @ getattr(float_models[key].layers[i].attn, attr).float().t()
                got = Q.quant_linear(x, getattr(m.layers[i].attn, attr))
                row[key] = float((got - want).norm() / want.norm())
                # how much coarser one per-tensor scale is than per-token ones on this input
                row[f"spread {key}"] = float(x.abs().max() / x.abs().amax(-1).median())
            rows.append(row)
    return rows


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def outlier_op_errors(seed: int = 0) -> dict[str, float]:
    """quant_linear output error (relative Frobenius) for x [64, 512] with 8 channels x50, W [256, 512]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 512, generator=g) * 0.05
    x = torch.randn(64, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:8]] *= 50
    ref = x @ w.t()

    def err(qw: Q.QuantizedWeight) -> float:
        return float((Q.quant_linear(x, qw) - ref).norm() / ref.norm())

    fp8 = Q.quantize_weight(w, "fp8_block")
    from_fp8 = Q.quantize_weight(fp8.dequantize(), "int8")
    return {"fp8_block": err(fp8), "int8 from bf16": err(Q.quantize_weight(w, "int8")),
            "int8 from fp8": err(from_fp8), "w4a8": err(Q.quantize_weight(w, "w4a8"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quant-formats-"))
    ids = torch.randint(20, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    flt = make_tiny_checkpoint(root / "float", QUANT_TINY_OVERRIDES)
    fp8 = make_tiny_checkpoint(root / "fp8", QUANT_TINY_OVERRIDES, weight_format="fp8_block")
    ref = load_model(flt, backend="cpu")
    wide_ids = torch.randint(20, 500, (128, 8), generator=torch.Generator().manual_seed(2))
    wide = generate(ref, wide_ids, max_new_tokens=16)
    wide_ref = score(ref, wide)
    handler = _Lines()
    logging.getLogger("model.loader").addHandler(handler)
    paths = {
        "fp8 native": lambda: load_model(fp8, backend="cpu"),
        "int8 from bf16": lambda: load_model(flt, backend="cpu", weight_format="int8"),
        "int8 from fp8": lambda: load_model(fp8, backend="cpu", weight_format="int8"),
        "msmodelslim W8A8": lambda: load_model(make_msmodelslim_checkpoint(root / "w8a8", "w8a8"), backend="cpu"),
        "msmodelslim W8A8 without QuaRot / smoothing (ablation)": lambda: load_model(
            make_msmodelslim_checkpoint(root / "w8a8-raw", "w8a8", processes=()), backend="cpu"),
        "msmodelslim W4A8": lambda: load_model(make_msmodelslim_checkpoint(root / "w4a8", "w4a8"), backend="cpu"),
        "compressed-tensors int8": lambda: load_model(make_compressed_tensors_checkpoint(root / "ct8", "int8"),
                                                      backend="cpu"),
        "compressed-tensors FP8_BLOCK": lambda: load_model(
            make_compressed_tensors_checkpoint(root / "ctf", "fp8_block"), backend="cpu"),
    }
    rows = {}
    for name, load in paths.items():
        handler.lines.clear()
        m = load()
        kl, top1 = kl_top1(m, ref, ids)
        kl128, se = kl_wide(m, wide, wide_ref)
        rows[name] = {"weight_format": m.weight_format, "kl": kl, "top1": top1, "kl_128": kl128, "kl_128_se": se,
                      "load_log": [line.split(": ", 1)[1] for line in handler.lines]}
    handler.lines.clear()
    ops = outlier_op_errors()
    breakdown = projection_errors(root, flt, wide, wide_ref)
    if args.json:
        print(json.dumps({"models": rows, "outlier_op_errors": ops, "w8a8_breakdown": breakdown}, indent=2))
        return
    print("| path | loaded as | mean KL(float ‖ quantized), 2 seqs | top-1 agreement, 2 seqs "
          "| mean KL, 128 seqs (± s.e.) | load log |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | `{r['weight_format']}` | {r['kl']:.4f} | {r['top1']:.3f} "
              f"| {r['kl_128']:.4f} ± {r['kl_128_se']:.4f} | {'; '.join(r['load_log'])} |")
    print()
    print("msmodelslim W8A8 per projection: relative output error on the 128 sequences' activations; "
          "KL with it alone static (recipe), 128 seqs")
    print("| projection | layer | int8 (per-token) | static W8A8, unprocessed | static W8A8, recipe | KL alone "
          "| input absmax / median token absmax (unprocessed, recipe) |")
    print("|---|---|---|---|---|---|---|")
    for r in breakdown:
        print(f"| {r['projection']} | {r['layer']} | {r['int8']:.2e} | {r['static, unprocessed']:.2e} "
              f"| {r['static, recipe']:.2e} | {r['kl_alone'][0]:.4f} ± {r['kl_alone'][1]:.4f} "
              f"| {r['spread int8']:.1f}, {r['spread static, recipe']:.1f} |")
    print()
    print("quant_linear, x [64, 512] with 8 channels x50, W [256, 512]: relative output error")
    for name, e in ops.items():
        print(f"  {name}: {e:.2e}")


if __name__ == "__main__":
    main()
