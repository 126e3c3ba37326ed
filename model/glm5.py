"""GLM-5 (`glm_moe_dsa`) inference written against hwlayer ops.

Every kernel-shaped step goes through the dispatch plan (``self.plan = hwlayer.plan(backend)``);
plain torch is used only for linear layers, the embedding and tensor plumbing (cat / view).
Notation: T tokens in the batch, H heads, dl = kv_lora_rank, dr = qk_rope_head_dim,
dn = qk_nope_head_dim, dv = v_head_dim, Hi / Di = indexer heads / head dim.

Attention is always the absorbed MLA form over the latent paged cache: a cache row is
``[kv_a_layernorm(c) (dl), rope(k_pe) (dr)]``; ``q~ = q_nope @ W_uk`` and
``out = attn @ W_uv^T``, so the cache is never expanded through ``kv_b_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig, rope_inv_freq

NORM_EPS_ATTN = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers' default) and the indexer's k_norm


@dataclass
class Batch:
    """Token-major varlen batch (the hwlayer serving layout)."""

    input_ids: torch.Tensor  # int64 [T], new tokens of all sequences concatenated
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B], context length including the new tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]


class PagedCache:
    """Per layer: latent cache ``[num_blocks, block_size, dl + dr]`` and, for layers that run the
    indexer, an indexer key cache ``[num_blocks, block_size, Di]`` (None on IndexShare "shared" layers)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv = [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device) for _ in range(n_layers)]
        self.index_k = [
            torch.zeros(num_blocks, block_size, cfg.index_head_dim, dtype=dtype, device=device)
            if cfg.layer_has_indexer(i) else None
            for i in range(n_layers)
        ]


@dataclass
class ForwardContext:
    """Per-batch derived tensors shared by every layer."""

    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    cos_sin: torch.Tensor  # fp32 [max_pos, dr]


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
        self.w_uk = kv_b[:, : self.dn].contiguous()
        self.w_uv = kv_b[:, self.dn :].contiguous()
        self.has_indexer = cfg.layer_has_indexer(layer_idx)
        if self.has_indexer:
            ip = p + "indexer."
            self.Hi, self.Di, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
            self.wq_b = w[ip + "wq_b.weight"]
            self.wk = w[ip + "wk.weight"]
            self.k_norm_w, self.k_norm_b = w[ip + "k_norm.weight"], w[ip + "k_norm.bias"]
            self.weights_proj = w[ip + "weights_proj.weight"]  # fp32, as transformers keeps it

    def rope_first(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Indexer RoPE: interleaved rotation of the FIRST dr dims, the rest pass through."""
        rot = self.plan.rope(x[..., : self.dr], ctx.positions, ctx.cos_sin, True)
        return torch.cat([rot, x[..., self.dr :]], dim=-1)

    def indexer(self, x: torch.Tensor, cq: torch.Tensor, ctx: ForwardContext, k_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q = self.rope_first(F.linear(cq, self.wq_b).view(T, self.Hi, self.Di), ctx)
        k = self.plan.layer_norm(F.linear(x, self.wk), self.k_norm_w, self.k_norm_b, NORM_EPS_ATTN)
        k = self.rope_first(k, ctx)
        self.plan.kv_cache_write(k_cache, k, ctx.slot_mapping)
        head_weights = F.linear(x.float(), self.weights_proj) * self.Hi**-0.5  # [T, Hi] fp32
        return self.plan.lightning_indexer(q, head_weights, k_cache, ctx.block_table, ctx.cu_seqlens_q,
                                           ctx.seq_lens, self.topk, self.Di**-0.5)

    def __call__(self, x: torch.Tensor, ctx: ForwardContext, cache: PagedCache,
                 prev_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        T, plan = x.shape[0], self.plan
        cq = plan.rms_norm(F.linear(x, self.q_a_proj), self.q_a_norm, NORM_EPS_ATTN)
        q = F.linear(cq, self.q_b_proj).view(T, self.H, self.dn + self.dr)
        q_nope, q_pe = q[..., : self.dn], q[..., self.dn :]
        q_pe = plan.rope(q_pe, ctx.positions, ctx.cos_sin, True)

        ckv = F.linear(x, self.kv_a_proj)
        c = plan.rms_norm(ckv[:, : self.dl], self.kv_a_norm, NORM_EPS_ATTN)
        k_pe = plan.rope(ckv[:, self.dl :], ctx.positions, ctx.cos_sin, True)
        kv_cache = cache.kv[self.layer_idx]
        plan.kv_cache_write(kv_cache, torch.cat([c, k_pe], dim=-1), ctx.slot_mapping)

        # DSA: this layer's own top-k, or the previous full layer's on an IndexShare "shared" layer.
        if self.has_indexer:
            indices = self.indexer(x, cq, ctx, cache.index_k[self.layer_idx])
        else:
            indices = prev_indices

        # Absorbed MLA: score_t = (q~ . c_t + q_pe . k_pe_t) * scale over one latent MQA head.
        q_absorbed = torch.einsum("thd,hdc->thc", q_nope, self.w_uk)  # [T, H, dl]
        q_latent = torch.cat([q_absorbed, q_pe], dim=-1)  # [T, H, dl + dr]
        o_latent, _ = plan.sparse_mla_attention(q_latent, kv_cache, indices, ctx.block_table, ctx.cu_seqlens_q,
                                                ctx.seq_lens, self.scale, self.dl)  # [T, H, dl]
        o = torch.einsum("thc,hvc->thv", o_latent, self.w_uv).reshape(T, self.H * self.dv)
        return F.linear(o, self.o_proj), indices


class DenseMLP:
    """SwiGLU: down(silu(gate x) * up x), gate and up fused into one [2I, D] matmul."""

    def __init__(self, plan, w: dict[str, torch.Tensor], p: str) -> None:  # noqa: ANN001
        self.plan = plan
        self.gate_up = torch.cat([w[p + "gate_proj.weight"], w[p + "up_proj.weight"]], dim=0)
        self.down = w[p + "down_proj.weight"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.plan.silu_and_mul(F.linear(x, self.gate_up)), self.down)


class MoE:
    """fp32 sigmoid router (noaux_tc, group-limited) -> routed experts + shared experts.

    With expert parallelism (ep > 1) this rank holds experts ``[lo, hi)`` only:
    ``ep_dispatch -> fused_experts (local ids, weight 1) -> ep_combine(topk_weights)``.
    """

    def __init__(self, model: GLM5, w: dict[str, torch.Tensor], p: str) -> None:
        cfg = model.config
        self.plan, self.cfg, self.ep_group, self.ep = model.plan, cfg, model.ep_group, model.ep
        self.gate = w[p + "gate.weight"]  # fp32 [E, D]
        self.bias = w[p + "gate.e_score_correction_bias"]  # fp32 [E]
        self.w13 = w[p + "experts.w13"]  # [E_local, 2I, D]
        self.w2 = w[p + "experts.w2"]  # [E_local, D, I]
        self.shared = DenseMLP(model.plan, w, p + "shared_experts.") if cfg.n_shared_experts else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cfg, plan = self.cfg, self.plan
        router_logits = F.linear(x.float(), self.gate)
        weights, ids = plan.moe_route(router_logits, self.bias, cfg.num_experts_per_tok, cfg.n_group,
                                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        if self.ep == 1:
            y = plan.fused_experts(x, self.w13, self.w2, weights, ids)
        else:
            recv_x, recv_ids, handle = plan.ep_dispatch(x, ids, cfg.n_routed_experts, self.ep_group)
            ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=x.device)
            y_local = plan.fused_experts(recv_x, self.w13, self.w2, ones, recv_ids.view(-1, 1))
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
        self.mlp = MoE(model, w, p + "mlp.") if cfg.layer_is_moe(i) else DenseMLP(model.plan, w, p + "mlp.")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext, cache: PagedCache,
                 prev_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Fused residual RMSNorm: (norm(x + residual), x + residual).
        if residual is None:
            x, residual = self.plan.rms_norm(x, self.input_norm, self.eps), x
        else:
            x, residual = self.plan.rms_norm(x, self.input_norm, self.eps, residual)
        x, indices = self.attn(x, ctx, cache, prev_indices)
        x, residual = self.plan.rms_norm(x, self.post_attn_norm, self.eps, residual)
        return self.mlp(x), residual, indices


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
                 cache: PagedCache) -> torch.Tensor:
        e = F.embedding(tokens, self.embed)
        e = torch.where(ctx.positions[:, None] == 0, 0.0, e).to(e.dtype)  # position 0 has no previous token (vLLM)
        e = self.plan.rms_norm(e, self.enorm, self.eps)
        h = self.plan.rms_norm(hidden, self.hnorm, self.eps)
        u = F.linear(torch.cat([e, h], dim=-1), self.eh_proj)
        x, residual, _ = self.layer(u, None, ctx, cache, None)
        x, _ = self.plan.rms_norm(x, self.head_norm, self.eps, residual)
        return F.linear(x, self.lm_head).float()


def rope_cos_sin_cache(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """fp32 ``[max_pos, dr]``: ``cos(p f_i)`` then ``sin(p f_i)``, times YaRN's attention factor
    (transformers multiplies cos/sin by it; 1 for default RoPE)."""
    inv_freq, attention_factor = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor).to(device)


class GLM5:
    """The model: embedding -> decoder layers -> norm -> untied lm_head (+ optional MTP draft head)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], plan, dtype: torch.dtype,  # noqa: ANN001
                 has_mtp: bool, ep: int = 1, ep_group=None) -> None:  # noqa: ANN001
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
        self.last_acceptance_rate: float | None = None
        self.spec_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ serving API
    @property
    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers + (1 if self.mtp is not None else 0)

    def new_cache(self, num_blocks: int, block_size: int = 64) -> PagedCache:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"new_cache: expected num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        return PagedCache(self.config, self.num_cache_layers, num_blocks, block_size, self.dtype, self.device)

    def kv_bytes_per_token(self) -> int:
        """Bytes of paged cache one token occupies over all cache layers (latent row + indexer key)."""
        cfg = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_layer = [cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.layer_has_indexer(i) else 0)
                     for i in range(self.num_cache_layers)]
        return sum(per_layer) * elem

    def context(self, batch: Batch, cache: PagedCache) -> ForwardContext:
        """Positions and slots of the new tokens (they are the last ones of each sequence)."""
        dev = self.device
        cu = batch.cu_seqlens_q.to(dev, torch.int32)
        seq_lens = batch.seq_lens.to(dev, torch.int32)
        block_table = batch.block_table.to(dev, torch.int32)
        T = batch.input_ids.shape[0]
        if cu.dim() != 1 or seq_lens.shape != (cu.shape[0] - 1,) or int(cu[-1]) != T or int(cu[0]) != 0:
            raise ValueError(f"Batch: expected cu_seqlens_q [B+1] from 0 to {T} and seq_lens [B], got "
                             f"cu_seqlens_q={cu.tolist()} seq_lens={seq_lens.tolist()}")
        q_lens = (cu[1:] - cu[:-1]).long()
        if bool((q_lens < 1).any()) or bool((seq_lens.long() < q_lens).any()):
            raise ValueError(f"Batch: expected >= 1 new token per sequence and seq_lens >= new tokens, got "
                             f"seq_lens={seq_lens.tolist()} new={q_lens.tolist()}")
        max_len = int(seq_lens.max()) if seq_lens.numel() else 0
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"Batch: context of {max_len} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if block_table.dim() != 2 or block_table.shape[0] != seq_lens.shape[0] or \
                block_table.shape[1] * cache.block_size < max_len:
            raise ValueError(f"Batch: block_table {list(block_table.shape)} cannot address {max_len} positions "
                             f"with block_size {cache.block_size}")
        seq_idx = torch.repeat_interleave(torch.arange(q_lens.numel(), device=dev), q_lens)
        first_pos = seq_lens.long() - q_lens  # position of each sequence's first new token
        positions = torch.arange(T, device=dev) - cu[:-1].long()[seq_idx] + first_pos[seq_idx]
        bs = cache.block_size
        slots = block_table.long()[seq_idx, positions // bs] * bs + positions % bs
        if T and int(slots.max()) >= cache.num_blocks * bs:
            raise ValueError(f"Batch: block_table names block {int(slots.max()) // bs}, the cache has "
                             f"{cache.num_blocks} blocks")
        return ForwardContext(positions, slots, cu, seq_lens, block_table, self.cos_sin)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: PagedCache) -> torch.Tensor:
        """Final-normed hidden states ``[T, D]`` of all new tokens (writes their cache rows)."""
        x = F.embedding(input_ids.to(self.device), self.embed)
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
        ctx = self.context(batch, cache)
        h = self.hidden_states(batch.input_ids, ctx, cache)
        return self.logits(h[ctx.cu_seqlens_q[1:].long() - 1])

    # ------------------------------------------------------------------ convenience API
    def _contiguous_blocks(self, lengths: list[int], cache_len: int) -> tuple[PagedCache, torch.Tensor]:
        """A private cache with ``ceil(cache_len / bs)`` consecutive blocks per sequence."""
        bs = 64
        per_seq = max(1, -(-cache_len // bs))
        cache = self.new_cache(len(lengths) * per_seq, bs)
        table = torch.arange(len(lengths) * per_seq, dtype=torch.int32).view(len(lengths), per_seq)
        return cache, table

    @staticmethod
    def _as_sequences(input_ids: torch.Tensor | list) -> tuple[list[list[int]], bool]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"expected input_ids as an integer tensor [B, T], got {input_ids.dtype} "
                                 f"{list(input_ids.shape)}")
            return input_ids.tolist(), True
        return [list(map(int, s)) for s in input_ids], False

    def _check_ids(self, seqs: list[list[int]]) -> None:
        V = self.config.vocab_size
        for s in seqs:
            if not s:
                raise ValueError("expected every sequence to hold at least one token")
            if min(s) < 0 or max(s) >= V:
                raise ValueError(f"token ids must be in [0, {V}), got one in [{min(s)}, {max(s)}]")

    @staticmethod
    def _varlen(seqs: list[list[int]], table: torch.Tensor, context: list[int]) -> Batch:
        lens = [len(s) for s in seqs]
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        return Batch(torch.tensor([t for s in seqs for t in s], dtype=torch.int64), cu,
                     torch.tensor(context, dtype=torch.int32), table)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor | list) -> torch.Tensor:
        """Logits of every position: LongTensor ``[B, T]`` -> fp32 ``[B, T, vocab]`` (list input ->
        list of ``[T_b, vocab]``). Uses a private cache that is dropped afterwards."""
        seqs, rect = self._as_sequences(input_ids)
        self._check_ids(seqs)
        lens = [len(s) for s in seqs]
        cache, table = self._contiguous_blocks(lens, max(lens))
        batch = self._varlen(seqs, table, lens)
        ctx = self.context(batch, cache)
        logits = self.logits(self.hidden_states(batch.input_ids, ctx, cache))
        parts = list(logits.split(lens))
        return torch.stack(parts) if rect else parts

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | list, max_new_tokens: int = 32, speculative: bool = False,
                 stop_at_eos: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Greedy decoding with the paged cache. ``[B, T]`` -> ``[B, T + new]`` (sequences that
        stopped at an eos token are padded with ``pad_token_id``); a list of token lists -> a list
        of 1-D tensors. ``speculative=True`` drafts one token per step with the MTP layer and
        verifies it with the main model (same output as plain greedy); the acceptance rate is
        left in ``self.last_acceptance_rate`` and ``self.spec_stats``."""
        seqs, rect = self._as_sequences(input_ids)
        self._check_ids(seqs)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if speculative and self.mtp is None:
            raise ValueError("speculative=True needs an MTP layer (num_nextn_predict_layers >= 1 with its weights "
                             "in the checkpoint)")
        lens = [len(s) for s in seqs]
        cache, table = self._contiguous_blocks(lens, max(lens) + max_new_tokens + 2)
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        if speculative:
            new = self._generate_speculative(seqs, cache, table, max_new_tokens, eos)
        else:
            new = self._generate_plain(seqs, cache, table, max_new_tokens, eos)
        outs = [torch.tensor(s + n, dtype=torch.int64) for s, n in zip(seqs, new, strict=True)]
        if not rect:
            return outs
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_ids[0]
        width = max(o.numel() for o in outs)
        return torch.stack([F.pad(o, (0, width - o.numel()), value=pad) for o in outs])

    def _generate_plain(self, seqs: list[list[int]], cache: PagedCache, table: torch.Tensor, max_new: int,
                        eos: set[int]) -> list[list[int]]:
        new: list[list[int]] = [[] for _ in seqs]
        if max_new == 0:
            return new
        lens = [len(s) for s in seqs]
        logits = self.forward_batch(self._varlen(seqs, table, lens), cache)  # prefill all prompts at once
        active = list(range(len(seqs)))
        while True:
            tokens = logits.argmax(-1).tolist()
            still = []
            for b, t in zip(active, tokens, strict=True):
                new[b].append(t)
                lens[b] += 1
                if t not in eos and len(new[b]) < max_new:
                    still.append(b)
            active = still
            if not active:
                return new
            batch = self._varlen([[new[b][-1]] for b in active], table[active], [lens[b] for b in active])
            logits = self.forward_batch(batch, cache)

    def _generate_speculative(self, seqs: list[list[int]], cache: PagedCache, table: torch.Tensor, max_new: int,
                              eos: set[int]) -> list[list[int]]:
        """One MTP draft per step. Invariant per active sequence: the main cache holds positions
        ``0..L-1``; ``pending`` (token L, already emitted) is not cached yet; ``draft`` is the MTP's
        guess for token L+1. A verify step feeds ``[pending, draft]``: if the main model's token
        after ``pending`` equals the draft, both are kept and its next token comes for free."""
        new: list[list[int]] = [[] for _ in seqs]
        self.spec_stats = {"proposed": 0, "accepted": 0}
        self.last_acceptance_rate = None
        if max_new == 0:
            return new
        mtp_layer = self.config.num_hidden_layers
        lens = [len(s) for s in seqs]
        batch = self._varlen(seqs, table, lens)
        ctx = self.context(batch, cache)
        h = self.hidden_states(batch.input_ids, ctx, cache)
        last = ctx.cu_seqlens_q[1:].long() - 1
        pending = self.logits(h[last]).argmax(-1).tolist()
        # MTP prefill: position i sees (h_i, token i+1); the last position sees the first new token.
        shifted = [s[1:] + [p] for s, p in zip(seqs, pending, strict=True)]
        drafts = self._mtp(shifted, h, table, lens, cache, mtp_layer)
        active = []
        for b, p in enumerate(pending):
            new[b].append(p)
            if p not in eos and len(new[b]) < max_new:
                active.append(b)
        proposed = accepted = 0
        while active:
            # Verify [pending, draft] for every active sequence in one main-model forward.
            verify = [[new[b][-1], drafts[b]] for b in active]
            batch = self._varlen(verify, table[active], [lens[b] + 2 for b in active])
            ctx = self.context(batch, cache)
            h = self.hidden_states(batch.input_ids, ctx, cache)
            predicted = self.logits(h).argmax(-1).view(-1, 2).tolist()
            still, catch_up = [], []  # catch_up: (sequence, tokens for the MTP, rows of h they pair with)
            for j, b in enumerate(active):
                proposed += 1
                y1, y2 = predicted[j]
                if y1 == drafts[b]:  # draft accepted: both verified positions are kept, y2 is free
                    accepted += 1
                    emitted, rows = [y1, y2], [2 * j, 2 * j + 1]
                else:  # rejected: position L+1 of the cache is stale and is overwritten next step
                    emitted, rows = [y1], [2 * j]
                lens[b] += len(emitted)
                done = False
                for t in emitted:
                    new[b].append(t)
                    if t in eos or len(new[b]) >= max_new:
                        done = True
                        break
                if not done:
                    still.append(b)
                    catch_up.append((b, emitted, rows))
            # MTP catch-up over the newly cached positions (1 or 2 per sequence), drafting the next token.
            if catch_up:
                sub = [b for b, _, _ in catch_up]
                rows = torch.tensor([r for _, _, rs in catch_up for r in rs], device=h.device)
                out = self._mtp([toks for _, toks, _ in catch_up], h[rows], table, [lens[b] for b in sub], cache,
                                mtp_layer, rows_of=sub)
                drafts.update(out)
            active = still
        self.spec_stats = {"proposed": proposed, "accepted": accepted,
                           "acceptance_rate": accepted / proposed if proposed else 0.0}
        self.last_acceptance_rate = self.spec_stats["acceptance_rate"]
        return new

    def _mtp(self, tokens: list[list[int]], hidden: torch.Tensor, table: torch.Tensor, context: list[int],
             cache: PagedCache, mtp_layer: int, rows_of: list[int] | None = None) -> dict[int, int]:
        """Run the MTP layer over the given tokens (hidden rows aligned); return its greedy draft
        for each sequence's last row, keyed by sequence index."""
        seq_ids = rows_of if rows_of is not None else list(range(len(tokens)))
        batch = self._varlen(tokens, table[seq_ids], context)
        ctx = self.context(batch, cache)
        logits = self.mtp(batch.input_ids.to(self.device), hidden, ctx, cache)
        last = ctx.cu_seqlens_q[1:].long() - 1
        return dict(zip(seq_ids, logits[last].argmax(-1).tolist(), strict=True))
