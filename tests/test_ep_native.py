"""The EP emulators held to the vendors' own tests, and the native EP adapters' host reads.

Two gloo ranks (spawned), each with the test-only emulators of one backend active:

* DeepEP (``conformance/emulators/deep_ep.py``) against the checks of DeepEP@92fe2de's own tests:
  ``tests/test_intranode.py`` (``x = rank`` rows arrive in the source-rank ranges of
  ``rank_prefix_matrix``; per-expert counts = the all-reduced ``topk_idx == e`` counts; local ids in
  ``[-1, E/W)``; ``combine(recv_x) / is_token_in_rank.sum(1) == x`` and the same for the weights)
  and ``tests/test_low_latency.py`` (``x = rank - 128`` with the token index in the last 128
  columns; ``recv_count[e] == (all_topk_idx == expert).sum()``; ``recv_x[:, -128:] == src_info``;
  per-source ``layout_range`` slices hold that source's value; ``combined == x * w.masked_fill(idx ==
  -1, 0).sum(1)`` with ``-1`` ids).
* MC2 (``conformance/emulators/torch_npu_mc2.py``) against op-plugin@517f2e7d's
  ``test_moe_distribute_dispatch_v2.py`` golden (all ranks' tokens concatenated, assignments
  sorted by expert, stable, each rank's experts' rows first in ``expand_x``) and
  ``test_moe_distribute_combine_v2.py``'s (``sum_s expert_scales * row`` in fp32).
* Host reads: the fixed-capacity adapters (DeepEP low-latency, MC2) run dispatch -> combine under
  ``FakeTensorMode`` (the emulated kernels are opaque custom ops with fake kernels, so only the
  adapters' own code is traced): no data-dependent read. DeepEP's normal mode, which reads its
  counts on the host as the library does, must fail there, so the check can fail.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # spawns two gloo ranks per backend


def _deep_ep_vectors(rank: int, world: int) -> None:
    import deep_ep
    import torch.distributed as dist

    T, E, k = 12, 8 * world, 3
    g = torch.Generator().manual_seed(100 + rank)
    scores = torch.rand(T, E, generator=g) + 1
    topk = scores.topk(k, dim=1).indices.to(deep_ep.topk_idx_t)
    per = E // world
    # --- normal mode, tests/test_intranode.py
    buf = deep_ep.Buffer(dist.group.WORLD, int(1e9), 0)
    x = torch.ones(T, 256, dtype=torch.bfloat16) * rank
    w = torch.ones(T, k, dtype=torch.float32) * rank
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, E)
    want_per_expert = torch.bincount(topk.view(-1), minlength=E).int()
    assert torch.equal(per_expert, want_per_expert)
    rank_idx = topk // per
    assert torch.equal(in_rank, torch.stack([(rank_idx == r).any(1) for r in range(world)], 1))
    assert torch.equal(per_rank, in_rank.sum(0).int())
    gbl_per_expert = per_expert.clone()
    dist.all_reduce(gbl_per_expert)
    gbl_per_rank = per_rank.clone()
    dist.all_reduce(gbl_per_rank)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk, topk_weights=w)
    assert recv_x.shape[0] == int(gbl_per_rank[rank])
    assert counts == gbl_per_expert.view(world, -1)[rank].tolist()
    assert bool(((recv_idx == -1) | ((recv_idx >= 0) & (recv_idx < per))).all())
    assert [int((recv_idx == i).sum()) for i in range(per)] == counts
    start = 0
    for i in range(world):  # check_data: source i's rows hold i
        end = int(handle[0][i][rank])
        assert bool((recv_x[start:end].float() == i).all()), f"rows from rank {i}"
        start = end
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    hits = in_rank.sum(1, keepdim=True)
    assert torch.allclose(combined.float() / hits, x.float())
    # recv_w of a -1 slot is 0 here, so the reduced weights are rank * (hits of that slot's owner)
    assert torch.allclose(combined_w, w)
    # --- low-latency mode, tests/test_low_latency.py
    hidden, C = 2048, 16
    ll = deep_ep.Buffer(dist.group.WORLD, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(C, hidden, world, E),
                        low_latency_mode=True, num_qps_per_rank=per)
    xl = torch.ones(T, hidden, dtype=torch.bfloat16) * (rank - 128)
    xl[:, -128:] = torch.arange(T, dtype=torch.bfloat16).view(-1, 1)
    topl = topk.clone()
    topl[3, 1] = -1
    topl[7, 0] = -1
    all_topk = [torch.empty_like(topl) for _ in range(world)]
    dist.all_gather(all_topk, topl)
    all_topk = torch.stack(all_topk)
    packed, count, h, _, _ = ll.low_latency_dispatch(xl, topl, C, E, use_fp8=False)
    assert packed.shape == (per, C * world, hidden)
    for i in range(per):
        expert = rank * per + i
        n = int(count[i])
        assert n == int((all_topk == expert).sum()) == int((h[1][i] & 0xFFFFFFFF).sum())
        rows, src = packed[i, :n], h[0][i, :n]
        assert torch.equal(rows[:, :-128].amin(1), rows[:, :-128].amax(1))
        assert bool((rows[:, -128:].float() == (src.view(-1, 1) % T).float()).all())
        for j in range(world):
            begin, cnt = int(h[1][i][j]) >> 32, int(h[1][i][j]) & 0xFFFFFFFF
            assert cnt == int((all_topk[j] == expert).sum())
            assert bool((rows[begin:begin + cnt, :-128].float() == j - 128).all())
        assert bool(packed[i, n:].isnan().all()), "padding rows must not look like data"
    wl = torch.rand(T, k, generator=g)
    combined_l, _, _ = ll.low_latency_combine(packed, topl, wl, h)
    want = xl.float() * wl.masked_fill(topl == -1, 0).sum(1, keepdim=True)
    assert not bool(combined_l.isnan().any())
    assert torch.allclose(combined_l.float(), want, rtol=1e-2, atol=1e-2)


def _mc2_vectors(rank: int, world: int) -> None:
    import torch.distributed as dist
    import torch_npu

    bs, h, k, E = 8, 1024, 4, 4 * world
    per = E // world
    g = torch.Generator().manual_seed(7)  # every rank builds every rank's inputs (the test's x1_list)
    xs = [torch.randn(bs, h, generator=g).to(torch.float16) for _ in range(world)]
    ids = [torch.rand(bs, E, generator=g).topk(k, dim=1).indices.int() for _ in range(world)]
    scales = [torch.rand(bs, k, generator=g) for _ in range(world)]
    name = dist.group.WORLD._get_backend(torch.device("cpu")).get_hccl_comm_name(rank)
    out = torch_npu.npu_moe_distribute_dispatch_v2(
        x=xs[rank], expert_ids=ids[rank], group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=E,
        scales=None, expert_shard_type=0, shared_expert_rank_num=0, quant_mode=0, global_bs=bs * world)
    expand_x, _, assist, token_nums, ep_recv, tp_recv, expand_scales = out
    # _construct_excepted_result: concatenate, sort the assignments by expert (stable), take this rank's experts.
    x_all, ids_all = torch.cat(xs), torch.cat(ids)
    flat = ids_all.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    expanded, experts = x_all[order // k], flat[order]
    golden = expanded[(experts // per) == rank]
    assert expand_x.shape == (bs * world * min(per, k), h)
    assert token_nums.tolist() == torch.bincount(flat, minlength=E)[rank * per:(rank + 1) * per].tolist()
    assert torch.equal(expand_x[:golden.shape[0]], golden)
    # combine_v2: out[t] = sum_s scales[t, s] * row(t, s), fp32, in expand_x's dtype
    y = expand_x * 2
    combined = torch_npu.npu_moe_distribute_combine_v2(
        expand_x=y, expert_ids=ids[rank], assist_info_for_combine=assist, ep_send_counts=ep_recv,
        expert_scales=scales[rank], group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=E,
        tp_send_counts=tp_recv, expand_scales=expand_scales, shared_expert_rank_num=0, global_bs=bs * world)
    want = (2 * xs[rank].float()).unsqueeze(1).mul(scales[rank].unsqueeze(2)).sum(1)
    assert torch.allclose(combined.float(), want, rtol=2e-3, atol=2e-3)


def _no_host_read(plan, world: int, capacity_form: bool) -> str | None:
    """Dispatch -> combine of the plan under FakeTensorMode; the data-dependent error, if any."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, D, E, k = 5, 2048, 4 * world, 3
    os.environ["HWLAYER_CHECK"] = "0"  # as in serving: value checks (device reads by design) off
    with FakeTensorMode():
        x = torch.randn(T, D, dtype=torch.bfloat16)
        ids = torch.randint(0, E, (T, k), dtype=torch.int32)
        w = torch.rand(T, k)
        try:
            recv_x, recv_ids, handle = plan.ep_dispatch(x, ids, E, None, w, 8 if capacity_form else None)
            plan.ep_combine(recv_x, handle, w)
        except Exception as exc:  # DataDependentOutputException & co: a host read
            return f"{type(exc).__name__}: {exc}"
    return None


def _worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, str | None] = {}
    try:
        import hwlayer
        from conformance import emulators
        from hwlayer.distributed import init_distributed, shutdown

        emulators.activate(backend)
        plan = hwlayer.plan(backend)
        init_distributed(plan, timeout_s=30)
        try:
            (_deep_ep_vectors if backend == "cuda" else _mc2_vectors)(rank, world)
            result["vectors"] = None
        except Exception:
            result["vectors"] = traceback.format_exc(limit=6)
        result["fake_capacity"] = _no_host_read(plan, world, True)
        if backend == "cuda":
            result["fake_normal"] = _no_host_read(plan, world, False)
        from hwlayer.backends.ascend import mc2
        from hwlayer.backends.cuda import deepep

        result["calls"] = json.dumps({**deepep.CALLS, **mc2.CALLS})
        shutdown()
    except Exception:
        result["setup"] = traceback.format_exc(limit=6)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _run(backend: str, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, port, backend, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{backend}: the EP emulator ranks did not finish in 120 s")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def test_deep_ep_emulator_and_adapter() -> None:
    for rank, r in enumerate(_run("cuda")):
        assert "setup" not in r, r.get("setup")
        assert r["vectors"] is None, f"rank {rank}: DeepEP emulator vs its tests' checks:\n{r['vectors']}"
        assert r["fake_capacity"] is None, f"rank {rank}: low-latency adapter read the device: {r['fake_capacity']}"
        assert r["fake_normal"] is not None, "normal mode reads its counts on the host; FakeTensorMode saw no read"
        calls = json.loads(r["calls"])
        assert calls.get("low_latency_dispatch") and calls.get("low_latency_combine"), calls


def test_mc2_emulator_and_adapter() -> None:
    for rank, r in enumerate(_run("ascend")):
        assert "setup" not in r, r.get("setup")
        assert r["vectors"] is None, f"rank {rank}: MC2 emulator vs op-plugin's test goldens:\n{r['vectors']}"
        assert r["fake_capacity"] is None, f"rank {rank}: MC2 adapter read the device: {r['fake_capacity']}"
        calls = json.loads(r["calls"])
        assert calls.get("dispatch_v2") and calls.get("combine_v2"), calls
