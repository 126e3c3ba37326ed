"""End-to-end: the GLM-5 model on the backend under test vs. an independent float64 golden.

The golden below is a naive float64 forward written from the transformers math (expanded MLA
through kv_b_proj with a dense masked softmax, dense indexer scores + top-k mask, a dense MoE over
all experts): no hwlayer ops, no model/ code, only the checkpoint read with safetensors. It checks
logits error, top-1 agreement and KL divergence, and that prefill-then-decode through the paged
cache equals one long prefill.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import Batch, load_model
from model.generate import score
from model.tiny import make_tiny_checkpoint

from .checks import skip_unless_reference

SEQ = 24
# Per model dtype: max |logit error|, min top-1 agreement, max mean KL(golden || model).
# Reduced precision is judged on agreement and KL: a rounding can flip a routed expert or an
# indexer key on a tiny random model, which moves a few logits a lot.
TOLERANCES = {"fp32": (2e-4, 1.0, 1e-7), "bf16": (None, 0.8, 0.05), "fp16": (None, 0.8, 0.02)}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # index_topk 8 < SEQ: the sparse mask really removes keys; n_group 2 / topk_group 1: group-limited routing
    return make_tiny_checkpoint(tmp_path_factory.mktemp("e2e") / "ckpt",
                                {"index_topk": 8, "max_position_embeddings": 256}, seed=7)


def _backend(request: pytest.FixtureRequest) -> str:
    try:
        return request.getfixturevalue("backend_name")
    except pytest.FixtureLookupError:
        return request.config.getoption("--backend", default=None) or "cpu"


# ------------------------------------------------------------------------------ float64 golden


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-J pairs (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d); returned de-interleaved (evens
    then odds) exactly as transformers does; q and k get the same permutation."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    while ang.dim() < x.dim():
        ang = ang.unsqueeze(-2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def golden_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    c = json.loads((path / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    T = ids.numel()
    H, dn, dr, dv, dl = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                         c["kv_lora_rank"])
    Hi, Di, E, k = c["index_n_heads"], c["index_head_dim"], c["n_routed_experts"], c["num_experts_per_tok"]
    theta, eps = c["rope_parameters"]["rope_theta"], c["rms_norm_eps"]
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        cq = _rms(h @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], 1e-6)
        q = (cq @ w[a + "q_b_proj.weight"].T).view(T, H, dn + dr)
        ckv = h @ w[a + "kv_a_proj_with_mqa.weight"].T
        kv = (_rms(ckv[:, :dl], w[a + "kv_a_layernorm.weight"], 1e-6) @ w[a + "kv_b_proj.weight"].T).view(T, H, dn + dv)
        q_full = torch.cat([q[..., :dn], _rope_interleaved(q[..., dn:], pos, theta)], -1)
        k_pe = _rope_interleaved(ckv[:, dl:], pos, theta)
        k_full = torch.cat([kv[..., :dn], k_pe[:, None].expand(T, H, dr)], -1)
        # dense lightning indexer, rope on the FIRST dr dims
        ip = a + "indexer."
        qi = (cq @ w[ip + "wq_b.weight"].T).view(T, Hi, Di)
        qi = torch.cat([_rope_interleaved(qi[..., :dr], pos, theta), qi[..., dr:]], -1)
        ki = torch.nn.functional.layer_norm(h @ w[ip + "wk.weight"].T, (Di,), w[ip + "k_norm.weight"],
                                            w[ip + "k_norm.bias"], 1e-6)
        ki = torch.cat([_rope_interleaved(ki[:, :dr], pos, theta), ki[:, dr:]], -1)
        hw = (h @ w[ip + "weights_proj.weight"].T) * Hi**-0.5
        iscore = torch.einsum("th,ths->ts", hw, torch.relu(torch.einsum("thd,sd->ths", qi, ki) * Di**-0.5))
        iscore = iscore.masked_fill(~causal, -math.inf)
        top = iscore.topk(min(c["index_topk"], T), dim=-1).indices
        keep = torch.zeros(T, T, dtype=torch.bool).scatter_(1, top, True) & causal
        s = torch.einsum("thd,shd->hts", q_full, k_full) * (dn + dr) ** -0.5
        s = s.masked_fill(~keep[None], -math.inf).softmax(-1)
        o = torch.einsum("hts,shd->thd", s, kv[..., dn:]).reshape(T, H * dv)
        x = x + o @ w[a + "o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."

        def swiglu(z: torch.Tensor, q: str) -> torch.Tensor:
            g = torch.nn.functional.silu(z @ w[q + "gate_proj.weight"].T)
            return (g * (z @ w[q + "up_proj.weight"].T)) @ w[q + "down_proj.weight"].T

        if m + "gate.weight" not in w:
            x = x + swiglu(h, m)
            continue
        scores = torch.sigmoid(h @ w[m + "gate.weight"].T)
        choice = scores + w[m + "gate.e_score_correction_bias"]
        G = c["n_group"]
        grouped = choice.view(T, G, E // G)
        best_groups = grouped.topk(2, -1).values.sum(-1).topk(c["topk_group"], -1).indices
        gmask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~gmask[..., None], -math.inf).view(T, E)
        ids_e = choice.topk(k, -1).indices
        wt = scores.gather(1, ids_e)
        wt = wt / (wt.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
        dense_w = torch.zeros(T, E, dtype=torch.float64).scatter_(1, ids_e, wt)
        routed = sum(dense_w[:, e : e + 1] * swiglu(h, f"{m}experts.{e}.") for e in range(E))
        x = x + routed + swiglu(h, m + "shared_experts.")
    return _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


# ------------------------------------------------------------------------------------------ tests


def test_logits_against_float64_golden(checkpoint, request, dtype):
    """``dtype`` is the conformance suite's parametrised model dtype (``--dtype``)."""
    backend, model_dtype = _backend(request), dtype
    ids = torch.randint(0, 500, (SEQ,), generator=torch.Generator().manual_seed(1))
    ref = golden_logits(checkpoint, ids)
    model = load_model(checkpoint, backend=backend, dtype=TORCH_DTYPES[model_dtype])
    got = score(model, ids[None])[0].double().cpu()
    max_err = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    try:
        request.getfixturevalue("conformance_report").add_extra(
            f"model_e2e_{model_dtype}", {"max_abs_logit_error": max_err, "top1_agreement": top1, "mean_kl": kl})
    except pytest.FixtureLookupError:
        pass
    tol_err, tol_top1, tol_kl = TOLERANCES[model_dtype]
    if tol_err is not None:
        assert max_err <= tol_err, f"{backend}/{model_dtype}: max |logit error| {max_err:.3g} > {tol_err}"
    assert top1 >= tol_top1, f"{backend}/{model_dtype}: top-1 agreement {top1:.2f} < {tol_top1}"
    assert kl <= tol_kl, f"{backend}/{model_dtype}: mean KL {kl:.3g} > {tol_kl}"


def test_golden_is_sensitive_to_the_sparse_mask(checkpoint, request):
    """The golden itself must depend on index_topk (else the comparison would not test DSA).
    A suite self-test: runs with the reference backend only."""
    skip_unless_reference(_backend(request))
    ids = torch.randint(0, 500, (SEQ,), generator=torch.Generator().manual_seed(1))
    cfg_path = checkpoint / "config.json"
    sparse = golden_logits(checkpoint, ids)
    raw = json.loads(cfg_path.read_text())
    try:
        cfg_path.write_text(json.dumps(raw | {"index_topk": SEQ}))
        dense = golden_logits(checkpoint, ids)
    finally:
        cfg_path.write_text(json.dumps(raw))
    assert (sparse - dense).abs().max().item() > 1e-3


def test_prefill_then_decode_equals_one_long_prefill(checkpoint, request):
    backend = _backend(request)
    model = load_model(checkpoint, backend=backend, dtype=torch.float32)
    ids = torch.randint(0, 500, (SEQ,), generator=torch.Generator().manual_seed(2))
    full = score(model, ids[None])[0].cpu()
    cache = model.new_cache(num_blocks=4, block_size=8)
    table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)  # scattered physical blocks
    n0 = 16
    first = model.forward_batch(Batch(ids[:n0], torch.tensor([0, n0], dtype=torch.int32),
                                      torch.tensor([n0], dtype=torch.int32), table), cache)
    steps = [first[0].cpu()]
    for t in range(n0, n0 + 4):  # one token per step: the decode path
        out = model.forward_batch(Batch(ids[t : t + 1], torch.tensor([0, 1], dtype=torch.int32),
                                        torch.tensor([t + 1], dtype=torch.int32), table), cache)
        steps.append(out[0].cpu())
    # then the last 4 tokens as one more chunk: the chunked-prefill path gives its last logits
    out = model.forward_batch(Batch(ids[n0 + 4 :], torch.tensor([0, SEQ - n0 - 4], dtype=torch.int32),
                                    torch.tensor([SEQ], dtype=torch.int32), table), cache)
    full = torch.cat([full[: n0 + 4], full[SEQ - 1 :]])
    got = torch.stack(steps + [out[0].cpu()])
    err = (got - full[n0 - 1 :]).abs().max().item()
    assert err <= 1e-4, f"{backend}: prefill+decode differs from one prefill by {err:.3g}"
