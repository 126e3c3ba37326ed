"""DeepEP expert-parallel dispatch/combine behind ``ep_dispatch`` / ``ep_combine`` (NVIDIA).

Written against deepseek-ai/DeepEP@92fe2de ``deep_ep/buffer.py`` (the ``Buffer`` API its
``tests/test_intranode.py`` and ``tests/test_low_latency.py`` exercise; at HEAD dd758ca the same
class lives in ``deep_ep/buffers/legacy.py`` and is still exported as ``deep_ep.Buffer``); emulated in
CI (conformance/emulators/deep_ep.py, gloo underneath), not run on a GPU.

* **Exact form** (prefill, ``capacity=None``) -> normal mode: ``get_dispatch_layout`` then
  ``Buffer.dispatch`` with the routing weights, which delivers each token once per rank with its
  local ids (``-1`` for other ranks' experts) and weights. The rows are expanded to one per
  assignment (source rank, token, slot: the contract's order). ``ep_combine`` sums each token's
  local assignments with those weights in fp32 and ``Buffer.combine`` adds the ranks' partial sums
  (unweighted, as the library defines it). Needs ``topk_weights`` at dispatch; reads the per-expert
  counts on the host as the library does.
* **Fixed-capacity form** (decode, ``capacity=C``) -> low-latency mode: ``low_latency_dispatch``
  (bf16, ``use_fp8=False``) gives ``[E/W, C * W, D]`` rows and per-expert counts on the device; the
  rows are a view and padding ids are computed on the device, so nothing is read on the host and
  the call can be captured in a CUDA graph. ``low_latency_combine`` does the weighted sum on the
  source rank.

Every ``supports`` condition is the same on every rank (dtype, widths, world, capacity, whether
weights were given), so all ranks take the same path into the collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops.ep import check_dispatch_args, sum_rows
from hwlayer.ops.layout import check_tensor

from . import native

SWITCH_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # DeepEP csrc/kernels/launch.cuh l.114
QP_DEPTH = 1024  # NVSHMEM_QP_DEPTH default; low-latency mode asserts qp_depth >= (C + 1) * 2
CALLS: dict[str, int] = {}  # which mode served, per process (tests read it)
_BUFFERS: dict[tuple[int, bool], Any] = {}


@dataclass
class DeepEPHandle:
    """``ep_combine``'s view of a DeepEP dispatch: the library's own handle plus what the adapter
    needs to fold the per-assignment rows back into per-token rows."""

    low_latency: bool
    handle: Any
    num_tokens: int
    top_k: int
    row_token: torch.Tensor | None = None  # normal mode: received token of each delivered row
    row_weight: torch.Tensor | None = None  # normal mode: its routing weight (fp32)
    num_recv_tokens: int = 0
    topk_idx: torch.Tensor | None = None  # low-latency mode: the source's ids, for the weighted combine


def _group(group: Any) -> Any:
    import torch.distributed as dist

    return group if group is not None else dist.group.WORLD


def _buffer(group: Any, low_latency: bool, hidden: int, num_experts: int, capacity: int) -> Any:
    """One ``deep_ep.Buffer`` per (group, mode), made on first use and remade larger when a call
    needs more room (as DeepEP's README ``get_buffer`` does)."""
    import deep_ep
    import torch.distributed as dist

    world = dist.get_world_size(group)
    key = (id(group), low_latency)
    buf = _BUFFERS.get(key)
    if low_latency:
        need = deep_ep.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, world, num_experts)
        if buf is None or buf.num_rdma_bytes < need:
            buf = deep_ep.Buffer(group, 0, need, low_latency_mode=True, num_qps_per_rank=max(1, num_experts // world))
    else:
        hidden_bytes = hidden * 2
        need = max(deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden_bytes, world),
                   deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden_bytes, world))
        if buf is None or buf.num_nvl_bytes < need:
            buf = deep_ep.Buffer(group, need, 0)
    _BUFFERS[key] = buf
    return buf


def dispatch_supports(x: Any, topk_ids: Any, num_experts: int, group: Any = None, topk_weights: Any = None,
                      capacity: int | None = None) -> bool | str:
    import torch.distributed as dist

    if not native.importable("deep_ep"):
        return "deep_ep is not installed"
    if not native._cuda_tensors(x, topk_ids) or x.dim() != 2 or topk_ids.dim() != 2:
        return "outside the contract"
    if x.dtype != torch.bfloat16:
        return "DeepEP moves bf16 rows (or FP8 tuples)"
    world = dist.get_world_size(_group(group))
    if num_experts % world:
        return "outside the contract"
    if capacity is None:
        if topk_weights is None:
            return "normal mode reduces on the expert's rank: needs topk_weights at dispatch"
        if x.shape[1] * 2 % 16:
            return "normal mode needs hidden * 2 bytes a multiple of 16"
        return True
    if x.shape[1] not in SWITCH_HIDDEN:
        return f"low-latency kernels are compiled for hidden in {SWITCH_HIDDEN}"
    if (capacity + 1) * 2 > QP_DEPTH:
        return f"low-latency mode needs (capacity + 1) * 2 <= the QP depth {QP_DEPTH}"
    return True


def deepep_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group: Any = None,
                    topk_weights: torch.Tensor | None = None,
                    capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, DeepEPHandle]:
    """``ep_dispatch`` through DeepEP: normal mode for the exact form, low-latency for capacity."""
    op = "ep_dispatch"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, shape=[x.shape[0], None])
    check_dispatch_args(op, x, topk_ids, num_experts, capacity)
    group = _group(group)
    T, k = topk_ids.shape
    D = x.shape[1]
    ids = topk_ids.to(torch.int64).contiguous()  # deep_ep.topk_idx_t
    if capacity is None:
        buf = _buffer(group, False, D, num_experts, 0)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x.contiguous(), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=ids,
            topk_weights=topk_weights.float().contiguous())
        # One row per (received token, local slot), row-major over [tokens, k]: source rank, then
        # token, then slot, as the contract orders them. (Normal mode syncs with the host anyway.)
        row_token, row_slot = (recv_idx >= 0).nonzero(as_tuple=True)
        rows = recv_x.index_select(0, row_token)
        local_ids = recv_idx[row_token, row_slot].to(torch.int32)
        CALLS["normal_dispatch"] = CALLS.get("normal_dispatch", 0) + 1
        return rows, local_ids, DeepEPHandle(False, handle, T, k, row_token, recv_w[row_token, row_slot].float(),
                                             recv_x.shape[0])
    buf = _buffer(group, True, D, num_experts, capacity)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x.contiguous(), ids, capacity, num_experts,
                                                                use_fp8=False)
    local_experts, rows_per_expert = recv_x.shape[0], recv_x.shape[1]
    # Padding ids on the device: row j of expert e is valid iff j < recv_count[e].
    j = torch.arange(rows_per_expert, device=recv_x.device)
    expert = torch.arange(local_experts, device=recv_x.device, dtype=torch.int32).unsqueeze(1)
    local_ids = torch.where(j.unsqueeze(0) < recv_count.unsqueeze(1), expert, -1).reshape(-1).to(torch.int32)
    CALLS["low_latency_dispatch"] = CALLS.get("low_latency_dispatch", 0) + 1
    return recv_x.view(local_experts * rows_per_expert, D), local_ids, DeepEPHandle(True, handle, T, k, topk_idx=ids)


def combine_supports(y: Any, handle: Any, topk_weights: Any, group: Any = None) -> bool | str:
    return True if isinstance(handle, DeepEPHandle) else "a handle from another ep_dispatch"


def deepep_combine(y: torch.Tensor, handle: DeepEPHandle, topk_weights: torch.Tensor,
                   group: Any = None) -> torch.Tensor:
    """``ep_combine`` through DeepEP (the mode of the dispatch that made ``handle``)."""
    op = "ep_combine"
    check_tensor(op, "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, handle.top_k])
    group = _group(group)
    D = y.shape[1]
    if not handle.low_latency:
        check_tensor(op, "y", y, ndim=2, shape=[handle.row_token.shape[0], None])
        # The expert-side reduction DeepEP's normal combine expects: one weighted row per received token.
        partial = sum_rows(y, handle.row_token, handle.row_weight, handle.num_recv_tokens)
        buf = _buffer(group, False, D, 0, 0)
        out, _, _ = buf.combine(partial.to(torch.bfloat16), handle.handle)
        CALLS["normal_combine"] = CALLS.get("normal_combine", 0) + 1
        return out.to(y.dtype)
    src_info, layout, capacity, hidden, num_experts = handle.handle
    buf = _buffer(group, True, D, num_experts, capacity)
    local_experts = src_info.shape[0]
    check_tensor(op, "y", y, ndim=2, shape=[local_experts * src_info.shape[1], hidden])
    out, _, _ = buf.low_latency_combine(y.to(torch.bfloat16).view(local_experts, -1, D).contiguous(), handle.topk_idx,
                                        topk_weights.float().contiguous(), handle.handle)
    CALLS["low_latency_combine"] = CALLS.get("low_latency_combine", 0) + 1
    return out.to(y.dtype)


def register(register_op: Any, backend: str = "cuda") -> None:
    """Register both ops for ``backend`` (the cuda backend's ``hwlayer_register_ops`` calls this)."""
    register_op("ep_dispatch", deepep_dispatch, backend=backend, supports=dispatch_supports)
    register_op("ep_combine", deepep_combine, backend=backend, supports=combine_supports)
