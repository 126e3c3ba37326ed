"""Ascend MC2 expert-parallel dispatch/combine behind the fixed-capacity ``ep_dispatch`` / ``ep_combine``.

Written against ``torch_npu.npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2``
as Ascend/op-plugin@517f2e7d documents and tests them
(``test/test_custom_ops/test_moe_distribute_dispatch_v2.py``, ``test_moe_distribute_combine_v2.py``)
and as vllm-ascend@182b75e's MC2 path calls them (``vllm_ascend/ops/fused_moe/token_dispatcher.py``
l.113-352: communicator name from ``get_hccl_comm_name``, uniform batch with ``global_bs=0`` and
``x_active_mask``, ``expert_token_nums_type=1``, combine fed the dispatch's ``assist_info_for_combine``
/ ``ep_recv_counts`` and the routing weights as ``expert_scales``); emulated in CI
(conformance/emulators/torch_npu_mc2.py, gloo underneath), not run on Ascend hardware.

MC2 is a fixed-capacity op: ``expand_x`` is ``(A, H)`` with ``A = BS * W * min(E/W, K)`` rows,
local experts' rows first, expert by expert, with per-expert counts on the device. So it serves the
fixed-capacity form only (decode, graph-capturable: the tokens are padded to ``capacity`` rows on
every rank, the padding masked out with ``x_active_mask``; padding ids are computed on the device).
The exact form (rows in source-rank order, a routing-dependent count) stays on the generic
``all_to_all_single`` over hccl. The Atlas A3 limits (``H`` in [1024, 8192], ``0 < BS <= 512``,
``K <= 16``, bf16/fp16) are checked in ``supports``; they are the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops.ep import check_dispatch_args
from hwlayer.ops.layout import check_tensor

from .device import device_type

CALLS: dict[str, int] = {}


@dataclass
class MC2Handle:
    """What ``npu_moe_distribute_combine_v2`` needs from the dispatch, plus the padded ids/mask."""

    group_name: str
    world: int
    rank: int
    num_experts: int
    capacity: int
    num_tokens: int
    expert_ids: torch.Tensor  # int32 [capacity, k], padding rows arange(k)
    active: torch.Tensor  # bool [capacity]
    assist_info: torch.Tensor
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    expand_scales: Any


def _group(group: Any) -> Any:
    import torch.distributed as dist

    return group if group is not None else dist.group.WORLD


def _comm_name(group: Any) -> str:
    """The HCCL communicator name MC2 takes as ``group_ep`` (vllm-ascend token_dispatcher.py l.118-120)."""
    import torch.distributed as dist

    backend = group._get_backend(torch.device(device_type()))
    return backend.get_hccl_comm_name(dist.get_rank(group))


def dispatch_supports(x: Any, topk_ids: Any, num_experts: int, group: Any = None, topk_weights: Any = None,
                      capacity: int | None = None) -> bool | str:
    import importlib.util

    import torch.distributed as dist

    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    if capacity is None:
        return "MC2 delivers a fixed-capacity, expert-major buffer: the exact form stays generic"
    if not isinstance(x, torch.Tensor) or x.device.type != device_type() or x.dim() != 2 or topk_ids.dim() != 2:
        return "outside the contract"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "MC2 moves bf16 / fp16 rows"
    if not 1024 <= x.shape[1] <= 8192:
        return "MC2 (Atlas A3) needs hidden in [1024, 8192]"
    if not 0 < capacity <= 512 or not 0 < topk_ids.shape[1] <= 16:
        return "MC2 (Atlas A3) needs 0 < BS <= 512 and 0 < K <= 16"
    world = dist.get_world_size(_group(group))
    if world < 2 or num_experts % world or num_experts > 2048:
        return "MC2 needs 2 <= ep_world_size and local experts * ep_world_size <= 2048"
    return True


def mc2_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group: Any = None,
                 topk_weights: torch.Tensor | None = None,
                 capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, MC2Handle]:
    """Fixed-capacity ``ep_dispatch`` through ``npu_moe_distribute_dispatch_v2``."""
    import torch.distributed as dist
    import torch_npu

    op = "ep_dispatch"
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, shape=[x.shape[0], None])
    assert capacity is not None  # supports() declined the exact form
    check_dispatch_args(op, x, topk_ids, num_experts, capacity)
    group = _group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T, k = topk_ids.shape
    D = x.shape[1]
    # The same BS on every rank (uniform mode, global_bs=0): pad to capacity, mask the padding out.
    # Padding rows route to experts 0..k-1 (distinct, in range); the mask keeps them from moving.
    xs = x.new_zeros((capacity, D))
    xs[:T] = x
    ids = torch.arange(k, dtype=torch.int32, device=x.device).repeat(capacity, 1)
    ids[:T] = topk_ids.to(torch.int32)
    active = torch.zeros(capacity, dtype=torch.bool, device=x.device)
    active[:T] = True
    name = _comm_name(group)
    expand_x, _, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = \
        torch_npu.npu_moe_distribute_dispatch_v2(
            x=xs, expert_ids=ids, group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=num_experts,
            scales=None, x_active_mask=active, expert_shard_type=0, shared_expert_rank_num=0, quant_mode=0,
            global_bs=0, expert_token_nums_type=1)
    # Row r belongs to local expert e while r < the running count of experts 0..e; later rows pad.
    ends = torch.cumsum(expert_token_nums.to(torch.int64), 0)
    r = torch.arange(expand_x.shape[0], device=x.device, dtype=torch.int64)
    expert = torch.searchsorted(ends, r, right=True)
    local_ids = torch.where(expert < ends.numel(), expert, -1).to(torch.int32)
    CALLS["dispatch_v2"] = CALLS.get("dispatch_v2", 0) + 1
    handle = MC2Handle(name, world, rank, num_experts, capacity, T, ids, active, assist, ep_recv_counts,
                       tp_recv_counts, expand_scales)
    return expand_x, local_ids, handle


def combine_supports(y: Any, handle: Any, topk_weights: Any, group: Any = None) -> bool | str:
    return True if isinstance(handle, MC2Handle) else "a handle from another ep_dispatch"


def mc2_combine(y: torch.Tensor, handle: MC2Handle, topk_weights: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``ep_combine`` through ``npu_moe_distribute_combine_v2`` (weighted sum on the source rank, fp32)."""
    import torch_npu

    check_tensor("ep_combine", "y", y, ndim=2)
    check_tensor("ep_combine", "topk_weights", topk_weights, ndim=2, shape=[handle.num_tokens, None])
    k = handle.expert_ids.shape[1]
    scales = torch.zeros((handle.capacity, k), dtype=torch.float32, device=y.device)
    scales[:handle.num_tokens] = topk_weights.float()
    out = torch_npu.npu_moe_distribute_combine_v2(
        expand_x=y, expert_ids=handle.expert_ids, assist_info_for_combine=handle.assist_info,
        ep_send_counts=handle.ep_recv_counts, expert_scales=scales, group_ep=handle.group_name,
        ep_world_size=handle.world, ep_rank_id=handle.rank, moe_expert_num=handle.num_experts,
        tp_send_counts=handle.tp_recv_counts, x_active_mask=handle.active, expand_scales=handle.expand_scales,
        shared_expert_rank_num=0, global_bs=0)
    CALLS["combine_v2"] = CALLS.get("combine_v2", 0) + 1
    return out[:handle.num_tokens]


def register(register_op: Any, backend: str = "ascend") -> None:
    """Register both ops for ``backend`` (the ascend backend's ``hwlayer_register_ops`` calls this)."""
    register_op("ep_dispatch", mc2_dispatch, backend=backend, supports=dispatch_supports)
    register_op("ep_combine", mc2_combine, backend=backend, supports=combine_supports)
