"""Expert-parallel communication: ``all_to_all``, ``ep_dispatch`` / ``ep_combine`` and their handles.

Two forms of one contract (``ep_dispatch``'s docstring is the contract):

* **exact** (``capacity=None``, prefill): exactly the delivered rows, in source-rank order. The
  row count depends on the routing, so the host learns it (one counts exchange); DeepEP's normal
  mode (``Buffer.dispatch`` / ``combine``) is the native form on NVIDIA.
* **fixed capacity** (``capacity=C``, decode, graph-capturable): every shape follows from ``C``
  and the group; no value is read on the host. Padding rows carry local id ``-1``. DeepEP's
  low-latency mode and Ascend's MC2 ``npu_moe_distribute_dispatch_v2`` / ``combine_v2`` are the
  native forms; both deliver rows grouped by expert, so the row order in this form belongs to the
  implementation.

The generic implementations below are the reference on every backend (gloo on CPU, nccl, hccl...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .layout import INDEX_DTYPES, check_tensor, fail, value_checks
from .moe import moe_unpermute

# Rows the generic combine reduces per step: bounds its fp32 working set (~1 MiB) so the weighted
# sum reads each returned row once, from cache, with no full-size gathered or upcast copy.
_COMBINE_CHUNK_BYTES = 1 << 20


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
        fail("all_to_all", "input_split_sizes", f"sizes summing to {x.shape[0]}", sum(input_split_sizes))
    out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group)
    return out


@dataclass
class EPHandle:
    """What the generic ``ep_combine`` needs to send expert outputs back (exact form).

    Outputs come back one row per assignment, grouped by the expert's rank, each rank's rows in
    token-slot order. ``order`` (int64 ``[T*k]``): returned row ``j`` is assignment ``order[j] = t * k
    + slot``; ``inverse`` is its inverse permutation (assignment -> row), or None where a caller built
    a handle without it (then ``order`` may also drop assignments: ``moe_unpermute`` serves).
    ``send_counts`` / ``recv_counts``: assignments sent to / received from each rank."""

    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    top_k: int
    inverse: torch.Tensor | None = None


@dataclass
class EPTokenHandle:
    """The generic exact form when the weights came with the dispatch: each token travelled once per
    destination rank and comes back once per rank, as that rank's weighted partial sum (DeepEP's
    normal-mode scheme). ``sent_token`` (int64): the token of each sent row, destination by
    destination; ``row_token`` / ``row_weight``: the received token and weight of each delivered
    assignment row; the counts are tokens sent to / received from each rank."""

    sent_token: torch.Tensor
    send_tokens: list[int]
    recv_tokens: list[int]
    row_token: torch.Tensor
    row_weight: torch.Tensor
    num_tokens: int
    top_k: int


@dataclass
class EPCapacityHandle:
    """What the generic ``ep_combine`` needs in the fixed-capacity form. ``slot_rows`` (int64
    ``[T*k]``): the row of the returned buffer that holds assignment ``t * k + slot``."""

    slot_rows: torch.Tensor
    capacity: int
    num_tokens: int
    top_k: int
    world: int


def check_dispatch_args(op: str, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                        capacity: int | None) -> None:
    """The per-rank checks every ``ep_dispatch`` makes (adapters too): ``capacity`` covers this rank's
    tokens; ids in range (a value check: only under ``HWLAYER_CHECK=1``)."""
    if capacity is not None and (not isinstance(capacity, int) or capacity < x.shape[0]):
        fail(op, "capacity", f"an int >= this rank's {x.shape[0]} tokens, the same on every rank", capacity)
    _check_ids(op, topk_ids.reshape(-1), num_experts)


def _check_ids(op: str, flat: torch.Tensor, num_experts: int) -> None:
    if value_checks() and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        got = f"ids in [{int(flat.min())}, {int(flat.max())}]"
        fail(op, "topk_ids", f"global expert ids in [0, {num_experts})", got)


def ep_dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    group: Any = None,
    topk_weights: torch.Tensor | None = None,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Expert-parallel dispatch: send each (token, expert) assignment to the expert's owner.

    Experts are sharded evenly and contiguously: rank ``r`` of the ``W``-rank ``group`` owns
    global experts ``[r * E/W, (r + 1) * E/W)``. ``x``: ``[T, D]``; ``topk_ids``: int
    ``[T, k]`` global ids. ``T`` is this rank's own and may differ between ranks, zero included
    (with data-parallel attention each rank brings its own sequences' tokens, an idle one none);
    ``k`` and ``D`` are the same on every rank. Every rank must call it (collective), with the
    same ``capacity`` and whether or not ``topk_weights`` is given. Returns
    ``(recv_x [R, D], recv_local_ids int32 [R], handle)``: the rows this rank's experts must
    process, the local expert id (``global - r * E/W``) of each, and a handle for ``ep_combine``
    (opaque: only the ``ep_combine`` of the same plan reads it).

    ``topk_weights`` (optional, fp32 ``[T, k]``, hook specs 2.x): the routing weights, when the
    caller has them at dispatch (the model does). A backend may send them with the rows and do the
    weighted sum on the expert's rank (DeepEP's normal mode reduces that way); ``ep_combine`` must
    then get the same weights. Results do not depend on whether it is given, up to the one rounding
    of per-rank partial sums ``ep_combine`` allows; an implementation may decline the call without them.

    **Exact form** (``capacity=None``): ``R`` = the assignments routed to this rank, rows grouped
    by source rank, each source's rows in its token-slot order (``t * k + slot`` ascending). ``R``
    depends on the routing: the host learns it (one small exchange).

    **Fixed-capacity form** (``capacity=C``, an int ``>= T`` on every rank, the same on every
    rank): graph-capturable, no value read on the host. ``R`` depends only on ``(C, W, E, k)`` and
    the implementation (generic: ``W * C * k``; DeepEP low-latency: ``E/W * W * C``; MC2:
    ``W * C * min(E/W, k)``). Every assignment routed here is delivered once; the other rows are
    padding with local id ``-1`` and unspecified contents (``fused_experts`` skips ids outside
    ``[0, E/W)``; ``ep_combine`` never reads padding). Row order is the implementation's.
    """
    import torch.distributed as dist

    op = "ep_dispatch"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, shape=[x.shape[0], None])
    if topk_weights is not None:
        check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=list(topk_ids.shape))
    world = dist.get_world_size(group)
    if num_experts % world:
        fail(op, "num_experts", f"a multiple of the EP world size {world}", num_experts)
    check_dispatch_args(op, x, topk_ids, num_experts, capacity)
    per_rank = num_experts // world
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    dest = flat // per_rank
    if capacity is not None:
        return _dispatch_capacity(x, flat, dest, per_rank, world, k, capacity, group)
    if topk_weights is not None:
        return _dispatch_tokens(x, topk_ids.long(), topk_weights, dest.view(-1, k), per_rank, world, group)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    # The counts exchange runs while the send buffer is gathered; the one host read EP needs
    # follows (all-to-all-v takes host split sizes; the fixed-capacity form has none).
    counts_work = dist.all_to_all_single(recv_counts, send_counts, group=group, async_op=True)
    send_x = x.index_select(0, order // k)
    local_ids = (flat.index_select(0, order) % per_rank).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts_work.wait()
    send, recv = send_counts.tolist(), recv_counts.tolist()
    # The small id exchange runs asynchronously under the row exchange: one round trip, not two.
    recv_ids = local_ids.new_empty(sum(recv))
    ids_work = dist.all_to_all_single(recv_ids, local_ids, recv, send, group=group, async_op=True)
    recv_x = x.new_empty((sum(recv), x.shape[1]))
    dist.all_to_all_single(recv_x, send_x, recv, send, group=group)
    ids_work.wait()
    return recv_x, recv_ids, EPHandle(order, send, recv, x.shape[0], k, inverse)


def _dispatch_tokens(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dest: torch.Tensor, per_rank: int,
                     world: int, group: Any) -> tuple[torch.Tensor, torch.Tensor, EPTokenHandle]:
    """Exact form with the weights at hand, DeepEP's normal-mode scheme on plain all-to-alls: a token
    goes once to each rank that owns one of its experts, carrying its ``k`` global ids and weights;
    the receiver keeps its own assignments and expands them to one row per assignment. ``ep_combine``
    then sums each token's local assignments on the expert's rank and sends one row per token back."""
    import torch.distributed as dist

    T, k = ids.shape
    D = x.shape[1]
    hits = torch.zeros((world, T), dtype=torch.bool, device=x.device)
    if T:
        hits.scatter_(0, dest.t().contiguous(), True)  # hits[r, t]: token t has an expert on rank r
    counts = torch.stack([hits.sum(1), torch.bincount(dest.reshape(-1), minlength=world)], 1)  # [W, 2]
    recv_counts = torch.empty_like(counts)  # tokens and assignments per rank, in one small exchange
    work = dist.all_to_all_single(recv_counts, counts, group=group, async_op=True)
    # Ids and weights ride in extra columns of the token's row (as DeepEP's kernels send them with the
    # token), appended once per token: one gather builds the send buffer, one exchange moves all three.
    meta = torch.cat([ids.to(torch.int32), weights.float().view(torch.int32)], 1)  # [T, 2k], 8k bytes
    x_ext = torch.cat([x, meta.view(x.dtype)], 1)  # (8k bytes are whole elements of any float dtype)
    sent_token = hits.view(-1).nonzero().view(-1) % max(T, 1)  # destination-major, tokens ascending
    send_buf = x_ext.index_select(0, sent_token)
    work.wait()
    both, recv_both = counts.tolist(), recv_counts.tolist()
    send, recv = [c[0] for c in both], [c[0] for c in recv_both]
    recv_buf = x.new_empty((sum(recv), send_buf.shape[1]))
    dist.all_to_all_single(recv_buf, send_buf, recv, send, group=group)
    recv_meta = recv_buf[:, D:].contiguous().view(torch.int32)
    local = recv_meta[:, :k] - dist.get_rank(group) * per_rank
    # The delivered assignments, row-major over (received token, slot): source rank, token, slot.
    pos = ((local >= 0) & (local < per_rank)).view(-1).nonzero().view(-1)
    R = sum(c[1] for c in recv_both)
    if pos.numel() != R:  # the ids sent and the counts exchanged disagree
        fail("ep_dispatch", "topk_ids", f"{R} assignments to this rank's experts, as counted", pos.numel())
    row_token = pos // k
    rows = recv_buf[:, :D].index_select(0, row_token)
    row_ids = local.reshape(-1).index_select(0, pos)
    row_weight = recv_meta[:, k:].contiguous().view(torch.float32).reshape(-1).index_select(0, pos)
    return rows, row_ids, EPTokenHandle(sent_token, send, recv, row_token, row_weight, T, k)


def _dispatch_capacity(x: torch.Tensor, flat: torch.Tensor, dest: torch.Tensor, per_rank: int, world: int, k: int,
                       capacity: int, group: Any) -> tuple[torch.Tensor, torch.Tensor, EPCapacityHandle]:
    """Fixed capacity: every rank sends every rank one block of ``C * k`` rows (assignments first,
    in token-slot order, then zero padding), so all split sizes are known on the host in advance."""
    T, D = x.shape
    block = capacity * k
    n = flat.numel()
    # Position of each assignment within its destination's block: its rank among the earlier
    # assignments to the same destination (a cumulative count per destination, all on the device).
    onehot = torch.nn.functional.one_hot(dest, world) if n else dest.new_zeros((0, world))
    pos = (onehot.cumsum(0) - onehot).gather(1, dest.view(-1, 1)).view(-1) if n else dest
    slot_rows = dest * block + pos
    send_x = x.new_zeros((world * block, D))
    send_x.index_copy_(0, slot_rows, x.repeat_interleave(k, dim=0) if k > 1 else x)
    send_ids = torch.full((world * block,), -1, dtype=torch.int32, device=x.device)
    send_ids.index_copy_(0, slot_rows, (flat % per_rank).to(torch.int32))
    recv_x, recv_ids = _fixed_all_to_all(send_x, send_ids, block, _group_name(group))
    return recv_x, recv_ids, EPCapacityHandle(slot_rows, capacity, T, k, world)


def _group_name(group: Any) -> str:
    import torch.distributed as dist

    return (group if group is not None else dist.group.WORLD).group_name


def _fixed_exchange(t: torch.Tensor, block: int, group_name: str, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """Every rank sends every rank ``block`` rows of ``t``: ``(received, work)`` (work None unless async)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    splits = [block] * dist.get_world_size(group)
    out = torch.empty_like(t)
    return out, dist.all_to_all_single(out, t.contiguous(), splits, splits, group=group, async_op=async_op)


@torch.library.custom_op("hwlayer::fixed_all_to_all", mutates_args=())
def _fixed_all_to_all(x: torch.Tensor, ids: torch.Tensor, block: int,
                      group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both fixed-split exchanges of the fixed-capacity dispatch as one op (the ids under the rows). An
    op (not bare c10d calls) so a step tracer records it: torch.jit.trace refuses a ProcessGroup
    argument, a group name it takes."""
    recv_ids, ids_work = _fixed_exchange(ids, block, group_name, async_op=True)
    recv_x, _ = _fixed_exchange(x, block, group_name)
    ids_work.wait()
    return recv_x, recv_ids


@_fixed_all_to_all.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, block: int, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(ids)


@torch.library.custom_op("hwlayer::fixed_all_to_all_rows", mutates_args=())
def _fixed_all_to_all_rows(y: torch.Tensor, block: int, group_name: str) -> torch.Tensor:
    """The combine's fixed-split exchange (see :func:`_fixed_all_to_all`)."""
    return _fixed_exchange(y, block, group_name)[0]


@_fixed_all_to_all_rows.register_fake
def _(y: torch.Tensor, block: int, group_name: str) -> torch.Tensor:
    return torch.empty_like(y)


def ep_combine(y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Expert-parallel combine, the inverse of ``ep_dispatch``.

    ``y``: ``[R, D]`` expert outputs for the rows ``ep_dispatch`` delivered, same order,
    unweighted (``R`` may be zero, as may this rank's ``T``; padding rows of the fixed-capacity
    form are ignored, whatever they hold). ``handle``: from the same plan's ``ep_dispatch``.
    Sends them back and returns ``[T, D]`` in ``y.dtype`` with
    ``out[t] = sum_slot topk_weights[t, slot] * y_slot``, accumulated in fp32. Collective.
    ``topk_weights`` must equal the weights given to ``ep_dispatch``, if any were given there (an
    implementation that reduces on the expert's rank uses those and may round each rank's partial
    sum to ``y.dtype`` once before the cross-rank sum: DeepEP's normal mode does, and so does the
    generic exact form when the weights came with the dispatch, halving the bytes sent back).
    """
    op = "ep_combine"
    if isinstance(handle, EPCapacityHandle):
        return _combine_capacity(y, handle, topk_weights, group)
    if isinstance(handle, EPTokenHandle):
        return _combine_tokens(y, handle, topk_weights, group)
    if not isinstance(handle, EPHandle):
        fail(op, "handle", "the handle the generic ep_dispatch returned", type(handle).__name__)
    check_tensor(op, "y", y, ndim=2, shape=[sum(handle.recv_counts), None])
    check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, handle.top_k])
    T, k = handle.num_tokens, handle.top_k
    back = all_to_all(y, handle.send_counts, handle.recv_counts, group)
    if handle.inverse is None or handle.order.numel() != T * k:  # a handle that dropped assignments
        return moe_unpermute(back, handle.order, topk_weights, T)
    return _weighted_rows(back, handle.inverse.view(T, k), topk_weights, y.dtype)


def _combine_tokens(y: torch.Tensor, handle: EPTokenHandle, topk_weights: torch.Tensor, group: Any) -> torch.Tensor:
    """Each received token's assignments weighted and summed here in fp32, rounded to ``y.dtype`` once
    (one row per token and rank goes back, as DeepEP's normal-mode combine sends it); the sender sums
    its tokens' rows from every rank in fp32."""
    import torch.distributed as dist

    check_tensor("ep_combine", "y", y, ndim=2, shape=[handle.row_token.shape[0], None])
    check_tensor("ep_combine", "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, handle.top_k])
    partial = sum_rows(y, handle.row_token, handle.row_weight, sum(handle.recv_tokens)).to(y.dtype)
    back = y.new_empty((sum(handle.send_tokens), y.shape[1]))
    dist.all_to_all_single(back, partial, handle.send_tokens, handle.recv_tokens, group=group)
    return sum_rows(back, handle.sent_token, None, handle.num_tokens).to(y.dtype)


def sum_rows(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, n: int) -> torch.Tensor:
    """``out[i] = sum_{j: index[j] = i} weights[j] * rows[j]`` in fp32 (``[n, D]``), upcasting
    ``rows`` in cache-sized blocks rather than as one full-size copy. The expert-side reduction of an
    exact-form combine that sums on the expert's rank (the generic one, DeepEP's normal mode)."""
    out = torch.zeros((n, rows.shape[1]), dtype=torch.float32, device=rows.device)
    step = max(1, _COMBINE_CHUNK_BYTES // max(1, rows.shape[1] * 4))
    for r0 in range(0, rows.shape[0], step):
        # (one pass: the product with fp32 weights is fp32; unweighted rows are upcast)
        block = rows[r0:r0 + step] * weights[r0:r0 + step, None] if weights is not None else rows[r0:r0 + step].float()
        out.index_add_(0, index[r0:r0 + step], block)
    return out


def _combine_capacity(y: torch.Tensor, handle: EPCapacityHandle, topk_weights: torch.Tensor,
                      group: Any) -> torch.Tensor:
    block = handle.capacity * handle.top_k
    check_tensor("ep_combine", "y", y, ndim=2, shape=[handle.world * block, None])
    check_tensor("ep_combine", "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, handle.top_k])
    back = _fixed_all_to_all_rows(y, block, _group_name(group))
    return _weighted_rows(back, handle.slot_rows.view(handle.num_tokens, handle.top_k), topk_weights, y.dtype)


def _weighted_rows(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_s weights[t, s] * rows[index[t, s]]`` in fp32, in token blocks: each block
    gathers its ``k`` rows per token and does one batched ``[1, k] x [k, D]`` product, so no
    full-size gathered or upcast copy of ``rows`` is ever made."""
    T, k = index.shape
    D = rows.shape[1]
    out = torch.empty((T, D), dtype=dtype, device=rows.device)
    step = max(1, _COMBINE_CHUNK_BYTES // max(1, k * D * 4))
    w = weights.float()
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        block = rows.index_select(0, index[t0:t1].reshape(-1)).view(t1 - t0, k, D).float()
        out[t0:t1] = torch.bmm(w[t0:t1].view(t1 - t0, 1, k), block).view(t1 - t0, D)
    return out
