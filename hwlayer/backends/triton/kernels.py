"""Triton kernels of the portable tier. Imported lazily, on the first call of a Triton op.

Why lazily: ``triton.jit`` decides at decoration time (this module's import) whether a kernel is
compiled for a GPU or run by the interpreter (``TRITON_INTERPRET=1``, CPU tensors). Importing this
module only when an op runs lets a process set ``TRITON_INTERPRET`` any time before that.

Each kernel computes in fp32 and stores in the output's dtype. Block sizes are powers of two
(Triton's requirement); real sizes are handled with masks. ``F32_DOT`` (set for fp32 inputs, and
always under the interpreter, whose numpy backend cannot do bf16 arithmetic or bf16 ``tl.dot``)
upcasts the operands and asks for ``input_precision="ieee"``, so a GPU does not silently use TF32;
otherwise bf16/fp16 operands go to the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, D, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The new residual is formed in x's dtype first (as the contract and vLLM do), then normed.
        # (added in fp32 and rounded once: what torch does for bf16/fp16, and the interpreter
        # cannot add bf16 directly)
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (xf * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(x_ptr, pos_ptr, cache_ptr, out_ptr, H, D,
                INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token, all its heads at once (cos/sin are read once per token). Pair i
    # rotates by frequency i: GPT-J pairs (2i, 2i+1) or NeoX pairs (i, i + D/2); the cache row holds
    # cos for i < D/2, then sin.
    token = tl.program_id(0).to(tl.int64)
    half = D // 2
    i = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cache_ptr + pos * D + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * D + half + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    mask = (h[:, None] < H) & (i[None, :] < half)
    base = (token * H + h[:, None]) * D
    if INTERLEAVED:
        first = base + 2 * i[None, :]
        second = first + 1
    else:
        first = base + i[None, :]
        second = first + half
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + second, mask=mask, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + first, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(out_ptr + second, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def indexer_score_kernel(
    q_ptr, w_ptr, k_ptr, bt_ptr, seq_idx_ptr, qpos_ptr, score_ptr,
    Hi, Di, block_size, max_blocks, S, scale,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, F32_DOT: tl.constexpr,
):
    # score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] * scale) for s <= pos(t), else -inf.
    # One program per (token, tile of BLOCK_S positions); all heads at once with one tl.dot.
    # S may be a static bound (the block table's capacity, so a captured device graph replays at any
    # context length): tiles past the token's position only write -inf and return, so the cost
    # follows the real context, not the bound.
    t = tl.program_id(0).to(tl.int64)
    s_tile = tl.program_id(1)
    b = tl.load(seq_idx_ptr + t).to(tl.int64)
    qpos = tl.load(qpos_ptr + t)
    s = s_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    if s_tile * BLOCK_S > qpos:
        tl.store(score_ptr + t * S + s, tl.full([BLOCK_S], float("-inf"), tl.float32), mask=s < S)
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    causal = s <= qpos
    block = tl.load(bt_ptr + b * max_blocks + s // block_size, mask=causal, other=0).to(tl.int64)
    slot = block * block_size + s % block_size
    q = tl.load(q_ptr + (t * Hi + h[:, None]) * Di + d[None, :], mask=(h[:, None] < Hi) & (d[None, :] < Di), other=0.0)
    k = tl.load(k_ptr + slot[:, None] * Di + d[None, :], mask=causal[:, None] & (d[None, :] < Di), other=0.0)
    if F32_DOT:
        logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # [BLOCK_H, BLOCK_S]
    else:
        logits = tl.dot(q, tl.trans(k.to(q.dtype)))
    w = tl.load(w_ptr + t * Hi + h, mask=h < Hi, other=0.0).to(tl.float32)
    score = tl.sum(tl.maximum(logits * scale, 0.0) * w[:, None], axis=0)
    score = tl.where(causal, score, float("-inf"))
    tl.store(score_ptr + t * S + s, score, mask=s < S)


@triton.jit
def sparse_mla_kernel(
    q_ptr, kv_ptr, idx_ptr, bt_ptr, seq_idx_ptr, out_ptr, lse_ptr,
    H, Dk, V, R, K, block_size, max_blocks, scale_log2, keys_per_split, num_splits,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    # Flash-attention style online softmax over gathered latent rows, one program per (token, tile
    # of heads, split of the token's K indices). A latent row is [c (V columns, also the value),
    # k_pe (R columns)]; the score uses both parts, the output only c. All heads of the tile share
    # one gathered row (MQA), so scores are a [BLOCK_H, BLOCK_K] tl.dot (tensor cores for bf16/fp16).
    # Invalid indices (-1) are masked to -inf. Softmax runs in base 2 (scale_log2 = scale * log2 e),
    # with the running max subtracted, so large logits never overflow.
    #
    # Output row (t, h, split) of out/lse: with num_splits == 1 that is the op's own [T, H, V] / [T, H]
    # (the prefill path); otherwise fp32 partials [T, H, splits, V] / [T, H, splits] that
    # sparse_mla_merge_kernel combines through their lse (the split-K decode path).
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    hmask = h < H
    b = tl.load(seq_idx_ptr + t).to(tl.int64)
    dv = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    q_rows = (t * H + h[:, None]) * Dk
    q_c = tl.load(q_ptr + q_rows + dv[None, :], mask=hmask[:, None] & (dv[None, :] < V), other=0.0)
    q_pe = tl.load(q_ptr + q_rows + V + dr[None, :], mask=hmask[:, None] & (dr[None, :] < R), other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    k_begin = split * keys_per_split
    k_end = tl.minimum(k_begin + keys_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        pos = tl.load(idx_ptr + t * K + kk, mask=kk < k_end, other=-1).to(tl.int64)
        valid = pos >= 0
        safe = tl.where(valid, pos, 0)
        block = tl.load(bt_ptr + b * max_blocks + safe // block_size, mask=valid, other=0).to(tl.int64)
        rows = (block * block_size + safe % block_size) * Dk
        c = tl.load(kv_ptr + rows[:, None] + dv[None, :], mask=valid[:, None] & (dv[None, :] < V), other=0.0)
        pe = tl.load(kv_ptr + rows[:, None] + V + dr[None, :], mask=valid[:, None] & (dr[None, :] < R), other=0.0)
        if F32_DOT:
            c = c.to(tl.float32)
            s = tl.dot(q_c.to(tl.float32), tl.trans(c), input_precision="ieee")
            s += tl.dot(q_pe.to(tl.float32), tl.trans(pe.to(tl.float32)), input_precision="ieee")
        else:
            c = c.to(q_c.dtype)
            s = tl.dot(q_c, tl.trans(c)) + tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new

    has_any = l_i > 0
    out = tl.where(has_any[:, None], acc / tl.where(has_any, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2
    row = (t * H + h) * num_splits + split
    tl.store(out_ptr + row[:, None] * V + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & (dv[None, :] < V))
    tl.store(lse_ptr + row, lse, mask=hmask)


@triton.jit
def sparse_mla_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, V, num_splits,
                            BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr):
    # Flash-decoding combine, one program per (token x head, tile of V columns): the splits' partial
    # outputs (each normalised over its own keys) weighted by exp(lse_split - lse_total).
    # A split without a valid key has lse -inf and weight 0; a row with none at all gets out 0, lse -inf.
    row = tl.program_id(0).to(tl.int64)  # t * H + h
    dv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < num_splits
    lse_s = tl.load(part_lse_ptr + row * num_splits + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for empty splits
    total = tl.sum(w, axis=0)
    o = tl.load(part_out_ptr + (row * num_splits + sp[:, None]) * V + dv[None, :],
                mask=smask[:, None] & (dv[None, :] < V), other=0.0)
    denom = tl.where(total > 0, total, 1.0)
    merged = tl.sum(o * w[:, None], axis=0) / denom
    tl.store(out_ptr + row * V + dv, merged.to(out_ptr.dtype.element_ty), mask=dv < V)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + row, tl.where(total > 0, m_safe + tl.log(denom), float("-inf")))


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_row0_ptr, tile_row1_ptr, E, N, Kdim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    # One program per (row tile of one expert, column tile). Tiles never straddle experts, so an
    # expert with no rows has no tiles and costs nothing. out[rows] = x[rows] @ w[e]^T. The grid is
    # a host-known bound on the tile count; tiles past the last one carry expert E and return.
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if e >= E:
        return
    row0 = tl.load(tile_row0_ptr + tile).to(tl.int64)
    row1 = tl.load(tile_row1_ptr + tile).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < row1
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, Kdim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < Kdim
        a = tl.load(x_ptr + rows[:, None] * Kdim + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(w_ptr + (e * N + cols[None, :]) * Kdim + kk[:, None], mask=cmask[None, :] & kmask[:, None],
                     other=0.0).to(a.dtype)  # [BLOCK_K, BLOCK_N] = w[e]^T, cast to x's dtype
        if F32_DOT:
            acc += tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, bt)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, group_size, n_group, topk_group, top_k, scaling,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, LIMIT_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    # noaux_tc routing for one token: sigmoid scores, biased choice scores, the best topk_group
    # groups by their top-2 sum, then top_k picks by repeated argmax (top_k is small: 8).
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_EG)
    inside = (g[:, None] < n_group) & (j[None, :] < group_size)
    expert = g[:, None] * group_size + j[None, :]
    logits = tl.load(logits_ptr + t * E + expert, mask=inside, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=inside, other=0.0).to(tl.float32)
    choice = tl.where(inside, choice, float("-inf"))

    if LIMIT_GROUPS:
        # Group score = sum of its two best choice scores (one when a group has a single expert).
        best = tl.max(choice, axis=1)
        best_at = tl.argmax(choice, axis=1)
        second = tl.max(tl.where(j[None, :] == best_at[:, None], float("-inf"), choice), axis=1)
        second = tl.where(group_size > 1, second, 0.0)
        group_score = tl.where(g < n_group, best + second, float("-inf"))
        keep = tl.zeros([BLOCK_G], tl.int1)
        for _ in range(0, topk_group):
            pick = tl.argmax(group_score, axis=0)
            keep = keep | (g == pick)
            group_score = tl.where(g == pick, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))

    slots = tl.arange(0, BLOCK_TOPK)
    ids = tl.zeros([BLOCK_TOPK], tl.int32)
    weights = tl.zeros([BLOCK_TOPK], tl.float32)
    for i in range(0, top_k):
        pick_g = tl.argmax(tl.max(choice, axis=1), axis=0)
        pick_j = tl.argmax(tl.max(tl.where(g[:, None] == pick_g, choice, float("-inf")), axis=0), axis=0)
        chosen = (g[:, None] == pick_g) & (j[None, :] == pick_j)
        weight = tl.sum(tl.sum(tl.where(chosen, scores, 0.0), axis=1), axis=0)
        ids = tl.where(slots == i, (pick_g * group_size + pick_j).to(tl.int32), ids)
        weights = tl.where(slots == i, weight, weights)
        choice = tl.where(chosen, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scaling
    tl.store(weights_ptr + t * top_k + slots, weights, mask=slots < top_k)
    tl.store(ids_ptr + t * top_k + slots, ids, mask=slots < top_k)


@triton.jit
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, D, eps, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    y = centred * inv_std * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kv_cache_write_kernel(cache_ptr, rows_ptr, slot_ptr, D, BLOCK_D: tl.constexpr):
    # One program per (row, column tile); slot -1 (padding) writes nothing.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    slots = tl.full([BLOCK_D], 0, tl.int64) + slot  # broadcast first: a scalar-bool mask is rejected
    mask = (cols < D) & (slots >= 0)
    row = tl.load(rows_ptr + t * D + cols, mask=mask, other=0.0)
    tl.store(cache_ptr + slot * D + cols, row.to(cache_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Fused MoE over expert-sorted token blocks (the design of vLLM's fused_moe: tokens aligned to
# BLOCK_M rows per expert on the device, one expert per row block, padding rows skipped by mask).
# sorted_ids[j] = t * top_k + slot of the assignment in row j, or ``numel`` (padding);
# block_expert[b] = the expert of row block b, or E for a block past the last expert's rows.


@triton.jit
def fused_moe_gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, numel, top_k, E, inter, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    # h[assignment, cols] = silu(x[token] @ W1[e]^T) * (x[token] @ W3[e]^T) for BLOCK_N columns of inter:
    # the gate and up tiles of the same columns are accumulated side by side, so SwiGLU is the
    # epilogue of the GEMM and the [M, 2I] gate-up product never goes to memory.
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= E:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = ids < numel
    tok = tl.where(rmask, ids // top_k, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < inter
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_gate = w13_ptr + (e * 2 * inter + cols[None, :]) * D
    w_up = w13_ptr + (e * 2 * inter + inter + cols[None, :]) * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        a = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[None, :] & kmask[:, None]
        g = tl.load(w_gate + kk[:, None], mask=wmask, other=0.0).to(a.dtype)  # [BLOCK_K, BLOCK_N] = W1[e]^T
        u = tl.load(w_up + kk[:, None], mask=wmask, other=0.0).to(a.dtype)
        if F32_DOT:
            a32 = a.to(tl.float32)
            acc_g += tl.dot(a32, g.to(tl.float32), input_precision="ieee")
            acc_u += tl.dot(a32, u.to(tl.float32), input_precision="ieee")
        else:
            acc_g += tl.dot(a, g)
            acc_u += tl.dot(a, u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + ids[:, None] * inter + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def fused_moe_down_kernel(
    h_ptr, w2_ptr, tw_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr, numel, E, inter, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    # y[assignment, cols] = topk_weight[assignment] * (h[assignment] @ W2[e]^T), fp32.
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= E:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = ids < numel
    safe = tl.where(rmask, ids, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < inter
        a = tl.load(h_ptr + safe[:, None] * inter + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w2_ptr + (e * D + cols[None, :]) * inter + kk[:, None], mask=cmask[None, :] & kmask[:, None],
                    other=0.0).to(a.dtype)  # [BLOCK_K, BLOCK_N] = W2[e]^T
        if F32_DOT:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    weight = tl.load(tw_ptr + safe, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + ids[:, None] * D + cols[None, :], acc * weight[:, None], mask=rmask[:, None] & cmask[None, :])


@triton.jit
def moe_sum_kernel(y_ptr, ids_ptr, out_ptr, top_k, E, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[t] = sum of y over t's kept slots (ids in [0, E)), fp32, stored in out's dtype. Rows of
    # dropped slots were never written, so they are masked, not read.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot = tl.arange(0, BLOCK_K)
    e = tl.load(ids_ptr + t * top_k + slot, mask=slot < top_k, other=-1)
    kept = (slot < top_k) & (e >= 0) & (e < E)
    y = tl.load(y_ptr + (t * top_k + slot[:, None]) * D + cols[None, :], mask=kept[:, None] & (cols[None, :] < D),
                other=0.0)
    tl.store(out_ptr + t * D + cols, tl.sum(y, axis=0).to(out_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def moe_align_kernel(
    ids_ptr, sorted_ids_ptr, block_expert_ptr, numel, E, max_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # moe_align_block_size in one program (decode-sized batches: the whole alignment is one launch
    # instead of a dozen torch ops). Pass 1 counts assignments per expert; their padded prefix sum
    # gives each expert's first row. Pass 2 places assignment j at its expert's first row + the
    # number of earlier assignments of that expert (stable, like a stable sort). Then each row block
    # gets its expert (E past the last). Ids outside [0, E) match no expert and get no row.
    n = tl.arange(0, BLOCK_N)
    ex = tl.arange(0, BLOCK_E)
    real = ex < E  # BLOCK_E is E rounded up to a power of two
    counts = tl.zeros([BLOCK_E], tl.int32)
    for n0 in range(0, numel, BLOCK_N):
        e = tl.load(ids_ptr + n0 + n, mask=n0 + n < numel, other=-1)
        counts += tl.sum(((e[:, None] == ex[None, :]) & real[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    running = pad_end - padded  # next free row of each expert
    for r0 in range(0, max_rows, BLOCK_N):  # every row starts as padding (the sentinel numel)
        tl.store(sorted_ids_ptr + r0 + n, tl.full([BLOCK_N], 0, tl.int32) + numel, mask=r0 + n < max_rows)
    tl.debug_barrier()  # the padding fill lands before the placements that overwrite it
    for n0 in range(0, numel, BLOCK_N):
        e = tl.load(ids_ptr + n0 + n, mask=n0 + n < numel, other=-1)
        onehot = ((e[:, None] == ex[None, :]) & real[None, :]).to(tl.int32)  # [BLOCK_N, BLOCK_E]
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier assignments of the same expert in this chunk
        dest = tl.sum(onehot * (running[None, :] + before), axis=1)
        kept = tl.sum(onehot, axis=1) > 0
        tl.store(sorted_ids_ptr + dest, (n0 + n).to(tl.int32), mask=kept)
        running += tl.sum(onehot, axis=0)
    total_ends = tl.where(real, pad_end, 2147483647)
    for b0 in range(0, max_rows // BLOCK_M, BLOCK_N):
        start = (b0 + n) * BLOCK_M
        expert = tl.sum((total_ends[None, :] <= start[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b0 + n, tl.minimum(expert, E), mask=b0 + n < max_rows // BLOCK_M)
