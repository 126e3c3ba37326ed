"""Float64 golden references for the hwlayer op catalogue, written naively on purpose.

Each function restates an op's contract (``hwlayer/ops.py`` docstrings) as plain loops over
tokens, heads, experts and positions in float64. Nothing here imports ``hwlayer.ops``: a bug in a
generic implementation must not be copied into the reference it is checked against. Inputs are
the values the kernel received (already rounded to the test dtype) upcast to float64, so a check
measures the kernel, not the input rounding.

All functions take and return CPU tensors; integer outputs are python lists or int64 tensors.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", F64)


# --------------------------------------------------------------------------------------------
# Normalisation


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` row by row over the last dim."""
    x, weight = _f64(x), _f64(weight)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        r = rows[i]
        mean_square = math.fsum(v * v for v in r.tolist()) / r.numel()  # exactly rounded sum
        out[i] = weight * r / math.sqrt(mean_square + eps)
    return out.reshape(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (biased variance) row by row."""
    x, weight = _f64(x), _f64(weight)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        r = rows[i]
        mean = r.sum() / r.numel()
        var = ((r - mean) ** 2).sum() / r.numel()
        out[i] = (r - mean) / torch.sqrt(var + eps) * weight
        if bias is not None:
            out[i] += _f64(bias)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(dim: int, theta: float) -> list[float]:
    """``f_i = theta^(-2i/dim)`` for ``i < dim/2``, in float64."""
    return [theta ** (-2.0 * i / dim) for i in range(dim // 2)]


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: list[float], interleaved: bool) -> torch.Tensor:
    """Rotate each pair by ``pos * f_i`` with angles computed here in float64 (not from a cache).

    Interleaved (GPT-J): pair ``i`` is ``(x[2i], x[2i+1])``; NeoX: ``(x[i], x[i + D/2])``.
    """
    x = _f64(x)
    out = torch.empty_like(x)
    D = x.shape[-1]
    half = D // 2
    for t in range(x.shape[0]):
        p = int(positions[t])
        heads = x[t] if x.dim() == 3 else x[t].unsqueeze(0)
        dst = out[t] if x.dim() == 3 else out[t].unsqueeze(0)
        for h in range(heads.shape[0]):
            for i in range(half):
                a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                c, s = math.cos(p * inv_freq[i]), math.sin(p * inv_freq[i])
                x1, x2 = float(heads[h, a]), float(heads[h, b])
                dst[h, a] = x1 * c - x2 * s
                dst[h, b] = x2 * c + x1 * s
    return out


# --------------------------------------------------------------------------------------------
# Paged cache helpers


def slot_of(block_table: torch.Tensor, seq: int, pos: int, block_size: int) -> int:
    """Flat cache slot of position ``pos`` of sequence ``seq``."""
    return int(block_table[seq, pos // block_size]) * block_size + pos % block_size


def kv_cache_write(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """A copy of ``cache`` with ``rows[t]`` (cast to the cache dtype) at slot ``slot_mapping[t]``."""
    out = cache.detach().to("cpu").clone()
    flat = out.view(-1, out.shape[-1])
    for t in range(rows.shape[0]):
        slot = int(slot_mapping[t])
        if slot >= 0:
            flat[slot] = rows[t].detach().to("cpu", out.dtype)
    return out


def query_positions(cu_seqlens_q: list[int], seq_lens: list[int]) -> list[tuple[int, int]]:
    """``(sequence, position)`` of every query token: the last ``n_b`` positions of sequence b."""
    out = []
    for b, L in enumerate(seq_lens):
        n = cu_seqlens_q[b + 1] - cu_seqlens_q[b]
        out += [(b, L - n + i) for i in range(n)]
    return out


# --------------------------------------------------------------------------------------------
# DeepSeek Sparse Attention


def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    scale: float,
) -> list[torch.Tensor]:
    """Per query token, float64 scores over its causal positions ``0 .. pos`` (list of 1-D tensors).

    ``score[s] = sum_h weights[h] * relu(q[h] . k[s] * scale)``.
    """
    q, weights = _f64(q), _f64(weights)
    flat = _f64(k_cache).reshape(-1, k_cache.shape[-1])
    bs = k_cache.shape[1]
    scores = []
    for t, (b, pos) in enumerate(query_positions(cu_seqlens_q, seq_lens)):
        row = torch.zeros(pos + 1, dtype=F64)
        for s in range(pos + 1):
            key = flat[slot_of(block_table, b, s, bs)]
            for h in range(q.shape[1]):
                row[s] += weights[t, h] * max(0.0, float(q[t, h] @ key) * scale)
        scores.append(row)
    return scores


def sparse_mla_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and head: softmax over the valid indexed positions, weighted sum of value rows.

    Returns ``(out [T, H, v_dim], lse [T, H])``; a token without valid index: zeros and ``-inf``.
    """
    q = _f64(q)
    flat = _f64(kv_cache).reshape(-1, kv_cache.shape[-1])
    bs = kv_cache.shape[1]
    T, H, _ = q.shape
    out = torch.zeros(T, H, v_dim, dtype=F64)
    lse = torch.full((T, H), -math.inf, dtype=F64)
    for t, (b, _pos) in enumerate(query_positions(cu_seqlens_q, seq_lens)):
        rows = [flat[slot_of(block_table, b, int(p), bs)] for p in indices[t].tolist() if p >= 0]
        if not rows:
            continue
        for h in range(H):
            logits = [float(q[t, h] @ r) * scale for r in rows]
            m = max(logits)
            exps = [math.exp(v - m) for v in logits]
            total = sum(exps)
            lse[t, h] = m + math.log(total)
            for e, r in zip(exps, rows, strict=True):
                out[t, h] += (e / total) * r[:v_dim]
    return out, lse


# --------------------------------------------------------------------------------------------
# Mixture of experts


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def route_choice_scores(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, n_group: int, topk_group: int
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """``(scores, choice, group_scores)`` in float64: sigmoid scores, the biased choice score with
    ineligible groups set to ``-inf``, and each row's group scores (sum of a group's top-2 choice)."""
    logits = _f64(router_logits)
    T, E = logits.shape
    bias = _f64(correction_bias) if correction_bias is not None else torch.zeros(E, dtype=F64)
    scores = torch.tensor([[sigmoid(float(v)) for v in row] for row in logits], dtype=F64)
    choice = scores + bias
    per_group = E // n_group
    all_group_scores = []
    for t in range(T):
        group_scores = []
        for g in range(n_group):
            members = sorted(choice[t, g * per_group : (g + 1) * per_group].tolist(), reverse=True)
            group_scores.append(sum(members[:2]))
        all_group_scores.append(group_scores)
        if n_group > 1 and topk_group < n_group:
            ranked = sorted(range(n_group), key=lambda g, gs=group_scores: -gs[g])
            for g in ranked[topk_group:]:
                choice[t, g * per_group : (g + 1) * per_group] = -math.inf
    return scores, choice, all_group_scores


def route_weights(
    scores: torch.Tensor, ids: list[list[int]], renormalize: bool, routed_scaling_factor: float
) -> torch.Tensor:
    """Weights of the given ids: ``scores[t, id]``, renormalised over the row, times the factor."""
    out = torch.zeros(len(ids), len(ids[0]) if ids else 0, dtype=F64)
    for t, row in enumerate(ids):
        w = [float(scores[t, e]) for e in row]
        total = sum(w) + 1e-20 if renormalize else 1.0
        out[t] = torch.tensor([v / total * routed_scaling_factor for v in w], dtype=F64)
    return out


def moe_permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
    """``(group_sizes, order)``: assignments ``t * k + slot`` listed expert by expert, token order
    inside an expert; ids outside ``[0, num_experts)`` are dropped."""
    T, k = topk_ids.shape
    order, sizes = [], []
    for e in range(num_experts):
        mine = [t * k + s for t in range(T) for s in range(k) if int(topk_ids[t, s]) == e]
        order += mine
        sizes.append(len(mine))
    return sizes, order


def moe_unpermute(y: torch.Tensor, order: list[int], topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    y, w = _f64(y), _f64(topk_weights)
    k = w.shape[1]
    out = torch.zeros(num_tokens, y.shape[1], dtype=F64)
    for row, assignment in enumerate(order):
        t, slot = divmod(assignment, k)
        out[t] += w[t, slot] * y[row]
    return out


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    x, w = _f64(x), _f64(w)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=F64)
    start = 0
    for e, n in enumerate(group_sizes):
        for r in range(start, start + n):
            out[r] = w[e] @ x[r]
        start += n
    return out


def silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x = _f64(x)
    half = x.shape[-1] // 2
    return silu(x[..., :half]) * x[..., half:]


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """``out[t] = sum_slot w * W2_e (silu(W1_e x) * W3_e x)``, one token and slot at a time."""
    x, w13, w2, tw = _f64(x), _f64(w13), _f64(w2), _f64(topk_weights)
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=F64)
    for t in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[t, slot])
            if not 0 <= e < E:
                continue
            gate = w13[e, :inter] @ x[t]
            up = w13[e, inter:] @ x[t]
            out[t] += tw[t, slot] * (w2[e] @ (silu(gate) * up))
    return out


# --------------------------------------------------------------------------------------------
# Sampling


def sampling_distribution(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The float64 distribution a non-greedy row samples from: softmax(logits / T), restricted to
    the top_k largest, then to the smallest sorted prefix whose mass reaches top_p (>= 1 token)."""
    logits = _f64(logits_row) / temperature
    V = logits.numel()
    ranked = sorted(range(V), key=lambda i: -float(logits[i]))
    if 0 < top_k < V:
        ranked = ranked[:top_k]
    m = max(float(logits[i]) for i in ranked)
    weights = {i: math.exp(float(logits[i]) - m) for i in ranked}
    total = sum(weights.values())
    probs = torch.zeros(V, dtype=F64)
    mass = 0.0
    for i in ranked:
        if mass >= top_p:
            break
        probs[i] = weights[i] / total
        mass += weights[i] / total
    return probs / probs.sum()
