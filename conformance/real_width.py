"""A small checkpoint with GLM-5's attention geometry, for the real-width run of every emulated backend.

The conformance cases use toy widths that no vendor kernel takes (latent 32 + rope 8, 4 heads), so
a vendor's DSA adapters decline them and the generic op serves. This checkpoint has the widths the
kernels are built for -- 64 query heads, latent 512 + rope 64 (d_qk 576, d_v 512), indexer 32 heads
x 128, top-2048 (``/work/shared/reference/glm5-config.json``) -- and little else: two layers (one
dense, one MoE with 32 experts, top-4, one shared expert), hidden 256, small q / v / nope widths, the
tiny tokenizer's 512-token vocabulary, no MTP layer. Random weights, written in the real HF layout
by :func:`model.tiny.make_tiny_checkpoint`; tests/test_real_width.py runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# GLM-5 (glm5-config.json) where the vendor kernels care; small elsewhere.
REAL_WIDTH_CONFIG: dict[str, Any] = {
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "head_dim": 64,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 2048,
    "n_group": 1,  # GLM-5: one expert group
    "topk_group": 1,
    # small, so the run stays fast on two cores
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "q_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "intermediate_size": 256,
    "n_routed_experts": 32,  # a multiple of 32: mate's moe_fused_gate (num_experts % WARP_SIZE)
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "num_nextn_predict_layers": 0,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "max_position_embeddings": 4096,
    "dtype": "bfloat16",
}


def make_real_width_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the real-width checkpoint (bf16) into ``path``; returns ``path``."""
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(path, REAL_WIDTH_CONFIG, seed=seed, dtype=torch.bfloat16, std=0.05)
