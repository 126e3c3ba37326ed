"""CPU emulator of DeepEP's ``deep_ep.Buffer`` (normal and low-latency modes) on gloo.

Written against deepseek-ai/DeepEP@92fe2de (2025-11-05): the Python API ``deep_ep/buffer.py``
(``Buffer.get_dispatch_layout`` / ``dispatch`` / ``combine`` l.293-451, ``low_latency_dispatch`` /
``low_latency_combine`` l.548-661), the host checks of ``csrc/deep_ep.cpp`` (intranode dispatch
l.489-521, low-latency dispatch l.1546-1575) and ``SWITCH_HIDDEN`` (``csrc/kernels/launch.cuh``
l.114); semantics as the library's own tests check them: ``tests/test_intranode.py`` (layout
counts, rows grouped by source rank per ``rank_prefix_matrix``, local ids with ``-1`` for other
ranks' experts, unweighted combine = sum over the ranks a token went to) and
``tests/test_low_latency.py`` (``[num_local_experts, C * W, hidden]`` rows, ``recv_count`` valid per
expert, ``layout_range = begin << 32 | count`` per source rank, ``src_info`` = source token index,
weighted combine on the source rank, ``-1`` ids skipped). At HEAD (dd758ca, 2026-07) the same class
is ``deep_ep.buffers.legacy.Buffer``, still exported as ``deep_ep.Buffer``.

The data movement is real: each call is an opaque ``torch.library.custom_op`` (with a
``register_fake`` kernel, so ``FakeTensorMode`` sees only the caller's own host reads) whose body
runs ``torch.distributed`` all-to-alls on the buffer's (gloo) group. Padding rows of the
low-latency receive buffer hold NaN, as stale buffer contents would: a caller that reads them fails.
Not emulated: FP8 casting (``use_fp8=True`` raises), async events (``EventOverlap`` is a no-op),
the internode (RDMA) kernels, buffer sizing beyond a size check against this module's own hint.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.distributed as dist

topk_idx_t = torch.int64
SWITCH_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # csrc/kernels/launch.cuh l.114-133
_GROUPS: dict[int, Any] = {}
CALLS: dict[str, int] = {}  # emulated kernel calls in this process (tests read it)


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def _assert(cond: bool, what: str) -> None:
    if not cond:  # DeepEP's EP_HOST_ASSERT raises a RuntimeError naming the failed condition
        raise RuntimeError(f"Assertion error (csrc/deep_ep.cpp): {what}")


def _a2a(t: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = t.new_empty((sum(recv), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send, group=group)
    return out


def _exchange_counts(send: torch.Tensor, group: Any) -> list[int]:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


# --------------------------------------------------------------------------------------------
# Normal (intranode) mode


@torch.library.custom_op("hwlayer_emu_deep_ep::dispatch", mutates_args=())
def _dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
              group_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    group = _GROUPS[group_key]
    W = dist.get_world_size(group)
    per = num_experts // W
    T, k = topk_idx.shape
    owner = torch.where(topk_idx >= 0, topk_idx // per, -1)
    is_in = torch.stack([(owner == r).any(1) for r in range(W)], 1) if T else torch.zeros(0, W, dtype=torch.bool)
    rows, idx, wts, src, send = [], [], [], [], []
    send_head = torch.full((T, W), -1, dtype=torch.int32)
    for r in range(W):
        tokens = is_in[:, r].nonzero().view(-1)  # ascending: channels are contiguous token ranges
        send_head[tokens, r] = torch.arange(tokens.numel(), dtype=torch.int32)
        mine = owner.index_select(0, tokens) == r
        rows.append(x.index_select(0, tokens))
        idx.append(torch.where(mine, topk_idx.index_select(0, tokens) - r * per, -1))
        wts.append(torch.where(mine, topk_weights.index_select(0, tokens), 0.0))
        src.append(tokens.to(torch.int32))
        send.append(tokens.numel())
    recv = _exchange_counts(torch.tensor(send, dtype=torch.int64), group)
    recv_x = _a2a(torch.cat(rows), send, recv, group)
    recv_idx = _a2a(torch.cat(idx), send, recv, group)
    recv_w = _a2a(torch.cat(wts).float(), send, recv, group)
    recv_src = _a2a(torch.cat(src), send, recv, group)
    parts = [torch.empty(W, dtype=torch.int64) for _ in range(W)]
    dist.all_gather(parts, torch.tensor(send, dtype=torch.int64), group=group)
    matrix = torch.stack(parts)
    rank_prefix_matrix = matrix.cumsum(0).to(torch.int32)  # [i][j]: tokens ranks <= i send to rank j
    per_expert = torch.stack([(recv_idx == e).sum() for e in range(per)]).to(torch.int32) if per else \
        torch.zeros(0, dtype=torch.int32)
    _count("dispatch")
    return recv_x, recv_idx, recv_w, per_expert, rank_prefix_matrix, recv_src, send_head


@_dispatch.register_fake
def _(x, topk_idx, topk_weights, num_experts, group_key):
    n = torch.library.get_ctx().new_dynamic_size()
    W = dist.get_world_size(_GROUPS[group_key])
    k = topk_idx.shape[1]
    return (x.new_empty(n, x.shape[1]), topk_idx.new_empty(n, k), topk_weights.new_empty(n, k),
            torch.empty(num_experts // W, dtype=torch.int32), torch.empty(W, W, dtype=torch.int32),
            torch.empty(n, dtype=torch.int32), torch.empty(topk_idx.shape[0], W, dtype=torch.int32))


@torch.library.custom_op("hwlayer_emu_deep_ep::combine", mutates_args=())
def _combine(x: torch.Tensor, topk_weights: torch.Tensor, rank_prefix_matrix: torch.Tensor,
             send_head: torch.Tensor, group_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    group = _GROUPS[group_key]
    W, me = dist.get_world_size(group), dist.get_rank(group)
    column = rank_prefix_matrix[:, me].long()
    send = torch.diff(column, prepend=column.new_zeros(1)).tolist()  # rows I hold per source rank
    is_in = send_head >= 0
    recv = is_in.sum(0).tolist()
    back = _a2a(x, send, recv, group).float()
    back_w = _a2a(topk_weights.float(), send, recv, group)
    T = send_head.shape[0]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32)
    out_w = torch.zeros(T, topk_weights.shape[1], dtype=torch.float32)
    start = 0
    for r in range(W):  # rank r returns my tokens in the order I sent them (ascending)
        tokens = is_in[:, r].nonzero().view(-1)
        out.index_add_(0, tokens, back[start:start + tokens.numel()])
        out_w.index_add_(0, tokens, back_w[start:start + tokens.numel()])
        start += tokens.numel()
    _count("combine")
    return out.to(x.dtype), out_w


@_combine.register_fake
def _(x, topk_weights, rank_prefix_matrix, send_head, group_key):
    T = send_head.shape[0]
    return x.new_empty(T, x.shape[1]), topk_weights.new_empty(T, topk_weights.shape[1]).float()


# --------------------------------------------------------------------------------------------
# Low-latency mode


@torch.library.custom_op("hwlayer_emu_deep_ep::low_latency_dispatch", mutates_args=())
def _ll_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, capacity: int, num_experts: int,
                 group_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    group = _GROUPS[group_key]
    W = dist.get_world_size(group)
    per = num_experts // W
    D = x.shape[1]
    rows, meta, send = [], [], []
    for r in range(W):  # to rank r: its local experts in order, each expert's tokens ascending
        for e in range(per):
            tokens = (topk_idx == r * per + e).any(1).nonzero().view(-1)
            rows.append(x.index_select(0, tokens))
            meta.append(torch.stack([torch.full_like(tokens, e), tokens], 1))
        send.append(sum(m.shape[0] for m in meta[r * per:(r + 1) * per]))
    recv = _exchange_counts(torch.tensor(send, dtype=torch.int64), group)
    got_x = _a2a(torch.cat(rows), send, recv, group)
    got_meta = _a2a(torch.cat(meta), send, recv, group)
    source = torch.repeat_interleave(torch.arange(W), torch.tensor(recv))
    packed_x = torch.full((per, capacity * W, D), float("nan"), dtype=x.dtype)
    src_info = torch.full((per, capacity * W), -1, dtype=torch.int32)
    layout = torch.zeros(per, W, dtype=torch.int64)
    count = torch.zeros(per, dtype=torch.int32)
    for e in range(per):  # expert e's rows: source rank 0's, then 1's, ... (the kernel's order may differ)
        sel = (got_meta[:, 0] == e).nonzero().view(-1)
        n = sel.numel()
        packed_x[e, :n] = got_x.index_select(0, sel)
        src_info[e, :n] = got_meta.index_select(0, sel)[:, 1].to(torch.int32)
        per_src = torch.bincount(source.index_select(0, sel), minlength=W)
        begin = torch.cumsum(per_src, 0) - per_src
        layout[e] = (begin << 32) | per_src
        count[e] = n
    _count("low_latency_dispatch")
    return packed_x, count, src_info, layout


@_ll_dispatch.register_fake
def _(x, topk_idx, capacity, num_experts, group_key):
    W = dist.get_world_size(_GROUPS[group_key])
    per = num_experts // W
    return (x.new_empty(per, capacity * W, x.shape[1]), torch.empty(per, dtype=torch.int32),
            torch.empty(per, capacity * W, dtype=torch.int32), torch.empty(per, W, dtype=torch.int64))


@torch.library.custom_op("hwlayer_emu_deep_ep::low_latency_combine", mutates_args=())
def _ll_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, src_info: torch.Tensor,
                layout_range: torch.Tensor, num_experts: int, group_key: int) -> torch.Tensor:
    group = _GROUPS[group_key]
    W, me = dist.get_world_size(group), dist.get_rank(group)
    per = num_experts // W
    rows, meta, send = [], [], []
    for r in range(W):  # back to source rank r: every valid row that came from it
        for e in range(per):
            begin, n = int(layout_range[e, r]) >> 32, int(layout_range[e, r]) & 0xFFFFFFFF
            rows.append(x[e, begin:begin + n])
            tokens = src_info[e, begin:begin + n].long()
            meta.append(torch.stack([torch.full_like(tokens, me * per + e), tokens], 1))
        send.append(sum(m.shape[0] for m in meta[r * per:(r + 1) * per]))
    recv = _exchange_counts(torch.tensor(send, dtype=torch.int64), group)
    back = _a2a(torch.cat(rows), send, recv, group).float()
    back_meta = _a2a(torch.cat(meta), send, recv, group)
    T = topk_idx.shape[0]
    out = torch.zeros(T, x.shape[2], dtype=torch.float32)
    if back.shape[0]:
        expert, token = back_meta[:, 0], back_meta[:, 1]
        slot_match = topk_idx.index_select(0, token) == expert.unsqueeze(1)  # [n, k]
        weight = (topk_weights.float().index_select(0, token) * slot_match).sum(1)
        out.index_add_(0, token, back * weight.unsqueeze(1))  # reduce *with* weights, fp32
    _count("low_latency_combine")
    return out.to(x.dtype)


@_ll_combine.register_fake
def _(x, topk_idx, topk_weights, src_info, layout_range, num_experts, group_key):
    return x.new_empty(topk_idx.shape[0], x.shape[2])


# --------------------------------------------------------------------------------------------
# The Python API (deep_ep/buffer.py)


class EventOverlap:
    def __init__(self, event: Any = None, extra_tensors: Any = None) -> None:
        self.event = event

    def current_stream_wait(self) -> None:
        pass


class Config:
    def __init__(self, num_sms: int = 20, num_max_send_tokens: int = 6, num_max_recv_tokens: int = 256,
                 num_max_rdma_send_tokens: int = 6, num_max_rdma_recv_tokens: int = 256) -> None:
        self.num_sms = num_sms
        self.num_max_recv_tokens = num_max_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        # The emulator's own bound: one max-size chunk per channel and rank (not csrc/config.hpp's formula).
        return hidden_bytes * self.num_max_recv_tokens * num_ranks * max(1, self.num_sms // 2)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


class Buffer:
    """``deep_ep.Buffer`` (intranode normal mode and low-latency mode) on a gloo group."""

    num_sms: int = 20

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm: Any = None) -> None:
        self.group = group
        self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.nvshmem_qp_depth = 1024  # NVSHMEM_QP_DEPTH default (deep_ep/buffer.py l.100-110)
        self._key = len(_GROUPS)
        _GROUPS[self._key] = group

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        # The emulator's own bound (two send + receive buffers of bf16 rows with a header), not LowLatencyLayout.
        per_msg = hidden * 2 + 16
        return 2 * 2 * num_max_dispatch_tokens_per_rank * per_msg * num_experts

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        _assert(topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == topk_idx_t,
                "topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.scalar_type() == topk_idx_t")
        _assert(num_experts > 0 and num_experts % self.group_size == 0, "num_experts % num_ranks == 0")
        W, per = self.group_size, num_experts // self.group_size
        valid = topk_idx >= 0
        owner = torch.where(valid, topk_idx // per, -1)
        is_in = torch.stack([(owner == r).any(1) for r in range(W)], 1) if topk_idx.shape[0] else \
            torch.zeros(0, W, dtype=torch.bool)
        per_rank = is_in.sum(0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
        _count("get_dispatch_layout")
        return per_rank, None, per_expert, is_in, EventOverlap()

    def dispatch(self, x: Any, handle: Any = None, num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: Any = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> tuple:
        _assert(not self.low_latency_mode or self.num_nvl_bytes > 0, "num_nvl_bytes > 0 for the normal kernels")
        if isinstance(x, tuple):
            raise NotImplementedError("deep_ep emulator: FP8 (tuple) dispatch is not emulated")
        if handle is not None or num_worst_tokens or expert_alignment != 1:
            raise NotImplementedError("deep_ep emulator: cached dispatch, num_worst_tokens and expert_alignment")
        _assert(num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None,
                "num_tokens_per_rank.has_value() and num_tokens_per_expert.has_value()")
        _assert(is_token_in_rank.dtype == torch.bool, "is_token_in_rank.scalar_type() == torch::kBool")
        _assert(num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_expert.dtype == torch.int32,
                "num_tokens_per_rank / num_tokens_per_expert scalar_type() == torch::kInt32")
        _assert(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _assert(x.shape[1] * x.element_size() % 16 == 0, "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        _assert(x.dtype == torch.bfloat16, "x.scalar_type() == torch::kBFloat16 (buffer.py: bf16 or an FP8 tuple)")
        _assert(tuple(is_token_in_rank.shape) == (x.shape[0], self.group_size), "is_token_in_rank.size() == {T, W}")
        _assert(num_tokens_per_expert.shape[0] % self.group_size == 0, "num_tokens_per_expert.size(0) % num_ranks == 0")
        need = (config or self.get_dispatch_config(self.group_size)).get_nvl_buffer_size_hint(x.shape[1] * 2,
                                                                                               self.group_size)
        _assert(self.num_nvl_bytes >= need, f"num_nvl_bytes {self.num_nvl_bytes} >= the hint {need}")
        num_experts = num_tokens_per_expert.shape[0]
        if topk_idx is None:
            raise NotImplementedError("deep_ep emulator: dispatch without topk_idx")
        _assert(topk_idx.dtype == topk_idx_t and topk_weights is not None and topk_weights.dtype == torch.float32,
                "topk_idx is topk_idx_t and topk_weights is float32")
        recv_x, recv_idx, recv_w, per_expert, prefix, recv_src, send_head = torch.ops.hwlayer_emu_deep_ep.dispatch(
            x, topk_idx, topk_weights, num_experts, self._key)
        handle = (prefix, None, None, recv_src, is_token_in_rank, send_head)
        # The real library hands this list over from pinned host memory after a CPU busy-wait.
        return recv_x, recv_idx, recv_w, per_expert.tolist(), handle, EventOverlap()

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: torch.Tensor | None = None, bias: Any = None,
                config: Config | None = None, previous_event: Any = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> tuple:
        _assert(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16,
                "x.dim() == 2 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        if bias is not None:
            raise NotImplementedError("deep_ep emulator: combine bias")
        prefix, _, _, recv_src, _, send_head = handle
        _assert(x.shape[0] == recv_src.shape[0], "x.size(0) == src_idx.size(0)")
        w = topk_weights if topk_weights is not None else x.new_zeros(x.shape[0], 1, dtype=torch.float32)
        out, out_w = torch.ops.hwlayer_emu_deep_ep.combine(x, w, prefix, send_head, self._key)
        return out, (out_w if topk_weights is not None else None), EventOverlap()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> tuple:
        C = num_max_dispatch_tokens_per_rank
        _assert(self.low_latency_mode, "low_latency_mode")
        _assert(self.nvshmem_qp_depth >= (C + 1) * 2,
                "self.nvshmem_qp_depth >= (num_max_dispatch_tokens_per_rank + 1) * 2")
        _assert(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16,
                "x.dim() == 2 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        _assert(x.shape[1] % 128 == 0, "x.size(1) % sizeof(int4) == 0 and x.size(1) % 128 == 0")
        _assert(x.shape[1] in SWITCH_HIDDEN, f"hidden {x.shape[1]} in SWITCH_HIDDEN {SWITCH_HIDDEN}")
        _assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx.dim() == 2 and topk_idx.is_contiguous()")
        _assert(x.shape[0] == topk_idx.shape[0] and x.shape[0] <= C,
                "x.size(0) == topk_idx.size(0) and x.size(0) <= num_max_dispatch_tokens_per_rank")
        _assert(topk_idx.dtype == topk_idx_t, "topk_idx.scalar_type() == topk_idx_t")
        _assert(num_experts % self.group_size == 0, "num_experts % num_ranks == 0")
        need = self.get_low_latency_rdma_size_hint(C, x.shape[1], self.group_size, num_experts)
        _assert(self.num_rdma_bytes >= need, f"layout.total_bytes {need} <= num_rdma_bytes {self.num_rdma_bytes}")
        if use_fp8:
            raise NotImplementedError("deep_ep emulator: use_fp8=True is not emulated (pass use_fp8=False)")
        packed_x, count, src_info, layout = torch.ops.hwlayer_emu_deep_ep.low_latency_dispatch(
            x, topk_idx, C, num_experts, self._key)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(count)
        handle = (src_info, layout, C, x.shape[1], num_experts)
        hook: Callable[[], None] = lambda: None
        return packed_x, count, handle, EventOverlap(), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None) -> tuple:
        src_info, layout, C, hidden, num_experts = handle
        _assert(self.nvshmem_qp_depth >= (C + 1) * 2,
                "self.nvshmem_qp_depth >= (num_max_dispatch_tokens_per_rank + 1) * 2")
        per = num_experts // self.group_size
        _assert(x.dim() == 3 and tuple(x.shape) == (per, C * self.group_size, hidden) and x.dtype == torch.bfloat16,
                "x.dim() == 3 and x.size() == {num_local_experts, C * num_ranks, hidden} and bf16")
        _assert(topk_idx.dim() == 2 and topk_idx.dtype == topk_idx_t and topk_idx.shape[0] <= C,
                "topk_idx.dim() == 2 and topk_idx.size(0) <= num_max_dispatch_tokens_per_rank")
        _assert(topk_weights.dtype == torch.float32 and topk_weights.shape == topk_idx.shape,
                "topk_weights.scalar_type() == torch::kFloat32 and same shape as topk_idx")
        if use_logfmt or zero_copy:
            raise NotImplementedError("deep_ep emulator: use_logfmt / zero_copy")
        combined = torch.ops.hwlayer_emu_deep_ep.low_latency_combine(x, topk_idx, topk_weights, src_info, layout,
                                                                     num_experts, self._key)
        if out is not None:
            out.copy_(combined)
            combined = out
        hook: Callable[[], None] = lambda: None
        return combined, EventOverlap(), hook


def install(module: types.ModuleType) -> None:
    """Fill the emulated ``deep_ep`` module."""
    module.__doc__ = "emulated deep_ep (conformance/emulators/deep_ep.py), DeepEP@92fe2de legacy Buffer API"
    module.Buffer = Buffer
    module.Config = Config
    module.EventOverlap = EventOverlap
    module.topk_idx_t = topk_idx_t
    module.__version__ = "1.2.1+emulated"
