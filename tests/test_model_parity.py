"""Parity of model/ (hwlayer ops, absorbed MLA over the paged cache) with transformers'
GlmMoeDsaForCausalLM on tiny random checkpoints saved with save_pretrained (real per-expert layout).

transformers is a test dependency only; it is the independent reference here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM  # noqa: E402

from model import Batch, load_model  # noqa: E402
from model.generate import generate, generate_speculative, score  # noqa: E402
from model.tiny import make_tiny_checkpoint  # noqa: E402

BASE = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    index_n_heads=8, index_head_dim=16, index_topk=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    moe_intermediate_size=32, intermediate_size=96, first_k_dense_replace=1, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, max_position_embeddings=512, eos_token_id=[1], pad_token_id=0, bos_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
CONFIGS = {
    # grouped routing (topk_group < n_group), sparse attention (index_topk 8 << 24 tokens), first layer dense
    "base": {},
    # IndexShare ("F"/"S" pattern: layers 1 and 3 reuse the previous full layer's top-k) + YaRN RoPE with mscale
    "indexshare_yarn": dict(
        num_hidden_layers=4, index_topk_pattern="FSFS",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.707,
                         "beta_fast": 32, "beta_slow": 1},
    ),
}
PROMPT_LEN = 24


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits and routing are far from flat (HF's 0.02 init is near-uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def build_hf_checkpoint(path: Path, overrides: dict, seed: int = 0) -> GlmMoeDsaForCausalLM:
    cfg = GlmMoeDsaConfig(**(BASE | overrides))
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(cfg)
    _randomise(model, seed)
    model.save_pretrained(path)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf = build_hf_checkpoint(path, CONFIGS[request.param])
    return request.param, path, hf, load_model(path, backend="cpu", dtype=torch.float32)


def _prompt(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_config_derivations_match_transformers(pair):
    name, path, hf, ours = pair
    assert ours.config.indexer_types == list(hf.config.indexer_types)
    assert ours.config.mlp_layer_types == list(hf.config.mlp_layer_types)
    assert ours.config.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    inv_freq = hf.model.rotary_emb.inv_freq
    from model.config import rope_inv_freq

    ours_freq, factor = rope_inv_freq(ours.config)
    torch.testing.assert_close(ours_freq, inv_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf.model.rotary_emb.attention_scaling)
    if name == "indexshare_yarn":
        assert ours.config.indexer_types == ["full", "shared", "full", "shared"]
        assert factor != 1.0 and ours.config.softmax_scale != ours.config.qk_head_dim**-0.5


def test_fp32_logits_match_transformers(pair):
    _, _, hf, ours = pair
    ids = _prompt(PROMPT_LEN, 1)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    got = score(ours, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_sparsity_really_cuts_keys(pair):
    """With index_topk 8 < 24 tokens the indexer must change the result vs. dense attention."""
    _, _, _, ours = pair
    ids = _prompt(PROMPT_LEN, 1)
    sparse = score(ours, ids)
    attns = [layer.attn for layer in ours.layers if layer.attn.has_indexer]
    try:
        for a in attns:
            a.topk = PROMPT_LEN
        dense = score(ours, ids)
    finally:
        for a in attns:
            a.topk = ours.config.index_topk
    assert (sparse[:, 8:] - dense[:, 8:]).abs().max().item() > 1e-3
    torch.testing.assert_close(sparse[:, :8], dense[:, :8], rtol=0, atol=1e-5)  # <= topk keys: identical


def test_greedy_generate_32_tokens_matches_transformers(pair):
    _, _, hf, ours = pair
    ids = _prompt(PROMPT_LEN, 2)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=32)
    got = generate(ours, ids, max_new_tokens=32, stop_at_eos=False)
    assert got.shape == ref.shape
    assert got.tolist() == ref.tolist()


def test_varlen_batch_matches_transformers_right_padded(pair):
    """Ours: one token-major varlen batch through forward_batch's paged cache; transformers: the
    same sequences right-padded with an attention mask. Compared per sequence on real tokens."""
    _, _, hf, ours = pair
    lens = [24, 13, 5]
    seqs = [_prompt(n, 10 + i)[0] for i, n in enumerate(lens)]
    padded = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        ref = hf(padded, attention_mask=mask).logits.float()
    got = score(ours, [s.tolist() for s in seqs])
    for i, n in enumerate(lens):
        assert (got[i] - ref[i, :n]).abs().max().item() <= 1e-4, f"sequence {i}"

    # The serving path: chunked prefill in two varlen batches (different chunk sizes per sequence),
    # then one decode step for all three; last-token logits must match transformers.
    cache = ours.new_cache(num_blocks=13, block_size=4)
    table = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0, 0], [12, 11, 0, 0, 0, 0, 0]], dtype=torch.int32)
    split = [10, 12, 2]
    first = Batch(torch.cat([s[:k] for s, k in zip(seqs, split, strict=True)]),
                  torch.tensor([0, 10, 22, 24], dtype=torch.int32), torch.tensor(split, dtype=torch.int32), table)
    ours.forward_batch(first, cache)
    rest = [s[k:] for s, k in zip(seqs, split, strict=True)]
    cu = torch.tensor([0] + [len(r) for r in rest], dtype=torch.int32).cumsum(0).to(torch.int32)
    last = ours.forward_batch(Batch(torch.cat(rest), cu, torch.tensor(lens, dtype=torch.int32), table), cache)
    for i, n in enumerate(lens):
        assert (last[i] - ref[i, n - 1]).abs().max().item() <= 1e-4, f"sequence {i} after chunked prefill"


def test_bf16_logits_close_to_transformers_bf16(pair):
    """bf16 on both sides (router and indexer-weight tensors stay fp32 on both sides, as transformers
    keeps them), both measured against transformers in fp32 over 3 prompts.

    Stated bf16 tolerance: our mean |logit error| <= 2x transformers-bf16's own mean error + 0.01, and
    top-1 agreement with fp32 >= 70%. (Tiny random models are discrete-event heavy: a bf16 rounding
    flips an expert or an indexer key now and then on either side, so max-error bounds are meaningless.)"""
    _, path, hf32, _ = pair
    hf = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = load_model(path, backend="cpu", dtype="bf16")
    assert ours.layers[0].attn.q_a_proj.dtype == torch.bfloat16
    ours_err, hf_err, agree = [], [], []
    for seed in range(3):
        ids = _prompt(PROMPT_LEN, seed)
        with torch.no_grad():
            ref16, ref32 = hf(ids).logits.float(), hf32(ids).logits.float()
        got = score(ours, ids)
        ours_err.append((got - ref32).abs().mean().item())
        hf_err.append((ref16 - ref32).abs().mean().item())
        agree.append((got.argmax(-1) == ref32.argmax(-1)).float().mean().item())
    assert sum(ours_err) / 3 <= 2 * sum(hf_err) / 3 + 0.01, (ours_err, hf_err)
    assert sum(agree) / 3 >= 0.7, agree


# ---------------------------------------------------------------------------- MTP speculative decoding


def _mtp_that_predicts_well(path: Path) -> None:
    """Rewrite the checkpoint so the MTP draft is usually right: the main model's attention and MLP
    outputs are damped (x0.1), so its next token depends mostly on the current token, and the MTP
    layer passes enorm(embed(token)) straight to the shared head. Some drafts are then accepted and
    some rejected, exercising both verify branches."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    t = load_file(str(file))
    cfg = json.loads((path / "config.json").read_text())
    L, D = cfg["num_hidden_layers"], cfg["hidden_size"]
    p = f"model.layers.{L}."
    t[p + "eh_proj.weight"] = torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1)
    t[p + "enorm.weight"] = torch.ones(D)
    t[p + "shared_head.norm.weight"] = t["model.norm.weight"].clone()
    for k in t:
        if k.endswith("o_proj.weight") or k.endswith("down_proj.weight"):
            t[k].mul_(1e-3 if k.startswith(p) else 0.1)
    save_file(t, str(file))


@pytest.mark.parametrize("variant", ["random_mtp", "good_mtp"])
def test_speculative_equals_plain_greedy(tmp_path, variant):
    path = make_tiny_checkpoint(tmp_path / variant, {"vocab_size": 512, "index_topk": 8}, seed=3)
    if variant == "good_mtp":
        _mtp_that_predicts_well(path)
    m = load_model(path, backend="cpu")
    assert m.mtp is not None
    prompts = [list(range(5, 35)), list(range(100, 111)), [7, 9, 11]]  # batch > 1, different lengths
    plain = generate(m, prompts, max_new_tokens=24, stop_at_eos=False)
    spec = generate_speculative(m, prompts, max_new_tokens=24, stop_at_eos=False)
    assert [s.tolist() for s in spec.tokens] == [p.tolist() for p in plain]
    assert spec.proposed > 0 and 0.0 <= spec.acceptance_rate <= 1.0
    if variant == "good_mtp":
        assert spec.accepted > 0, spec  # the accept branch really ran
        assert spec.accepted < spec.proposed, spec  # and the reject branch too


def test_checkpoint_without_mtp_weights_refuses_speculation(pair):
    _, _, _, ours = pair
    assert ours.mtp is None  # transformers does not save the MTP layer
    with pytest.raises(ValueError, match="speculative decoding needs an MTP layer"):
        generate_speculative(ours, _prompt(4, 0), max_new_tokens=2)
