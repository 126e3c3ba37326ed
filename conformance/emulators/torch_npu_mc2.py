"""CPU emulator of torch_npu's MC2 expert-parallel ops on gloo: ``npu_moe_distribute_dispatch_v2`` /
``npu_moe_distribute_combine_v2`` (added to the emulated ``torch_npu`` module next to
:mod:`.torch_npu`).

Held to Ascend/op-plugin@517f2e7d's own tests: ``test/test_custom_ops/test_moe_distribute_dispatch_v2.py``
(``_construct_excepted_result``: all ranks' tokens concatenated, ``npu_moe_init_routing`` sorts the
assignments by expert, stable, so each receiving rank's ``expand_x`` holds its local experts' rows
expert by expert, each expert's rows by source rank then token; valid rows first in an ``(A, H)``
buffer) and ``test_moe_distribute_combine_v2.py`` (``out[t] = sum_s expert_scales[t, s] *
row(t, s)`` in fp32, cast to the input dtype). Signatures, shapes and limits from the op docs at the
same commit (``docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_distribute_dispatch_v2.md`` /
``..._combine_v2.md``), Atlas A3 figures: ``A = BS * W * min(local_expert_num, K)`` when
``global_bs`` is 0 (else ``global_bs * min(...)``), ``H`` in [1024, 8192], ``0 < BS <= 512``,
``0 < K <= 16``, ids unique per row, ``x_active_mask`` trues before falses; call pattern as
vllm-ascend@182b75e ``vllm_ascend/ops/fused_moe/token_dispatcher.py`` l.113-352 (MC2 path).

``assist_info_for_combine`` / ``ep_recv_counts`` contents are the emulator's own (the doc: pass
them straight to combine, never depend on their values). Each op is an opaque
``torch.library.custom_op`` with a fake kernel; the body runs real all-to-alls on the group whose
``get_hccl_comm_name`` (emulated on gloo) returned ``group_ep``. Padding rows of ``expand_x`` hold
NaN. Not emulated: quantized communication, shared-expert ranks, TP groups, elastic/zero/copy experts.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist

CALLS: dict[str, int] = {}
_NAMES: dict[str, Any] = {}


def _fail(what: str) -> None:
    raise RuntimeError(f"npu_moe_distribute (emulated, op-plugin docs @517f2e7d): {what}")


def _get_hccl_comm_name(backend: Any, rank: int) -> str:
    """``ProcessGroupHCCL.get_hccl_comm_name(rank)`` on the gloo backend of a group (emulated): a
    name that the emulated ops map back to the group, as HCCL maps it to its communicator."""
    for pg in dist.distributed_c10d._world.pg_map:
        if pg._get_backend(torch.device("cpu")) is backend:
            name = f"emulated_hccl_{id(pg)}"
            _NAMES[name] = pg
            return name
    raise RuntimeError("get_hccl_comm_name (emulated): backend of no known process group")


def unpatch() -> None:
    if getattr(dist.ProcessGroupGloo, "get_hccl_comm_name", None) is _get_hccl_comm_name:
        del dist.ProcessGroupGloo.get_hccl_comm_name


def _group(name: str) -> Any:
    if name not in _NAMES:
        _fail(f"group_ep {name!r} is not a communicator name from get_hccl_comm_name")
    return _NAMES[name]


def _a2a(t: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = t.new_empty((sum(recv), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send, group=group)
    return out


@torch.library.custom_op("hwlayer_emu_npu::moe_distribute_dispatch_v2", mutates_args=())
def _dispatch(x: torch.Tensor, expert_ids: torch.Tensor, active: torch.Tensor, group_ep: str, ep_world_size: int,
              moe_expert_num: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    group = _group(group_ep)
    W = ep_world_size
    per = moe_expert_num // W
    k = expert_ids.shape[1]
    ids = expert_ids.long()
    # Value checks run inside the op (on the device, as the kernel's), invisible to the caller's host.
    if bool(((ids < 0) | (ids >= moe_expert_num)).any()):
        _fail(f"expert_ids values must be in [0, {moe_expert_num})")
    if k > 1 and bool((ids.sort(1).values.diff(dim=1) == 0).any()):
        _fail("the K values in one row of expert_ids must not repeat")
    if bool((active.int().diff() > 0).any()):
        _fail("x_active_mask: true must come before false")
    live = active.view(-1, 1).expand_as(ids).reshape(-1)
    flat = ids.reshape(-1)
    token = torch.arange(ids.shape[0]).repeat_interleave(k)
    slot = torch.arange(k).repeat(ids.shape[0])
    keep = live.nonzero().view(-1)
    flat, token, slot = flat[keep], token[keep], slot[keep]
    order = torch.argsort(flat, stable=True)  # by expert, then token (npu_moe_init_routing, stable)
    flat, token, slot = flat[order], token[order], slot[order]
    send = torch.bincount(flat // per, minlength=W)
    recv_t = torch.empty_like(send)
    dist.all_to_all_single(recv_t, send, group=group)
    send_l, recv_l = send.tolist(), recv_t.tolist()
    got_x = _a2a(x.index_select(0, token), send_l, recv_l, group)
    got_meta = _a2a(torch.stack([flat % per, token, slot], 1), send_l, recv_l, group)
    source = torch.repeat_interleave(torch.arange(W), recv_t)
    # Local expert first, then source rank (received rank by rank), then token: stable sort by expert.
    order = torch.argsort(got_meta[:, 0], stable=True)
    n = order.numel()
    if n > rows:
        _fail(f"{n} rows received exceed A = {rows}")
    expand_x = torch.full((rows, x.shape[1]), float("nan"), dtype=x.dtype)
    expand_x[:n] = got_x.index_select(0, order)
    assist = torch.full((rows * 128,), -1, dtype=torch.int32)
    info = torch.stack([source.index_select(0, order), got_meta[order, 1], got_meta[order, 2]], 1).to(torch.int32)
    assist.view(rows, 128)[:n, :3] = info
    counts = torch.bincount(got_meta[:, 0], minlength=per).to(torch.int64)
    ep_recv = torch.zeros(W * per, dtype=torch.int32)  # per (expert, source), prefix sums
    if n:
        ep_recv.index_add_(0, got_meta[:, 0] * W + source, torch.ones(n, dtype=torch.int32))
    CALLS["dispatch_v2"] = CALLS.get("dispatch_v2", 0) + 1
    return expand_x, assist, counts, ep_recv.cumsum(0).to(torch.int32)


@_dispatch.register_fake
def _(x, expert_ids, active, group_ep, ep_world_size, moe_expert_num, rows):
    per = moe_expert_num // ep_world_size
    return (x.new_empty(rows, x.shape[1]), torch.empty(rows * 128, dtype=torch.int32),
            torch.empty(per, dtype=torch.int64), torch.empty(ep_world_size * per, dtype=torch.int32))


@torch.library.custom_op("hwlayer_emu_npu::moe_distribute_combine_v2", mutates_args=())
def _combine(expand_x: torch.Tensor, expert_ids: torch.Tensor, assist: torch.Tensor, ep_send_counts: torch.Tensor,
             expert_scales: torch.Tensor, active: torch.Tensor, group_ep: str, ep_world_size: int) -> torch.Tensor:
    group = _group(group_ep)
    W = ep_world_size
    n = int(ep_send_counts[-1]) if ep_send_counts.numel() else 0
    info = assist.view(-1, 128)[:n, :3].long()
    order = torch.argsort(info[:, 0], stable=True)  # back to each source rank
    send = torch.bincount(info[:, 0], minlength=W)
    recv_t = torch.empty_like(send)
    dist.all_to_all_single(recv_t, send, group=group)
    send_l, recv_l = send.tolist(), recv_t.tolist()
    back = _a2a(expand_x[:n].index_select(0, order), send_l, recv_l, group).float()
    meta = _a2a(info.index_select(0, order)[:, 1:], send_l, recv_l, group)
    BS = expert_ids.shape[0]
    out = torch.zeros(BS, expand_x.shape[1], dtype=torch.float32)
    if back.shape[0]:
        w = expert_scales.float()[meta[:, 0], meta[:, 1]]
        out.index_add_(0, meta[:, 0], back * w.unsqueeze(1))
    CALLS["combine_v2"] = CALLS.get("combine_v2", 0) + 1
    return out.to(expand_x.dtype)


@_combine.register_fake
def _(expand_x, expert_ids, assist, ep_send_counts, expert_scales, active, group_ep, ep_world_size):
    return expand_x.new_empty(expert_ids.shape[0], expand_x.shape[1])


def _check(x: torch.Tensor, expert_ids: torch.Tensor, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
           x_active_mask: torch.Tensor | None, global_bs: int, shared_expert_rank_num: int) -> None:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        _fail(f"x must be 2-D bfloat16/float16 (BS, H), got {x.dtype} {list(x.shape)}")
    BS, H = x.shape
    if not 0 < BS <= 512:
        _fail(f"BS must satisfy 0 < BS <= 512 (Atlas A3), got {BS}")
    if not 1024 <= H <= 8192:
        _fail(f"H must be in [1024, 8192] (Atlas A3), got {H}")
    if expert_ids.dim() != 2 or expert_ids.dtype != torch.int32 or expert_ids.shape[0] != BS:
        _fail(f"expert_ids must be int32 (BS, K), got {expert_ids.dtype} {list(expert_ids.shape)}")
    K = expert_ids.shape[1]
    if not 0 < K <= 16:
        _fail(f"K must satisfy 0 < K <= 16, got {K}")
    if not 2 <= ep_world_size <= 768 or not 0 <= ep_rank_id < ep_world_size:
        _fail(f"ep_world_size in [2, 768] and ep_rank_id in [0, ep_world_size), got {ep_world_size}, {ep_rank_id}")
    if shared_expert_rank_num != 0:
        _fail("shared-expert ranks are not emulated")
    if moe_expert_num % ep_world_size or not 0 < moe_expert_num // ep_world_size * ep_world_size <= 2048:
        _fail(f"moe_expert_num {moe_expert_num}: local_expert_num * ep_world_size in (0, 2048], divisible")
    if x_active_mask is not None:
        if x_active_mask.dtype != torch.bool or tuple(x_active_mask.shape) != (BS,):
            _fail("x_active_mask must be bool (BS,)")
        if global_bs not in (0, BS * ep_world_size):
            _fail("x_active_mask needs the same BS on every rank (global_bs 0 or BS * ep_world_size)")


def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
                                   x_active_mask=None, expert_scales=None, elastic_info=None, performance_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                   shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                   expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                   const_expert_num=0):
    """Emulated ``torch_npu.npu_moe_distribute_dispatch_v2`` (docs @517f2e7d): returns
    ``(expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts,
    tp_recv_counts, expand_scales)``."""
    _check(x, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, global_bs, shared_expert_rank_num)
    if quant_mode != 0 or scales is not None or tp_world_size > 1 or expert_shard_type != 0:
        _fail("only quant_mode=0, no scales, tp_world_size <= 1, expert_shard_type=0 are emulated")
    if expert_token_nums_type not in (0, 1):
        _fail(f"expert_token_nums_type must be 0 or 1, got {expert_token_nums_type}")
    BS, K = expert_ids.shape
    per = moe_expert_num // ep_world_size
    rows = (global_bs or BS * ep_world_size) * min(per, K)
    active = x_active_mask if x_active_mask is not None else torch.ones(BS, dtype=torch.bool)
    expand_x, assist, counts, ep_recv = torch.ops.hwlayer_emu_npu.moe_distribute_dispatch_v2(
        x, expert_ids, active, group_ep, ep_world_size, moe_expert_num, rows)
    if expert_token_nums_type == 0:
        counts = counts.cumsum(0)
    tp_recv = torch.zeros(1, dtype=torch.int32)
    return expand_x, None, assist, counts, ep_recv, tp_recv, None


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0,
                                  tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                  global_bs=0, comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """Emulated ``torch_npu.npu_moe_distribute_combine_v2`` (docs @517f2e7d): ``(BS, H)``."""
    BS, K = expert_ids.shape
    if expand_x.dim() != 2 or expand_x.dtype not in (torch.bfloat16, torch.float16):
        _fail(f"expand_x must be 2-D bfloat16/float16 (A, H), got {expand_x.dtype} {list(expand_x.shape)}")
    if expert_scales.dtype != torch.float32 or tuple(expert_scales.shape) != (BS, K):
        _fail(f"expert_scales must be float32 (BS, K) = ({BS}, {K}), got {expert_scales.dtype} "
              f"{list(expert_scales.shape)}")
    if comm_quant_mode != 0 or shared_expert_x is not None or tp_world_size > 1:
        _fail("only comm_quant_mode=0 without shared_expert_x and TP is emulated")
    active = x_active_mask if x_active_mask is not None else torch.ones(BS, dtype=torch.bool)
    return torch.ops.hwlayer_emu_npu.moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine,
                                                               ep_send_counts, expert_scales, active, group_ep,
                                                               ep_world_size)


def install(module: types.ModuleType) -> None:
    """Add the MC2 ops to the emulated ``torch_npu`` module."""
    module.npu_moe_distribute_dispatch_v2 = npu_moe_distribute_dispatch_v2
    module.npu_moe_distribute_combine_v2 = npu_moe_distribute_combine_v2
    # vllm-ascend names the MC2 communicator through the process group's HCCL backend; under
    # emulation the group is gloo, so the gloo backend class answers for it (removed on deactivate).
    dist.ProcessGroupGloo.get_hccl_comm_name = _get_hccl_comm_name
