"""The hwlayer op catalogue: every op's contract and its generic torch implementation.

This module is the one a backend author reads. Each op below is defined once: its signature and
docstring are the contract (shapes, dtypes, layout, semantics, edge cases) and its body is the
generic torch implementation, the default on every device. A backend overrides an op by
registering a function with the same signature through ``hwlayer_register_ops``; it never changes
the contract. Vendor argument conventions (cumulative vs count group lists, BSND vs TND, PA_BSND
caches) are converted inside the vendor's adapter.

Layout conventions shared by all ops (the serving layout):

* Token-major varlen batches: tokens of all sequences are concatenated along dim 0 (``T`` rows).
  ``cu_seqlens_q`` (int32 ``[B + 1]``, starting at 0) delimits each sequence's query tokens and
  ``seq_lens`` (int32 ``[B]``) is each sequence's total context length *including* these tokens.
  The query tokens of sequence ``b`` are its last ``n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]``
  tokens, so query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - n_b + i`` and
  causally sees positions ``0 .. that position`` (right-aligned causal, Ascend ``sparse_mode=3``).
* Paged caches: ``[num_blocks, block_size, dim]``; ``block_table`` (int32 ``[B, max_blocks]``)
  maps sequence ``b``'s position ``p`` to slot ``block_table[b, p // block_size] * block_size +
  p % block_size``. A ``slot_mapping`` addresses the flattened ``[num_blocks * block_size, dim]``.
* Positions handed between ops (``lightning_indexer`` -> ``sparse_mla_attention``) are positions
  within the sequence, int32, ``-1`` meaning "no key".

Generic implementations validate their inputs and raise ``ValueError`` naming the op, the
argument, what was expected and what was given. Call ops through a dispatch plan
(``hwlayer.plan()``), not from this module, unless you want the generic path on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OpSpec:
    """One catalogue entry. ``composite`` ops are built from other ops: their default is a
    factory that receives the dispatch plan and returns the implementation, so a vendor that
    overrides only a part (say ``grouped_gemm``) speeds up the composite too."""

    name: str
    default: Callable
    composite: bool = False

    @property
    def summary(self) -> str:
        doc = (self.default.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


CATALOGUE: dict[str, OpSpec] = {}


def _op(fn: Callable) -> Callable:
    CATALOGUE[fn.__name__] = OpSpec(fn.__name__, fn)
    return fn


def _composite(name: str) -> Callable[[Callable], Callable]:
    def deco(factory: Callable) -> Callable:
        CATALOGUE[name] = OpSpec(name, factory, composite=True)
        return factory

    return deco


# --------------------------------------------------------------------------------------------
# Validation helpers (cheap attribute checks; generic implementations always run them)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, arg: str, expected: str, got: Any) -> None:
    raise ValueError(f"{op}: argument '{arg}' expected {expected}, got {got}")


def check_tensor(
    op: str,
    arg: str,
    t: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: Sequence[int | None] | None = None,
) -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor with the given rank, dtype and sizes
    (``None`` in ``shape`` means any size). Public so vendor adapters can reuse it."""
    if not isinstance(t, torch.Tensor):
        _fail(op, arg, "a torch.Tensor", type(t).__name__)
    if ndim is not None:
        ok = t.dim() in ndim if isinstance(ndim, tuple) else t.dim() == ndim
        if not ok:
            _fail(op, arg, f"{ndim}-D tensor", f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, arg, f"dtype {names}", str(t.dtype).removeprefix("torch."))
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, t.shape, strict=False)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            _fail(op, arg, f"shape {want}", f"{list(t.shape)}")


def _check_varlen(op: str, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, T: int) -> None:
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=[cu_seqlens_q.shape[0] - 1])
    if int(cu_seqlens_q[-1]) != T:
        _fail(op, "cu_seqlens_q", f"last entry == number of query tokens ({T})", int(cu_seqlens_q[-1]))


def token_positions(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position) of every query token of a varlen batch, both int64 ``[T]``."""
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    seq_idx = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q_lens.device), q_lens)
    start = cu_seqlens_q[:-1].long()
    offset = seq_lens.long() - q_lens - start  # position = token index + offset of its sequence
    pos = torch.arange(seq_idx.numel(), device=q_lens.device) + offset[seq_idx]
    return seq_idx, pos


def positions_to_slots(
    block_table: torch.Tensor, seq_idx: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Map positions (any shape, aligned with ``seq_idx`` on dim 0) to flat cache slots (int64).
    Negative positions map to slot 0; callers mask them."""
    p = positions.long().clamp(min=0)
    rows = seq_idx.view(-1, *([1] * (p.dim() - 1))).expand_as(p)
    blocks = block_table.long()[rows, p // block_size]
    return blocks * block_size + p % block_size


def _chunk_rows(n_rows: int, per_row_elems: int, budget: int = 1 << 25) -> int:
    """Rows per chunk so that one chunk's temporary stays near ``budget`` elements."""
    return max(1, min(n_rows, budget // max(1, per_row_elems)))


# --------------------------------------------------------------------------------------------
# Normalisation


@_op
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally fused with a residual add.

    ``x``: ``[..., D]`` float; ``weight``: ``[D]``. Computes in fp32
    ``weight * x * rsqrt(mean(x^2) + eps)`` and returns ``x.dtype``. With ``residual`` (same
    shape and dtype as ``x``) it first forms ``s = x + residual`` in ``x.dtype`` and returns
    ``(rms_norm(s), s)``: the normalised value and the new residual (vLLM ``fused_add_rms_norm``,
    Ascend ``npu_add_rms_norm``). Inputs are not modified.
    """
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("rms_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if residual is not None:
        check_tensor("rms_norm", "residual", residual, dtypes=(x.dtype,), shape=list(x.shape))
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y.to(x.dtype), x) if residual is not None else y.to(x.dtype)


@_op
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, returned in ``x.dtype``. ``weight``/``bias``: ``[D]``
    (bias may be None). Used by the DSA indexer's key norm (eps 1e-6)."""
    check_tensor("layer_norm", "x", x, dtypes=FLOAT_DTYPES)
    check_tensor("layer_norm", "weight", weight, ndim=1, shape=[x.shape[-1]])
    if bias is not None:
        check_tensor("layer_norm", "bias", bias, ndim=1, shape=[x.shape[-1]])
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary position embedding


@_op
def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` by its token positions; returns a new tensor of ``x``'s shape and dtype.

    ``x``: ``[T, D]`` or ``[T, H, D]`` (the whole last dim rotates; slice rope dims out first).
    ``positions``: int ``[T]``. ``cos_sin_cache``: fp32 ``[max_pos, D]``, row ``p`` holding
    ``cos(p * f_i)`` for ``i < D/2`` then ``sin(p * f_i)`` (vLLM layout; scaling such as YaRN's
    mscale is folded into the cache). ``interleaved=True``: GPT-J pairs ``(x[2i], x[2i+1])``
    rotate by ``f_i`` and stay interleaved (GLM-5, DeepSeek). ``interleaved=False``: NeoX halves
    ``(x[i], x[i + D/2])``. Computes in fp32.
    """
    check_tensor("rope", "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("rope", "positions", positions, ndim=1, dtypes=INDEX_DTYPES, shape=[x.shape[0]])
    D = x.shape[-1]
    check_tensor("rope", "cos_sin_cache", cos_sin_cache, ndim=2, shape=[None, D])
    if D % 2:
        _fail("rope", "x", "an even last dim", D)
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cs[:, : D // 2], cs[:, D // 2 :]
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Paged cache


@_op
def kv_cache_write(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``rows[t]`` into flat slot ``slot_mapping[t]`` of a paged cache, in place.

    ``cache``: contiguous ``[num_blocks, block_size, D]``; ``rows``: ``[T, D]`` (cast to the
    cache dtype); ``slot_mapping``: int ``[T]``, ``-1`` skips the row (padding). Slots must be
    distinct. Used for the MLA latent cache (D = kv_lora_rank + rope dim) and the indexer key cache.
    """
    check_tensor("kv_cache_write", "cache", cache, ndim=3)
    check_tensor("kv_cache_write", "rows", rows, ndim=2, shape=[None, cache.shape[-1]])
    check_tensor("kv_cache_write", "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, shape=[rows.shape[0]])
    if not cache.is_contiguous():
        _fail("kv_cache_write", "cache", "a contiguous tensor", "a strided view")
    flat = cache.view(-1, cache.shape[-1])
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, rows = slots[valid], rows[valid]
    if slots.numel() and int(slots.max()) >= flat.shape[0]:
        _fail("kv_cache_write", "slot_mapping", f"slots < {flat.shape[0]}", int(slots.max()))
    flat.index_copy_(0, slots, rows.to(cache.dtype))


# --------------------------------------------------------------------------------------------
# DeepSeek Sparse Attention


@_op
def lightning_indexer(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """DSA lightning indexer: the top-``topk`` past positions of every query token.

    ``q``: ``[T, Hi, Di]`` indexer queries (RoPE applied); ``weights``: fp32 ``[T, Hi]`` per-head
    weights (already including ``Hi^-0.5``); ``k_cache``: paged indexer keys
    ``[num_blocks, block_size, Di]`` holding every context position (write new keys first);
    ``block_table``, ``cu_seqlens_q``, ``seq_lens``: see the module doc; ``scale``: ``Di^-0.5``.

    ``score[t, s] = sum_h weights[t, h] * relu(q[t, h] . k[s] * scale)`` for the causal positions
    ``s <= pos(t)`` of t's sequence. Returns int32 ``[T, topk]``: positions of the highest scores
    (order unspecified), padded with ``-1`` when the causal context has fewer than ``topk``
    positions (then every causal position is returned). Ties may be broken either way.
    """
    op = "lightning_indexer"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, Hi, Di = q.shape
    check_tensor(op, "weights", weights, ndim=2, shape=[T, Hi])
    check_tensor(op, "k_cache", k_cache, ndim=3, shape=[None, None, Di])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    _check_varlen(op, cu_seqlens_q, seq_lens, T)
    if topk < 1:
        _fail(op, "topk", ">= 1", topk)
    bs = k_cache.shape[1]
    flat = k_cache.reshape(-1, Di)
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    q_lens = [t1 - t0 for t0, t1 in zip(starts[:-1], starts[1:], strict=True)]
    for b, (n, L) in enumerate(zip(q_lens, lens, strict=True)):
        if L < n:
            _fail(op, "seq_lens", f"seq_lens[{b}] >= its query count {n}", L)
    if T and max(q_lens) <= 8 and len(lens) * max(lens) * (Di + max(q_lens) * Hi) <= (1 << 25):
        # Decode (few new tokens per sequence): one batched product over all sequences, keys
        # padded to the longest context; padding lies beyond every query's position, so it is masked.
        _indexer_batched(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens, q_lens, lens, scale, out)
        return out
    for b in range(len(lens)):  # prefill: one iteration per sequence, not per token
        t0, t1, L = starts[b], starts[b + 1], lens[b]
        n = t1 - t0
        if n == 0:
            continue
        pos = torch.arange(L, device=q.device)
        zeros = torch.zeros(L, dtype=torch.long, device=q.device)
        keys = flat[positions_to_slots(block_table[b : b + 1], zeros, pos, bs)]
        keys = keys.float()
        k = min(topk, L)
        step = _chunk_rows(n, Hi * L)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            qc = q[t0 + c0 : t0 + c1].float()
            logits = torch.relu(torch.einsum("thd,sd->ths", qc, keys) * scale)
            score = torch.einsum("ths,th->ts", logits, weights[t0 + c0 : t0 + c1].float())
            qpos = torch.arange(L - n + c0, L - n + c1, device=q.device)
            score.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
            vals, idx = score.topk(k, dim=-1)
            idx = idx.to(torch.int32).masked_fill_(vals == float("-inf"), -1)
            out[t0 + c0 : t0 + c1, :k] = idx
    return out


def _indexer_batched(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    q_lens: list[int],
    lens: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    """``lightning_indexer`` for batches with few new tokens per sequence (decode): sequences are
    padded to ``[B, max new tokens]`` queries and ``[B, max context]`` keys and scored at once."""
    T, Hi, Di = q.shape
    B, n_max, L_max = len(lens), max(q_lens), max(lens)
    if T == B and n_max == 1:  # pure decode: one token per sequence, nothing to pad
        seq_idx, row = torch.arange(B, device=q.device), torch.zeros(B, dtype=torch.long, device=q.device)
        qpos = seq_lens.long() - 1
        q_pad, w_pad = q.float().unsqueeze(1), weights.float().unsqueeze(1)
    else:
        seq_idx, qpos = token_positions(cu_seqlens_q, seq_lens)
        row = torch.arange(T, device=q.device) - cu_seqlens_q.long()[seq_idx]  # token's place in its sequence
        q_pad = torch.zeros((B, n_max, Hi, Di), dtype=torch.float32, device=q.device)
        q_pad[seq_idx, row] = q.float()
        w_pad = torch.zeros((B, n_max, Hi), dtype=torch.float32, device=q.device)
        w_pad[seq_idx, row] = weights.float()
    pos = torch.arange(L_max, device=q.device)
    seqs = torch.arange(B, device=q.device)
    slots = positions_to_slots(block_table, seqs, pos.expand(B, L_max), k_cache.shape[1])
    keys = k_cache.reshape(-1, Di)[slots].float()  # [B, L_max, Di]
    logits = torch.relu(torch.einsum("bnhd,bsd->bnhs", q_pad, keys) * scale)
    score = torch.einsum("bnhs,bnh->bns", logits, w_pad)[seq_idx, row]  # [T, L_max]
    score.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
    vals, idx = score.topk(min(out.shape[1], L_max), dim=-1)
    out[:, : idx.shape[1]] = idx.to(torch.int32).masked_fill_(vals == float("-inf"), -1)


@_op
def sparse_mla_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention over a paged latent cache, restricted to the given positions.

    ``q``: ``[T, H, Dk]`` with ``Dk = kv_lora_rank + rope_dim`` (absorbed ``q_nope @ W_uk``
    concatenated with the roped ``q_pe``); ``kv_cache``: ``[num_blocks, block_size, Dk]``, one
    latent head shared by all query heads (MQA), row = ``[c (kv_lora_rank), k_pe (rope_dim)]``;
    ``indices``: int32 ``[T, K]`` positions within each token's sequence, ``-1`` = unused (as
    ``lightning_indexer`` returns; duplicates are not allowed); ``scale``: softmax scale;
    ``v_dim``: the value width, the first ``v_dim`` columns of each row (``kv_lora_rank``).

    ``p = softmax_k(q[t, h] . kv[idx_k] * scale)`` over valid ``k``;
    returns ``(out, lse)``: ``out[t, h] = sum_k p_k kv[idx_k][:v_dim]`` as ``[T, H, v_dim]`` in
    ``q.dtype`` and ``lse[t, h] = log(sum_k exp(q . kv * scale))`` fp32 ``[T, H]`` (natural log).
    A token with no valid index gets ``out = 0`` and ``lse = -inf``. Softmax is computed in fp32.
    """
    op = "sparse_mla_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, H, Dk = q.shape
    check_tensor(op, "kv_cache", kv_cache, ndim=3, shape=[None, None, Dk])
    check_tensor(op, "indices", indices, ndim=2, dtypes=INDEX_DTYPES, shape=[T, None])
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    _check_varlen(op, cu_seqlens_q, seq_lens, T)
    if not 0 < v_dim <= Dk:
        _fail(op, "v_dim", f"0 < v_dim <= {Dk}", v_dim)
    bs = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, Dk)
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens)
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    K = indices.shape[1]
    step = _chunk_rows(T, K * (Dk + H))
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        idx = indices[c0:c1]
        valid = idx >= 0
        kv = flat[positions_to_slots(block_table, seq_idx[c0:c1], idx, bs)].float()  # [t, K, Dk]
        s = torch.einsum("thd,tkd->thk", q[c0:c1].float(), kv) * scale
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # [t, H]
        p = torch.exp(s - m.unsqueeze(-1)).nan_to_num_(0.0)
        out[c0:c1] = torch.einsum("thk,tkd->thd", p, kv[..., :v_dim]).to(q.dtype)
        lse[c0:c1] = m
    return out, lse


# --------------------------------------------------------------------------------------------
# Mixture of experts


@_op
def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-5 / DeepSeek-V3 ``noaux_tc`` routing.

    ``router_logits``: ``[T, E]`` (``x @ W_gate^T``, computed in fp32). ``s = sigmoid(logits)``;
    the choice score ``s + correction_bias`` (``[E]``, may be None) is used for selection only.
    When ``n_group > 1`` experts form ``n_group`` equal groups, each group scored by the sum of its
    top-2 choice scores, and only the best ``topk_group`` groups stay eligible. ``ids`` = the
    ``top_k`` best eligible choice scores; ``weights = s[ids]`` (never the biased score), divided
    by ``sum + 1e-20`` if ``renormalize``, then times ``routed_scaling_factor``.
    Returns ``(weights fp32 [T, top_k], ids int32 [T, top_k])``; order within a row unspecified.
    """
    op = "moe_route"
    check_tensor(op, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E = router_logits.shape
    if correction_bias is not None:
        check_tensor(op, "correction_bias", correction_bias, ndim=1, shape=[E])
    if not 1 <= top_k <= E:
        _fail(op, "top_k", f"1 <= top_k <= {E}", top_k)
    if n_group < 1 or E % n_group:
        _fail(op, "n_group", f"a divisor of the expert count {E}", n_group)
    if not 1 <= topk_group <= n_group:
        _fail(op, "topk_group", f"1 <= topk_group <= n_group ({n_group})", topk_group)
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=choice.device).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


@_op
def moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token rows by expert.

    ``x``: ``[T, D]``; ``topk_ids``: int ``[T, k]``; an id outside ``[0, num_experts)`` (for
    example ``-1``, or an expert owned by another rank after subtracting an offset) is dropped.
    Returns ``(x_sorted [M, D], group_sizes int64 [num_experts], order int64 [M])`` where ``M`` is
    the number of kept assignments, rows are sorted by expert (stable in token order), and
    ``order[j] = t * k + slot`` names the assignment that row ``j`` came from.
    """
    op = "moe_permute"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.bincount(key, minlength=num_experts + 1)
    order = torch.argsort(key, stable=True)
    kept = flat.numel() - int(counts[num_experts])
    order = order[:kept]
    return x.index_select(0, order // k), counts[:num_experts], order


@_op
def moe_unpermute(
    y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Inverse of ``moe_permute`` with the routing weights applied.

    ``y``: ``[M, D]`` expert outputs in permuted order; ``order``: from ``moe_permute``;
    ``topk_weights``: ``[num_tokens, k]``. Returns ``[num_tokens, D]`` in ``y.dtype`` with
    ``out[t] = sum over kept slots of topk_weights[t, slot] * y[row]``, accumulated in fp32;
    tokens with no kept slot get zeros.
    """
    op = "moe_unpermute"
    check_tensor(op, "y", y, ndim=2)
    check_tensor(op, "order", order, ndim=1, dtypes=INDEX_DTYPES, shape=[y.shape[0]])
    check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=[num_tokens, None])
    k = topk_weights.shape[1]
    order = order.long()
    w = topk_weights.reshape(-1).float().index_select(0, order)
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, order // k, y.float() * w.unsqueeze(1))
    return out.to(y.dtype)


@_op
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Per-expert matmul on rows grouped by expert.

    ``x``: ``[M, K]`` with rows of expert ``e`` contiguous and experts in order;
    ``w``: ``[E, N, K]`` (nn.Linear layout, "NT"); ``group_sizes``: int ``[E]`` row counts
    (sum == M; Ascend wants these as ``group_list_type=1``). Returns ``[M, N]`` in ``x.dtype``:
    ``out[rows of e] = x[rows of e] @ w[e]^T``. Experts with no rows cost nothing.
    """
    op = "grouped_gemm"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w", w, ndim=3, shape=[None, None, x.shape[1]])
    check_tensor(op, "group_sizes", group_sizes, ndim=1, dtypes=INDEX_DTYPES, shape=[w.shape[0]])
    sizes = group_sizes.tolist()
    if sum(sizes) != x.shape[0]:
        _fail(op, "group_sizes", f"counts summing to {x.shape[0]} rows", sum(sizes))
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(x[start : start + n], w[e].t().to(x.dtype), out=out[start : start + n])
            start += n
    return out


@_op
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: ``x``: ``[..., 2I]`` -> ``silu(x[..., :I]) * x[..., I:]`` (gate first,
    then up; Ascend ``npu_swiglu``), in ``x.dtype``."""
    check_tensor("silu_and_mul", "x", x, dtypes=FLOAT_DTYPES)
    if x.shape[-1] % 2:
        _fail("silu_and_mul", "x", "an even last dim", x.shape[-1])
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@_composite("fused_experts")
def _fused_experts_factory(plan: Any) -> Callable:
    def fused_experts(
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Routed experts, the composite: ``sum_k w_k * W2_e (silu(W1_e x) * W3_e x)``.

        ``x``: ``[T, D]``; ``w13``: ``[E, 2I, D]`` (gate rows then up rows per expert);
        ``w2``: ``[E, D, I]``; ``topk_weights``/``topk_ids``: ``[T, k]`` from ``moe_route``
        (ids outside ``[0, E)`` contribute nothing). Returns ``[T, D]`` in ``x.dtype``. The
        default runs ``moe_permute -> grouped_gemm -> silu_and_mul -> grouped_gemm ->
        moe_unpermute`` through the plan, so overriding a part speeds this up too.
        """
        check_tensor("fused_experts", "w13", w13, ndim=3, shape=[None, None, x.shape[-1]])
        check_tensor("fused_experts", "w2", w2, ndim=3, shape=[w13.shape[0], x.shape[-1], w13.shape[1] // 2])
        xs, sizes, order = plan.moe_permute(x, topk_ids, w13.shape[0])
        h = plan.silu_and_mul(plan.grouped_gemm(xs, w13, sizes))
        y = plan.grouped_gemm(h, w2, sizes)
        return plan.moe_unpermute(y, order, topk_weights, x.shape[0])

    return fused_experts


# --------------------------------------------------------------------------------------------
# Communication (expert parallelism)


@_op
def all_to_all(
    x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group: Any = None
) -> torch.Tensor:
    """Variable-size all-to-all along dim 0 on a torch.distributed group.

    Rank ``r`` sends rows ``x[sum(input_split_sizes[:j]) : ...+input_split_sizes[j]]`` to rank
    ``j`` and receives ``output_split_sizes[j]`` rows from rank ``j``; returns the received rows
    concatenated in rank order, ``[sum(output_split_sizes), ...]``, same dtype as ``x``.
    """
    import torch.distributed as dist

    check_tensor("all_to_all", "x", x)
    if sum(input_split_sizes) != x.shape[0]:
        _fail("all_to_all", "input_split_sizes", f"sizes summing to {x.shape[0]}", sum(input_split_sizes))
    out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group)
    return out


@dataclass
class EPHandle:
    """What ``ep_combine`` needs to send expert outputs back: produced by ``ep_dispatch``.
    ``order`` (int64 ``[T*k kept]``) maps send-buffer rows to token-slot ``t * k + slot``."""

    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    top_k: int


@_op
def ep_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, EPHandle]:
    """Expert-parallel dispatch: send each (token, expert) assignment to the expert's owner.

    Experts are sharded evenly and contiguously: rank ``r`` of the ``W``-rank ``group`` owns
    global experts ``[r * E/W, (r + 1) * E/W)``. ``x``: ``[T, D]``; ``topk_ids``: int
    ``[T, k]`` global ids. Every rank must call it (collective). Returns
    ``(recv_x [R, D], recv_local_ids int32 [R], handle)``: the rows this rank's experts must
    process, the local expert id (``global - r * E/W``) of each, and a handle for ``ep_combine``.
    Rows arrive grouped by source rank, each source's rows in its token-slot order.
    """
    import torch.distributed as dist

    op = "ep_dispatch"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])
    world = dist.get_world_size(group)
    if num_experts % world:
        _fail(op, "num_experts", f"a multiple of the EP world size {world}", num_experts)
    per_rank = num_experts // world
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        got = f"ids in [{int(flat.min())}, {int(flat.max())}]"
        _fail(op, "topk_ids", f"global expert ids in [0, {num_experts})", got)
    dest = flat // per_rank
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    # The small id exchange runs asynchronously under the row exchange: one round trip, not two.
    local_ids = (flat.index_select(0, order) % per_rank).to(torch.int32)
    recv_ids = local_ids.new_empty(sum(recv))
    ids_work = dist.all_to_all_single(recv_ids, local_ids, recv, send, group=group, async_op=True)
    recv_x = all_to_all(x.index_select(0, order // k), recv, send, group)
    ids_work.wait()
    return recv_x, recv_ids, EPHandle(order, send, recv, x.shape[0], k)


@_op
def ep_combine(y: torch.Tensor, handle: EPHandle, topk_weights: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Expert-parallel combine, the inverse of ``ep_dispatch``.

    ``y``: ``[R, D]`` expert outputs for the rows ``ep_dispatch`` delivered, same order,
    unweighted. Sends them back and returns ``[T, D]`` in ``y.dtype`` with
    ``out[t] = sum_slot topk_weights[t, slot] * y_slot``, accumulated in fp32. Collective.
    """
    op = "ep_combine"
    check_tensor(op, "y", y, ndim=2, shape=[sum(handle.recv_counts), None])
    check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, handle.top_k])
    back = all_to_all(y, handle.send_counts, handle.recv_counts, group)
    T, k = handle.num_tokens, handle.top_k
    if handle.order.numel() != T * k:  # a handle that dropped assignments: the general scatter-add
        return moe_unpermute(back, handle.order, topk_weights, T)
    # Every assignment came back: undo the permutation, then one fp32 batched [1, k] x [k, D]
    # product per token does the weighted sum (about 2x faster than a scatter-add on CPU).
    inverse = torch.empty_like(handle.order)
    inverse[handle.order] = torch.arange(T * k, device=handle.order.device)
    D = y.shape[1]
    rows = back.index_select(0, inverse).view(T, k, D).float()
    out = torch.bmm(topk_weights.float().view(T, 1, k), rows).view(T, D)
    return out.to(y.dtype)


# --------------------------------------------------------------------------------------------
# Sampling


@_op
def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    ``logits``: ``[B, V]``; ``temperature``: fp32 ``[B]`` (``<= 0`` means greedy argmax);
    ``top_k``: int ``[B]`` (``<= 0`` or ``>= V`` disables); ``top_p``: fp32 ``[B]`` in ``(0, 1]``
    (1 disables; the smallest prefix of the sorted distribution whose mass reaches ``top_p`` is
    kept, at least one token). ``generators[b]``, when given, makes row ``b`` reproducible
    (same generator state, same logits -> same token); ``None`` rows use the default generator.
    Returns int64 ``[B]``. Draws by the exponential race ``argmax(p / Exp(1))``.
    """
    op = "sample"
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    B, V = logits.shape
    check_tensor(op, "temperature", temperature, ndim=1, shape=[B])
    check_tensor(op, "top_k", top_k, ndim=1, dtypes=INDEX_DTYPES, shape=[B])
    check_tensor(op, "top_p", top_p, ndim=1, shape=[B])
    if generators is not None and len(generators) != B:
        _fail(op, "generators", f"{B} entries", len(generators))
    logits = logits.float()
    greedy_ids = logits.argmax(-1)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return greedy_ids
    scaled = logits / temperature.float().clamp(min=1e-5).unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where((top_k > 0) & (top_k < V), top_k.long(), V).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p.float().unsqueeze(1), 0.0)
    noise = torch.empty_like(probs)
    if generators is None or all(g is None for g in generators):
        noise.exponential_()
    else:
        for b, g in enumerate(generators):  # per row (request), never per token
            noise[b].exponential_(generator=g)
    choice = (probs / noise).argmax(-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    return torch.where(greedy, greedy_ids, sampled)


OP_NAMES: tuple[str, ...] = tuple(CATALOGUE)
