"""GLM-5 (`glm_moe_dsa`) inference written against hwlayer ops.

Every kernel-shaped step goes through the dispatch plan (``self.plan = hwlayer.plan(backend)``);
plain torch is used only for linear layers, the embedding and tensor plumbing (cat / view).
Notation: T tokens in the batch, H heads, dl = kv_lora_rank, dr = qk_rope_head_dim,
dn = qk_nope_head_dim, dv = v_head_dim, Hi / Di = indexer heads / head dim.

Attention is always the absorbed MLA form over the latent paged cache: a cache row is
``[kv_a_layernorm(c) (dl), rope(k_pe) (dr)]``; ``q~ = q_nope @ W_uk`` and
``out = attn @ W_uv^T``, so the cache is never expanded through ``kv_b_proj``.

This file holds the network only; scoring and generation loops (greedy, MTP speculative) are in
:mod:`model.generate`, the server's continuous batching in ``serving/engine.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from hwlayer.ops.cache import AttentionLayout, PagedKV
from hwlayer.ops.layout import (
    AttentionMetadata,
    attention_metadata,
    check_varlen_values,
    fp32_scalar,
    with_backend_tables,
)
from hwlayer.ops.quant import QuantizedWeight, concat_rows, linear

from .config import ModelConfig, rope_inv_freq

NORM_EPS_ATTN = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers' default) and the indexer's k_norm


@dataclass
class Batch:
    """Token-major varlen batch (the hwlayer serving layout), in HOST memory (CPU tensors): the
    scheduler's view of a step. :meth:`GLM5.context` turns it into device tensors once per step."""

    input_ids: torch.Tensor  # int64 [T], new tokens of all sequences concatenated
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B], context length including the new tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]


class PagedCache:
    """The model's paged caches, laid out by the backend (``plan.backend.layout()``, hook specs 2.0):
    per layer a latent cache and, for layers that run the indexer, an indexer key cache (None on
    IndexShare "shared" layers). The model hands these objects to the cache ops and never looks inside."""

    def __init__(self, cfg: ModelConfig, n_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, layout: AttentionLayout) -> None:
        self.num_blocks, self.block_size, self.layout = num_blocks, block_size, layout
        self.latent = [layout.latent_cache(num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype,
                                           device) for _ in range(n_layers)]
        self.indexer = [
            layout.indexer_cache(num_blocks, block_size, cfg.index_head_dim, dtype, device)
            if cfg.layer_has_indexer(i) else None
            for i in range(n_layers)
        ]

    # Inspection (tests, tools): the canonical tensors where the layout stores them so, else the objects.
    @property
    def kv(self) -> list:
        return [c.canonical if c.canonical is not None else c for c in self.latent]

    @property
    def index_k(self) -> list:
        return [None if c is None else c.canonical if c.canonical is not None else c for c in self.indexer]


@dataclass
class ForwardContext:
    """Per-step device tensors shared by every layer, plus the host-side sizes the ops take.

    Built once per step from :class:`StepMetadata` (host), so no layer ever reads a device tensor
    on the host: ``max_seqlen_q`` / ``max_seqlen_k`` are Python ints (upper bounds; a captured
    decode step uses the cache's capacity for ``max_seqlen_k`` so one graph serves every length).
    """

    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T], -1 = padding row (writes nowhere)
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    cos_sin: torch.Tensor  # fp32 [max_pos, dr]
    max_seqlen_q: int = 0  # host: most new tokens of any sequence
    max_seqlen_k: int = 0  # host: longest context (>= any seq_lens entry)
    input_ids: torch.Tensor | None = None  # int64 [T] (None when the caller feeds its own tokens)
    has_padding: bool = True  # host: slot_mapping may hold -1 rows (False only when the host knows it does not)
    attn: AttentionMetadata | None = None  # the ops' per-step tables, built by GLM5.hidden_states
    # host, expert parallelism: the tokens per rank of a step every rank runs at one padded size (a
    # captured decode step), so ep_dispatch / ep_combine take their fixed-capacity form; None: exact form
    ep_capacity: int | None = None


@dataclass
class StepMetadata:
    """Everything a step needs to know, on the host, built once from what the scheduler knows.

    The scheduler knows each sequence's new-token count, context length and blocks as Python ints;
    positions and cache slots follow by index arithmetic, done here in numpy (microseconds)
    instead of on the device, and validated here for free (a device-side check would need a
    device->host read). :meth:`to_device` then moves it all in ONE copy (vLLM's attention metadata
    builders and numpy-backed host buffers follow the same idea).
    """

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    cu_seqlens_q: np.ndarray  # int64 [B+1]
    seq_lens: np.ndarray  # int64 [B]
    block_table: np.ndarray  # int64 [B, max_blocks]
    max_seqlen_q: int
    max_seqlen_k: int
    ep_capacity: int | None = None  # ForwardContext.ep_capacity (set by a runner that pads every rank alike)

    @classmethod
    def from_batch(cls, batch: Batch, block_size: int, num_blocks: int, max_positions: int) -> StepMetadata:
        """Host metadata of ``batch`` (host tensors) for a cache of ``num_blocks`` x ``block_size``;
        raises ``ValueError`` (one line, ``Batch: ...``) for a batch the model cannot run."""
        ids = _host(batch.input_ids)
        cu, lens, table = _host(batch.cu_seqlens_q), _host(batch.seq_lens), _host(batch.block_table)
        T, B = ids.shape[0], lens.shape[0]
        if cu.ndim != 1 or lens.ndim != 1 or cu.shape[0] != B + 1:
            raise ValueError(f"Batch: expected cu_seqlens_q [B+1] and seq_lens [B], got {list(cu.shape)} "
                             f"and {list(lens.shape)}")
        check_varlen_values("Batch", cu.tolist(), lens.tolist(), T)
        q_lens = np.diff(cu)
        if B and int(q_lens.min()) == 0:
            raise ValueError(f"Batch: expected >= 1 new token per sequence, got cu_seqlens_q={cu.tolist()}")
        max_len = int(lens.max()) if B else 0
        if max_len > max_positions:
            raise ValueError(f"Batch: context of {max_len} tokens exceeds max_position_embeddings {max_positions}")
        if table.ndim != 2 or table.shape[0] != B or table.shape[1] * block_size < max_len:
            raise ValueError(f"Batch: block_table {list(table.shape)} cannot address {max_len} positions "
                             f"with block_size {block_size}")
        seq_idx = np.repeat(np.arange(B), q_lens)
        positions = (lens - q_lens)[seq_idx] + np.arange(T) - cu[seq_idx]
        slots = table[seq_idx, positions // block_size] * block_size + positions % block_size
        if T and int(slots.max()) >= num_blocks * block_size:
            raise ValueError(f"Batch: block_table names block {int(slots.max()) // block_size}, the cache has "
                             f"{num_blocks} blocks")
        return cls(ids, positions, slots, cu, lens, table, int(q_lens.max()) if B else 0, max_len)

    def to_device(self, device: torch.device, cos_sin: torch.Tensor) -> ForwardContext:
        """One host->device copy of the packed int64 metadata (pinned and asynchronous where the
        device has pinned memory), then views and dtype casts on the device."""
        T, B = self.input_ids.shape[0], self.seq_lens.shape[0]
        packed = torch.from_numpy(np.concatenate([self.input_ids, self.positions, self.slot_mapping,
                                                  self.cu_seqlens_q, self.seq_lens, self.block_table.reshape(-1)]))
        if device.type != "cpu":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
        ids, positions, slots, cu, lens, table = packed.split([T, T, T, B + 1, B, self.block_table.size])
        return ForwardContext(positions, slots, cu.to(torch.int32), lens.to(torch.int32),
                              table.view(self.block_table.shape).to(torch.int32), cos_sin,
                              self.max_seqlen_q, self.max_seqlen_k, ids, has_padding=False,
                              ep_capacity=self.ep_capacity)


def _host(t: torch.Tensor | np.ndarray | list) -> np.ndarray:
    """int64 numpy view of host data (a device tensor here would cost a sync: Batch is host data)."""
    if isinstance(t, torch.Tensor):  # integer data: never requires grad, so no detach
        return (t if t.device.type == "cpu" else t.cpu()).numpy().astype(np.int64, copy=False)
    return np.asarray(t, dtype=np.int64)


class Attention:
    """MLA + the DSA lightning indexer for one layer."""

    def __init__(self, model: GLM5, w: dict[str, torch.Tensor], p: str, layer_idx: int) -> None:
        cfg = model.config
        self.plan, self.layer_idx = model.plan, layer_idx
        self.H, self.dl, self.dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.dn, self.dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.q_a_proj = w[p + "q_a_proj.weight"]
        self.q_a_norm = w[p + "q_a_layernorm.weight"]
        self.q_b_proj = w[p + "q_b_proj.weight"]
        self.kv_a_proj = w[p + "kv_a_proj_with_mqa.weight"]
        self.kv_a_norm = w[p + "kv_a_layernorm.weight"]
        self.o_proj = w[p + "o_proj.weight"]
        # Absorption: kv_b_proj [H*(dn+dv), dl] split into W_uk [H, dn, dl] and W_uv [H, dv, dl].
        kv_b = w[p + "kv_b_proj.weight"].view(self.H, self.dn + self.dv, self.dl)
        self.w_uk = kv_b[:, : self.dn].contiguous()  # [H, dn, dl]
        self.w_uv_t = kv_b[:, self.dn :].transpose(1, 2).contiguous()  # [H, dl, dv]: laid out for the bmm
        self.has_indexer = cfg.layer_has_indexer(layer_idx)
        if self.has_indexer:
            ip = p + "indexer."
            self.Hi, self.Di, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
            self.wq_b = w[ip + "wq_b.weight"]
            self.wk = w[ip + "wk.weight"]
            self.k_norm_w, self.k_norm_b = w[ip + "k_norm.weight"], w[ip + "k_norm.bias"]
            self.weights_proj = w[ip + "weights_proj.weight"]  # fp32, as transformers keeps it

    def indexer(self, x: torch.Tensor, cq: torch.Tensor, ctx: ForwardContext, k_cache: PagedKV) -> torch.Tensor:
        T = x.shape[0]
        q = linear(self.plan, cq, self.wq_b).view(T, self.Hi, self.Di)
        k = self.plan.layer_norm(linear(self.plan, x, self.wk), self.k_norm_w, self.k_norm_b, NORM_EPS_ATTN)
        # Indexer RoPE: interleaved rotation of the FIRST dr dims, the rest pass through; the key
        # rides along as head Hi so one rope call serves queries and key.
        qk = torch.cat([q, k.unsqueeze(1)], dim=1)  # [T, Hi + 1, Di]
        qk[:, :, : self.dr] = self.plan.rope(qk[:, :, : self.dr], ctx.positions, ctx.cos_sin, True, meta=ctx.attn)
        q, k = qk[:, : self.Hi], qk[:, self.Hi]
        self.plan.kv_cache_write(k_cache, k, ctx.slot_mapping, meta=ctx.attn)
        head_weights = F.linear(x.float(), self.weights_proj) * fp32_scalar(self.Hi**-0.5)  # [T, Hi] fp32
        return self.plan.lightning_indexer(q, head_weights, k_cache, ctx.block_table, ctx.cu_seqlens_q,
                                           ctx.seq_lens, self.topk, self.Di**-0.5, ctx.max_seqlen_q, ctx.max_seqlen_k,
                                           meta=ctx.attn)

    def __call__(self, x: torch.Tensor, ctx: ForwardContext, cache: PagedCache,
                 prev_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        T, plan = x.shape[0], self.plan
        cq = plan.rms_norm(linear(plan, x, self.q_a_proj), self.q_a_norm, NORM_EPS_ATTN)
        q = linear(plan, cq, self.q_b_proj).view(T, self.H, self.dn + self.dr)
        ckv = linear(plan, x, self.kv_a_proj)
        c = plan.rms_norm(ckv[:, : self.dl], self.kv_a_norm, NORM_EPS_ATTN)
        # One rope call for the query heads and the key (as head H): same positions, same rotation.
        pe = plan.rope(torch.cat([q[:, :, self.dn :], ckv[:, None, self.dl :]], dim=1), ctx.positions, ctx.cos_sin,
                       True, meta=ctx.attn)  # [T, H + 1, dr]
        q_nope, q_pe, k_pe = q[:, :, : self.dn], pe[:, : self.H], pe[:, self.H]
        kv_cache = cache.latent[self.layer_idx]
        plan.kv_cache_write(kv_cache, torch.cat([c, k_pe], dim=-1), ctx.slot_mapping, meta=ctx.attn)

        # DSA: this layer's own top-k, or the previous full layer's on an IndexShare "shared" layer.
        if self.has_indexer:
            indices = self.indexer(x, cq, ctx, cache.indexer[self.layer_idx])
        else:
            indices = prev_indices

        # Absorbed MLA: score_t = (q~ . c_t + q_pe . k_pe_t) * scale over one latent MQA head.
        q_absorbed = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, dl], per head
        q_latent = torch.cat([q_absorbed, q_pe], dim=-1)  # [T, H, dl + dr]
        o_latent = plan.sparse_mla_attention(q_latent, kv_cache, indices, ctx.block_table, ctx.cu_seqlens_q,
                                             ctx.seq_lens, self.scale, self.dl, meta=ctx.attn)  # [T, H, dl]
        o = torch.bmm(o_latent.transpose(0, 1), self.w_uv_t).transpose(0, 1).reshape(T, self.H * self.dv)
        return linear(plan, o, self.o_proj), indices


class DenseMLP:
    """SwiGLU: down(silu(gate x) * up x), gate and up fused into one [2I, D] matmul."""

    def __init__(self, plan, w: dict[str, torch.Tensor], p: str) -> None:
        self.plan = plan
        # One [2I, D] weight; a quantized pair whose scale blocks do not line up stays two weights.
        self.gate_up = concat_rows(w[p + "gate_proj.weight"], w[p + "up_proj.weight"])
        self.down = w[p + "down_proj.weight"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate_up, tuple):
            gate_up = torch.cat([linear(self.plan, x, self.gate_up[0]), linear(self.plan, x, self.gate_up[1])], -1)
        else:
            gate_up = linear(self.plan, x, self.gate_up)
        return linear(self.plan, self.plan.silu_and_mul(gate_up), self.down)


class MoE:
    """fp32 sigmoid router (noaux_tc, group-limited) -> routed experts + shared experts.

    With expert parallelism (ep > 1) this rank holds experts ``[lo, hi)`` only:
    ``ep_dispatch -> fused_experts (local ids, weight 1) -> ep_combine(topk_weights)``. ``capacity``
    (the step's ``ep_capacity``) picks the all-to-all's form: None, the exact one (prefill, mixed
    steps; the host learns the counts), or an int, the fixed-capacity one (every rank's captured decode
    step: static shapes, nothing read on the host; DeepEP low-latency, Ascend MC2).
    """

    def __init__(self, model: GLM5, w: dict[str, torch.Tensor], p: str) -> None:
        cfg = model.config
        self.plan, self.cfg, self.ep_group, self.ep = model.plan, cfg, model.ep_group, model.ep
        self.gate = w[p + "gate.weight"]  # fp32 [E, D]
        self.bias = w[p + "gate.e_score_correction_bias"]  # fp32 [E]
        self.w13 = w[p + "experts.w13"]  # [E_local, 2I, D]
        self.w2 = w[p + "experts.w2"]  # [E_local, D, I]
        self.shared = DenseMLP(model.plan, w, p + "shared_experts.") if cfg.n_shared_experts else None

    def __call__(self, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        cfg, plan = self.cfg, self.plan
        router_logits = F.linear(x.float(), self.gate)
        weights, ids = plan.moe_route(router_logits, self.bias, cfg.num_experts_per_tok, cfg.n_group,
                                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        # Quantized expert stacks (QuantizedWeight) take the quantized composite, same arguments.
        experts = plan.quant_fused_experts if isinstance(self.w13, QuantizedWeight) else plan.fused_experts
        if self.ep == 1:
            y = experts(x, self.w13, self.w2, weights, ids)
        else:
            recv_x, recv_ids, handle = plan.ep_dispatch(x, ids, cfg.n_routed_experts, self.ep_group, weights, capacity)
            ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=x.device)
            y_local = experts(recv_x, self.w13, self.w2, ones, recv_ids.view(-1, 1))
            y = plan.ep_combine(y_local, handle, weights, self.ep_group)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


class DecoderLayer:
    def __init__(self, model: GLM5, w: dict[str, torch.Tensor], i: int) -> None:
        cfg, p = model.config, f"model.layers.{i}."
        self.plan, self.eps = model.plan, cfg.rms_norm_eps
        self.input_norm = w[p + "input_layernorm.weight"]
        self.post_attn_norm = w[p + "post_attention_layernorm.weight"]
        self.attn = Attention(model, w, p + "self_attn.", i)
        self.is_moe = cfg.layer_is_moe(i)
        self.mlp = MoE(model, w, p + "mlp.") if self.is_moe else DenseMLP(model.plan, w, p + "mlp.")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext, cache: PagedCache,
                 prev_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Fused residual RMSNorm: (norm(x + residual), x + residual).
        if residual is None:
            x, residual = self.plan.rms_norm(x, self.input_norm, self.eps), x
        else:
            x, residual = self.plan.rms_norm(x, self.input_norm, self.eps, residual)
        x, indices = self.attn(x, ctx, cache, prev_indices)
        x, residual = self.plan.rms_norm(x, self.post_attn_norm, self.eps, residual)
        return (self.mlp(x, ctx.ep_capacity) if self.is_moe else self.mlp(x)), residual, indices


class MTPLayer:
    """Multi-token prediction head (layer index num_hidden_layers): given the main model's final
    hidden ``h_i`` and the token at ``i+1``, predicts the token at ``i+2``:
    ``u = eh_proj([enorm(embed(tok)), hnorm(h)])`` -> decoder layer -> shared_head.norm -> lm_head.
    Conventions follow vLLM's DeepSeek MTP: ``h_i`` is the main model's final-normed hidden state and
    the embedding at position 0 is zeroed."""

    def __init__(self, model: GLM5, w: dict[str, torch.Tensor], i: int) -> None:
        p = f"model.layers.{i}."
        self.plan, self.eps = model.plan, model.config.rms_norm_eps
        self.enorm, self.hnorm = w[p + "enorm.weight"], w[p + "hnorm.weight"]
        self.eh_proj = w[p + "eh_proj.weight"]
        self.head_norm = w[p + "shared_head.norm.weight"]
        self.embed = w.get(p + "embed_tokens.weight", model.embed)
        self.lm_head = w.get(p + "shared_head.head.weight", model.lm_head)
        self.layer = DecoderLayer(model, w, i)

    def __call__(self, tokens: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                 cache: PagedCache, return_hidden: bool = False,
                 rows: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draft logits (fp32 ``[T, vocab]``, or of ``rows`` only); with ``return_hidden`` also the
        head-normed hidden state, which chains the layer for a further draft (as vLLM chains one MTP layer)."""
        e = F.embedding(tokens, self.embed)
        e = torch.where(ctx.positions[:, None] == 0, 0.0, e).to(e.dtype)  # position 0 has no previous token (vLLM)
        e = self.plan.rms_norm(e, self.enorm, self.eps)
        h = self.plan.rms_norm(hidden, self.hnorm, self.eps)
        u = linear(self.plan, torch.cat([e, h], dim=-1), self.eh_proj)
        x, residual, _ = self.layer(u, None, ctx, cache, None)
        x, _ = self.plan.rms_norm(x, self.head_norm, self.eps, residual)
        logits = F.linear(x if rows is None else x[rows], self.lm_head).float()
        return (logits, x) if return_hidden else logits


def rope_cos_sin_cache(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """fp32 ``[max_pos, dr]``: ``cos(p f_i)`` then ``sin(p f_i)``, times YaRN's attention factor
    (transformers multiplies cos/sin by it; 1 for default RoPE)."""
    inv_freq, attention_factor = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor).to(device)


class GLM5:
    """The model: embedding -> decoder layers -> norm -> untied lm_head (+ optional MTP draft head)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], plan, dtype: torch.dtype,
                 has_mtp: bool, ep: int = 1, ep_group=None) -> None:
        self.config, self.plan, self.dtype = cfg, plan, dtype
        self.device = plan.device
        self.ep, self.ep_group = ep, ep_group
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = weights["lm_head.weight"]
        self.layers = [DecoderLayer(self, weights, i) for i in range(cfg.num_hidden_layers)]
        self.mtp = MTPLayer(self, weights, cfg.num_hidden_layers) if has_mtp else None
        self.cos_sin = rope_cos_sin_cache(cfg, self.device)
        self.path = None

    @property
    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers + (1 if self.mtp is not None else 0)

    def new_cache(self, num_blocks: int, block_size: int = 64) -> PagedCache:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"new_cache: expected num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        return PagedCache(self.config, self.num_cache_layers, num_blocks, block_size, self.dtype, self.device,
                          self.plan.backend.layout())

    def kv_bytes_per_token(self, block_size: int | None = None) -> int:
        """Bytes of paged cache one token occupies over all cache layers, exact for the backend's layout
        (``block_size``: the cache's, which matters only to layouts with per-block scales)."""
        cfg, layout = self.config, self.plan.backend.layout()
        return sum(layout.bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                          cfg.index_head_dim if cfg.layer_has_indexer(i) else None, self.dtype,
                                          block_size)
                   for i in range(self.num_cache_layers))

    def context(self, batch: Batch, cache: PagedCache) -> ForwardContext:
        """The step's device context: host metadata (positions, slots, sizes) built and checked on the
        host, copied to the device once; every layer reuses it and none reads the device back."""
        meta = StepMetadata.from_batch(batch, cache.block_size, cache.num_blocks, self.config.max_position_embeddings)
        return meta.to_device(self.device, self.cos_sin)

    def with_tables(self, ctx: ForwardContext, cache: PagedCache) -> ForwardContext:
        """``ctx`` with the ops' per-step tables (:class:`~hwlayer.ops.layout.AttentionMetadata`: token ->
        sequence map, indexer key slots, rope rows, and the backend's own tables), built once here for
        every layer, on the device from the step's host sizes and tensors: nothing read back."""
        if ctx.attn is not None:
            return ctx
        attn = attention_metadata(ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_table, ctx.positions,
                                  block_size=cache.block_size, max_seqlen_k=ctx.max_seqlen_k,
                                  has_padding=ctx.has_padding, cos_sin_cache=ctx.cos_sin)
        attn = with_backend_tables(attn, cache.layout, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_table)
        return replace(ctx, attn=attn)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: PagedCache) -> torch.Tensor:
        """Final-normed hidden states ``[T, D]`` of all new tokens (writes their cache rows)."""
        x = F.embedding(input_ids.to(self.device), self.embed)
        ctx = self.with_tables(ctx, cache)
        residual, indices = None, None
        for layer in self.layers:
            x, residual, indices = layer(x, residual, ctx, cache, indices)
        x, _ = self.plan.rms_norm(x, self.norm, self.config.rms_norm_eps, residual)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lm_head).float()

    @torch.inference_mode()
    def forward_batch(self, batch: Batch, cache: PagedCache) -> torch.Tensor:
        """fp32 ``[B, vocab]``: logits of each sequence's last new token."""
        return self.forward_context(self.context(batch, cache), cache)

    @torch.inference_mode()
    def forward_context(self, ctx: ForwardContext, cache: PagedCache) -> torch.Tensor:
        """:meth:`forward_batch` on a built context (``ctx.input_ids`` set): what a model runner
        captures in a device graph; reads nothing on the host."""
        h = self.hidden_states(ctx.input_ids, ctx, cache)
        return self.logits(h[ctx.cu_seqlens_q[1:].long() - 1])
