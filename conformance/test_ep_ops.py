"""Multi-rank conformance of the expert-parallel ops (``ep_dispatch``, ``ep_combine``).

The suite starts its own processes (``torch.multiprocessing`` spawn, world sizes 2 and 4) on the
collective backend of the backend under test (``--backend``, default cpu -> gloo). Every rank
builds the *whole* problem from one seed (all ranks' tokens, all experts), so it can compute the
float64 golden single-process, naively, from the full inputs; then it runs the ops through
``hwlayer.plan(backend)`` on its own share and compares:

* delivery: ``ep_dispatch`` hands each rank exactly the (token, expert) rows whose expert it
  owns, with the right local ids, grouped by source rank and in token-slot order (exact);
* combine: ``ep_combine`` of the delivered rows themselves equals ``sum_slot w * x`` (float64 golden);
* MoE: dispatch -> ``fused_experts`` on the local experts (one row per assignment, weight 1, as
  the model runs it) -> combine equals the dense MoE ``sum_slot w * expert(x)`` in float64;
* skewed routing: every token to one rank's experts, a rank that receives nothing, an expert
  with no tokens, a rank with no tokens of its own, no tokens anywhere (exact empty shapes, then a
  real step on the same group that must still be right);
* uneven row counts, as data-parallel attention produces them (each rank brings its own
  sequences' tokens): 0 / 37 / 1 / 12 tokens, and one rank with every token while the rest bring none;
* bad input (ids out of range, experts not divisible by the world size): ``ValueError`` on every
  rank before any collective, naming the argument.

One spawn per world size runs every scenario in fp32, bf16 and fp16; the tests below (their
dtypes follow ``--dtype``) read its per-rank results, and ``--report`` records them under
``expert_parallel``. A vendor backend needs 4 devices (one per rank, by ``LOCAL_RANK``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytestmark = pytest.mark.slow  # multi-process gloo groups

WORLD_SIZES = (2, 4)
SPAWN_TIMEOUT_S = 90.0  # the whole spawn, start-up included
COLLECTIVE_TIMEOUT_S = 20.0  # one collective; a broken op fails instead of hanging
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# |out - golden| <= atol + rtol * |golden|, golden in float64 on the same rounded inputs.
TOLERANCE = {  # (combine: weighted sum of k rows; moe: + two expert GEMMs, bf16 activations between)
    ("combine", "fp32"): (1e-6, 1e-5),
    ("combine", "bf16"): (1.6e-2, 1.6e-2),
    ("moe", "fp32"): (1e-5, 1e-5),
    ("moe", "bf16"): (3e-2, 3e-2),
    ("combine", "fp16"): (2e-3, 2e-3),
    ("moe", "fp16"): (4e-3, 4e-3),
}
HIDDEN, INTERMEDIATE = 16, 8


# --------------------------------------------------------------------------------------------
# Scenarios: the routing of every rank's tokens, from one seed


def _routing(world: int, name: str) -> dict[str, Any]:
    """Tokens per rank, expert count, top-k, and which experts may be chosen by which rank."""
    E = 4 * world
    per_rank = E // world
    tokens = [5 + 2 * r for r in range(world)]
    allowed: Callable[[int], list[int]] = lambda src: list(range(E))
    k = 3
    if name == "all_to_one_rank":  # every token of every rank goes to the last rank's experts
        allowed = lambda src: list(range((world - 1) * per_rank, E))
    elif name == "rank_receives_nothing":  # nobody picks rank 0's experts
        allowed = lambda src: list(range(per_rank, E))
    elif name == "expert_without_tokens":  # experts 1 and E-2 are never picked
        allowed = lambda src: [e for e in range(E) if e not in (1, E - 2)]
    elif name == "rank_without_tokens":  # rank 1 has no tokens of its own
        tokens[1] = 0
    elif name == "no_tokens_anywhere":
        tokens = [0] * world
    elif name == "uneven_tokens":  # data-parallel attention: ranks bring their own sequences' tokens
        tokens = [0, 37, 1, 12][:world]
    elif name == "one_rank_has_all_tokens":  # every other rank is idle and joins with zero rows
        tokens = [0] * world
        tokens[-1] = 29
    elif name == "top1_one_token":
        tokens, k = [1] * world, 1
    return {"E": E, "k": k, "tokens": tokens, "allowed": allowed}


SCENARIOS = (
    "uniform",
    "all_to_one_rank",
    "rank_receives_nothing",
    "expert_without_tokens",
    "rank_without_tokens",
    "no_tokens_anywhere",
    "uneven_tokens",
    "one_rank_has_all_tokens",
    "top1_one_token",
)


def _problem(world: int, name: str, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """The full problem (every rank's inputs, every expert), identical on every rank."""
    spec = _routing(world, name)
    g = torch.Generator().manual_seed(seed)
    E, k = spec["E"], spec["k"]
    xs, ids, weights = [], [], []
    for src, T in enumerate(spec["tokens"]):
        xs.append(torch.randn(T, HIDDEN, generator=g, dtype=torch.float64).to(dtype))
        scores = torch.rand(T, E, generator=g, dtype=torch.float64)
        mask = torch.full((E,), True)
        mask[spec["allowed"](src)] = False
        scores[:, mask] = -1.0  # never chosen while an allowed expert is left
        ids.append(scores.topk(k, dim=1).indices.to(torch.int32))
        weights.append(torch.rand(T, k, generator=g, dtype=torch.float64).float())
    w13 = (torch.randn(E, 2 * INTERMEDIATE, HIDDEN, generator=g, dtype=torch.float64) * HIDDEN**-0.5).to(dtype)
    w2 = (torch.randn(E, HIDDEN, INTERMEDIATE, generator=g, dtype=torch.float64) * INTERMEDIATE**-0.5).to(dtype)
    return {"E": E, "k": k, "x": xs, "ids": ids, "weights": weights, "w13": w13, "w2": w2}


# --------------------------------------------------------------------------------------------
# Float64 goldens, naive, from the full inputs


def _golden_delivery(p: dict[str, Any], rank: int, world: int) -> tuple[torch.Tensor, list[int]]:
    """Rows (float64) and local ids rank ``rank`` must receive: by source rank, then token-slot order."""
    per_rank = p["E"] // world
    rows, local = [], []
    for src in range(world):
        x, ids = p["x"][src], p["ids"][src]
        for t in range(ids.shape[0]):
            for slot in range(ids.shape[1]):
                e = int(ids[t, slot])
                if e // per_rank == rank:
                    rows.append(x[t].double())
                    local.append(e - rank * per_rank)
    return (torch.stack(rows) if rows else torch.empty(0, HIDDEN, dtype=torch.float64)), local


def _golden_expert(p: dict[str, Any], e: int, row: torch.Tensor) -> torch.Tensor:
    w13, w2 = p["w13"][e].double(), p["w2"][e].double()
    gate, up = w13[:INTERMEDIATE] @ row, w13[INTERMEDIATE:] @ row
    return w2 @ (gate / (1.0 + torch.exp(-gate)) * up)


def _golden_moe(p: dict[str, Any], rank: int, expert: bool) -> torch.Tensor:
    """``out[t] = sum_slot w[t, slot] * f(x[t])`` for rank's own tokens; f = expert or identity."""
    x, ids, w = p["x"][rank], p["ids"][rank], p["weights"][rank]
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            row = x[t].double()
            y = _golden_expert(p, int(ids[t, slot]), row) if expert else row
            out[t] += float(w[t, slot]) * y
    return out


def _close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    if got.numel() == 0:
        return
    err = (got.double().cpu() - want).abs()
    bound = atol + rtol * want.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{what}: max |err| {float(err.max()):.3g} exceeds atol {atol} + rtol {rtol} * |golden| "
            f"(worst element {i}: got {float(got.flatten()[i]):.6g}, golden {float(want.flatten()[i]):.6g})"
        )


# --------------------------------------------------------------------------------------------
# The worker: one process per rank


def _run_scenario(plan: Any, rank: int, world: int, name: str, dtype_name: str, seed: int) -> None:
    if name == "no_tokens_anywhere":
        # An empty step has nothing to compare but shapes: check those exactly, then run a real
        # step right after it on the same process group and plan. State an empty step leaves
        # behind (buffers or split sizes sized for zero, a handle reused) shows up there.
        _run_step(plan, rank, world, name, dtype_name, seed, empty=True)
        _run_step(plan, rank, world, "uniform", dtype_name, seed + 7919)
    else:
        _run_step(plan, rank, world, name, dtype_name, seed)


def _run_step(plan: Any, rank: int, world: int, name: str, dtype_name: str, seed: int, empty: bool = False) -> None:
    dtype = DTYPES[dtype_name]
    p = _problem(world, name, dtype, seed)
    dev = plan.device
    E = p["E"]
    per_rank = E // world
    x = p["x"][rank].to(dev)
    ids = p["ids"][rank].to(dev)
    weights = p["weights"][rank].to(dev)

    # Every rank makes the same collective calls whatever its checks find (a failed check must
    # not leave the ranks out of step), then reports all its findings at once.
    findings: list[str] = []

    def expect(check: Callable[[], None]) -> None:
        try:
            check()
        except AssertionError as exc:
            findings.append(str(exc))

    # 1. delivery, exact
    # Weights at dispatch (as the model passes them) in even-seeded steps, without them in odd ones:
    # implementations may take a different road with them (DeepEP's normal mode needs them).
    with_weights = seed % 2 == 0
    recv_x, recv_ids, handle = plan.ep_dispatch(x, ids, E, None, weights if with_weights else None)
    want_rows, want_ids = _golden_delivery(p, rank, world)

    def check_delivery() -> None:
        if recv_ids.dtype != torch.int32:
            raise AssertionError(f"ep_dispatch: recv_local_ids dtype {recv_ids.dtype}, expected int32")
        if recv_x.dtype != dtype:
            raise AssertionError(f"ep_dispatch: recv_x dtype {recv_x.dtype}, expected {dtype}")
        if recv_ids.cpu().tolist() != want_ids:
            raise AssertionError(f"ep_dispatch: local ids {recv_ids.cpu().tolist()}, expected {want_ids}")
        if recv_x.shape != want_rows.shape or not torch.equal(recv_x.cpu().double(), want_rows):
            raise AssertionError(
                f"ep_dispatch: received rows differ from the rows routed to rank {rank} "
                f"(got shape {list(recv_x.shape)}, expected {list(want_rows.shape)})"
            )

    expect(check_delivery)

    # 2. combine of the delivered rows themselves: out = x * sum(w)
    out = plan.ep_combine(recv_x, handle, weights)

    def check_combine() -> None:
        if out.dtype != dtype:
            raise AssertionError(f"ep_combine: output dtype {out.dtype}, expected {dtype}")
        _close("ep_combine(identity experts)", out, _golden_moe(p, rank, expert=False),
               *TOLERANCE[("combine", dtype_name)])

    expect(check_combine)

    # 3. the delivered rows through the local experts, one row per assignment with weight 1 (as
    # the model runs them), then combine again with the same handle == the dense MoE
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=dev)
    y = plan.fused_experts(recv_x, p["w13"][mine].to(dev), p["w2"][mine].to(dev), ones, recv_ids.unsqueeze(1))
    moe = plan.ep_combine(y, handle, weights)
    expect(lambda: _close("dispatch -> fused_experts -> combine vs dense MoE", moe,
                          _golden_moe(p, rank, expert=True), *TOLERANCE[("moe", dtype_name)]))

    def check_empty() -> None:
        for what, t, shape in (("ep_dispatch recv_x", recv_x, (0, HIDDEN)), ("ep_dispatch recv_local_ids",
                               recv_ids, (0,)), ("ep_combine", out, (0, HIDDEN)), ("ep_combine after experts",
                               moe, (0, HIDDEN))):
            if tuple(t.shape) != shape or t.device.type != dev.type:
                raise AssertionError(f"{what} of an empty step: shape {list(t.shape)} on {t.device}, "
                                     f"expected {list(shape)} on {dev.type}")

    if empty:
        expect(check_empty)
    if findings:
        raise AssertionError(f"{name}: " + "; ".join(findings))


CAPACITY_SCENARIOS = ("uniform", "all_to_one_rank", "rank_without_tokens", "uneven_tokens", "no_tokens_anywhere")
CAPACITY_HIDDEN = 2048  # inside DeepEP's low-latency SWITCH_HIDDEN and MC2's Atlas A3 [1024, 8192]


def _run_capacity(plan: Any, rank: int, world: int, name: str, dtype_name: str, seed: int) -> None:
    """The fixed-capacity form: every routed assignment delivered once (any order, padding ids -1),
    combine and dispatch -> experts -> combine against the same float64 goldens."""
    global HIDDEN
    saved, HIDDEN = HIDDEN, CAPACITY_HIDDEN
    try:
        dtype = DTYPES[dtype_name]
        p = _problem(world, name, dtype, seed)
        dev = plan.device
        E = p["E"]
        per_rank = E // world
        capacity = max(1, max(x.shape[0] for x in p["x"]))
        x, ids, weights = p["x"][rank].to(dev), p["ids"][rank].to(dev), p["weights"][rank].to(dev)
        findings: list[str] = []

        def expect(check: Callable[[], None]) -> None:
            try:
                check()
            except AssertionError as exc:
                findings.append(str(exc))

        recv_x, recv_ids, handle = plan.ep_dispatch(x, ids, E, None, weights, capacity)
        want_rows, want_ids = _golden_delivery(p, rank, world)

        def check_delivery() -> None:
            if recv_ids.dtype != torch.int32 or recv_x.shape[0] != recv_ids.shape[0]:
                raise AssertionError(f"ep_dispatch(capacity): {recv_ids.dtype} ids for {recv_x.shape[0]} rows")
            ids_host = recv_ids.cpu()
            valid = ((ids_host >= 0) & (ids_host < per_rank)).nonzero().view(-1)
            if not bool(((ids_host == -1) | ((ids_host >= 0) & (ids_host < per_rank))).all()):
                raise AssertionError("ep_dispatch(capacity): local ids outside [0, E/W) other than -1")
            got = sorted(int(i) for i in ids_host[valid])
            if got != sorted(want_ids):
                raise AssertionError(f"ep_dispatch(capacity): valid local ids {got}, expected {sorted(want_ids)}")
            rows = recv_x.cpu().double().index_select(0, valid)
            used = torch.zeros(rows.shape[0], dtype=torch.bool)
            for row, e in zip(want_rows, want_ids, strict=True):
                match = ((ids_host[valid] == e) & ~used & (rows == row).all(1)).nonzero().view(-1)
                if not match.numel():
                    raise AssertionError(f"ep_dispatch(capacity): a row routed to local expert {e} was not delivered")
                used[match[0]] = True

        expect(check_delivery)
        out = plan.ep_combine(recv_x, handle, weights)
        expect(lambda: _close("ep_combine(capacity, identity experts)", out, _golden_moe(p, rank, expert=False),
                              *TOLERANCE[("combine", dtype_name)]))
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=dev)
        y = plan.fused_experts(recv_x, p["w13"][mine].to(dev), p["w2"][mine].to(dev), ones, recv_ids.unsqueeze(1))
        moe = plan.ep_combine(y, handle, weights)
        expect(lambda: _close("capacity dispatch -> fused_experts -> combine vs dense MoE", moe,
                              _golden_moe(p, rank, expert=True), *TOLERANCE[("moe", dtype_name)]))
        if findings:
            raise AssertionError(f"capacity {name}: " + "; ".join(findings))
    finally:
        HIDDEN = saved


def _native_calls() -> dict[str, int]:
    """Calls the EP adapters and the emulated vendor kernels served in this process."""
    import sys

    calls: dict[str, int] = {}
    for module, prefix in (("hwlayer.backends.cuda.deepep", "adapter:deepep."),
                           ("hwlayer.backends.ascend.mc2", "adapter:mc2."),
                           ("conformance.emulators.deep_ep", "emulator:deep_ep."),
                           ("conformance.emulators.torch_npu_mc2", "emulator:torch_npu.")):
        mod = sys.modules.get(module)
        for key, n in (getattr(mod, "CALLS", None) or {}).items():
            calls[prefix + key] = n
    return calls


def _run_bad_input(plan: Any, rank: int, world: int) -> None:
    """Every call must raise ValueError before any collective, on every rank: in the exact form with
    and without weights at dispatch and in the fixed-capacity form, in bf16 at a width the native
    paths take (so an adapter, not only the generic op, is held to it)."""
    E = 4 * world
    weights = torch.ones(3, 1, device=plan.device)
    cases = [
        ("topk_ids", [[0], [E], [1]], E, {}),  # id == E
        ("topk_ids", [[0], [-1], [1]], E, {}),  # negative id
        ("num_experts", [[0], [0], [0]], E + 1, {}),  # not divisible by world
        ("topk_ids", [[0], [E], [1]], E, {"topk_weights": weights}),
        ("topk_ids", [[0], [E], [1]], E, {"topk_weights": weights, "capacity": 4}),
        ("capacity", [[0], [1], [2]], E, {"topk_weights": weights, "capacity": 2}),  # fewer than T = 3
    ]
    for dtype, hidden in ((torch.float32, HIDDEN), (torch.bfloat16, CAPACITY_HIDDEN)):
        x = torch.zeros(3, hidden, device=plan.device, dtype=dtype)
        for arg, ids, num_experts, kwargs in cases:
            ids_t = torch.tensor(ids, dtype=torch.int32, device=plan.device)
            try:
                plan.ep_dispatch(x, ids_t, num_experts, None, kwargs.get("topk_weights"), kwargs.get("capacity"))
            except ValueError as exc:
                if arg not in str(exc):
                    raise AssertionError(f"ep_dispatch: ValueError does not name '{arg}': {exc}") from None
            else:
                raise AssertionError(f"ep_dispatch accepted bad {arg} ({dtype}, E={num_experts}, ids={ids}, "
                                     f"{sorted(kwargs)})")


def _worker(rank: int, world: int, port: int, backend: str, out_dir: str, emulated: bool = False) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    save = lambda: Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    import hwlayer
    from hwlayer.distributed import init_distributed, shutdown

    try:
        if emulated:  # the parent ran --emulated: the same CPU emulators of the vendor libraries here
            from conformance import emulators

            emulators.activate(backend)
        plan = hwlayer.plan(backend)
        init_distributed(plan, timeout_s=COLLECTIVE_TIMEOUT_S)
        checks: list[tuple[str, Callable[[], None]]] = []
        for i, name in enumerate(SCENARIOS):
            for dtype_name in DTYPES:
                checks.append((f"{name}-{dtype_name}", lambda n=name, d=dtype_name, s=i: _run_scenario(
                    plan, rank, world, n, d, 1000 * world + s)))
        for i, name in enumerate(CAPACITY_SCENARIOS):
            for dtype_name in DTYPES:
                checks.append((f"capacity-{name}-{dtype_name}", lambda n=name, d=dtype_name, s=i: _run_capacity(
                    plan, rank, world, n, d, 5000 * world + s)))
        checks.append(("bad_input", lambda: _run_bad_input(plan, rank, world)))
        broken = None
        for key, check in checks:
            if broken:  # an op raised: the ranks may be out of step, later results mean nothing
                results[key] = f"not run: an earlier check raised ({broken})"
                continue
            results[key] = "this rank died during the check"  # saved first: a crash (abort) leaves it
            save()
            try:
                check()
                results[key] = None
            except AssertionError as exc:
                results[key] = str(exc)
            except Exception as exc:
                results[key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
                broken = key
        results["native_calls"] = json.dumps(_native_calls())  # type: ignore[assignment]
        save()
        shutdown()
    except Exception as exc:
        results["setup"] = f"{type(exc).__name__}: {exc}"
    save()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, backend: str, emulated: bool = False) -> dict[str, dict[int, str | None]]:
    """Run every check on ``world`` ranks; {check: {rank: error or None}}. Bounded in time."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), backend, out_dir, emulated), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        trouble = ""
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    trouble = f"the {world} ranks did not finish within {SPAWN_TIMEOUT_S:g} s"
                    break
        except Exception as exc:  # a rank crashed (e.g. the collective library aborted the process)
            trouble = f"{type(exc).__name__}: {exc}"
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
        merged: dict[str, dict[int, str | None]] = {}
        for rank in range(world):
            path = Path(out_dir, f"rank{rank}.json")
            results = json.loads(path.read_text()) if path.exists() else {"setup": "rank wrote no results"}
            for key, err in results.items():
                if err is not None and trouble:
                    err = f"{err} [{trouble}]"
                merged.setdefault(key, {})[rank] = err
        if trouble:
            merged["trouble"] = {0: trouble}
        return merged


@pytest.fixture(scope="module")
def ep_results(backend_name: str, conformance_report: Any,
               pytestconfig: pytest.Config) -> Callable[[int], dict[str, dict[int, str | None]]]:
    """Results of one spawn per world size (all scenarios and dtypes), made on first use; also
    attached to the conformance report (``--report``) as ``expert_parallel``."""
    cache: dict[int, dict[str, dict[int, str | None]]] = {}

    def get(world: int) -> dict[str, dict[int, str | None]]:
        if world not in cache:
            cache[world] = _spawn(world, backend_name, bool(pytestconfig.getoption("--emulated")))
            conformance_report.add_extra("expert_parallel", {
                f"{w} ranks": {key: "pass" if all(e is None for e in per_rank.values()) else
                               "; ".join(f"rank {r}: {e}" for r, e in per_rank.items() if e is not None)
                               for key, per_rank in results.items() if key != "native_calls"}
                for w, results in sorted(cache.items())
            })
        return cache[world]

    return get


def _check(results: dict[str, dict[int, str | None]], world: int, key: str) -> None:
    if "setup" in results:
        pytest.fail(f"EP workers could not start: {results['setup']}")
    per_rank = results.get(key)
    trouble = (results.get("trouble") or {0: ""})[0]
    assert per_rank is not None and len(per_rank) == world, f"{key}: no result from some ranks ({per_rank}) {trouble}"
    errors = {r: e for r, e in per_rank.items() if e is not None}
    assert not errors, "\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))


# The native EP paths each emulated backend must have served (in every rank), by mode.
NATIVE_EP = {
    "cuda": ("adapter:deepep.normal_dispatch", "adapter:deepep.normal_combine", "adapter:deepep.low_latency_dispatch",
             "adapter:deepep.low_latency_combine", "emulator:deep_ep.dispatch", "emulator:deep_ep.combine",
             "emulator:deep_ep.low_latency_dispatch", "emulator:deep_ep.low_latency_combine"),
    "ascend": ("adapter:mc2.dispatch_v2", "adapter:mc2.combine_v2", "emulator:torch_npu.dispatch_v2",
               "emulator:torch_npu.combine_v2"),
}




def _emulated_skip(pytestconfig: pytest.Config, backend: str, world: int) -> None:
    """Under --emulated the suite runs where a native EP path exists, on 2 ranks: the generic path
    (every other backend's) and 4 ranks are covered by the plain run, and each spawn costs ~30 s."""
    if not pytestconfig.getoption("--emulated"):
        return
    if backend not in NATIVE_EP:
        pytest.skip(f"{backend} has no native EP path: the generic one is covered by --backend cpu")
    if world != 2:
        pytest.skip("emulated EP runs use 2 ranks; 4 ranks run in the plain (generic) suite")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ep_dispatch_combine(ep_results: Callable, world: int, scenario: str, dtype: str, backend_name: str,
                             pytestconfig: pytest.Config) -> None:
    """Delivery (exact), combine and dispatch -> experts -> combine vs the float64 dense MoE."""
    _emulated_skip(pytestconfig, backend_name, world)
    _check(ep_results(world), world, f"{scenario}-{dtype}")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ep_dispatch_bad_input(ep_results: Callable, world: int, backend_name: str,
                               pytestconfig: pytest.Config) -> None:
    """Out-of-range ids and an expert count the world does not divide: ValueError on every rank."""
    _emulated_skip(pytestconfig, backend_name, world)
    _check(ep_results(world), world, "bad_input")


@pytest.mark.parametrize("scenario", CAPACITY_SCENARIOS)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ep_dispatch_combine_capacity(ep_results: Callable, world: int, scenario: str, dtype: str, backend_name: str,
                                      pytestconfig: pytest.Config) -> None:
    """The fixed-capacity (graph-capturable) form: delivery as a multiset, combine and MoE vs float64."""
    _emulated_skip(pytestconfig, backend_name, world)
    _check(ep_results(world), world, f"capacity-{scenario}-{dtype}")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ep_native_served(ep_results: Callable, world: int, backend_name: str, pytestconfig: pytest.Config) -> None:
    """Under --emulated, the vendor dispatch/combine served the suite (traced calls in every rank):
    the cases above compared the native path with the goldens, not the generic one with itself."""
    expected = NATIVE_EP.get(backend_name, ())
    if not expected:
        pytest.skip(f"no native EP path for {backend_name}")
    _emulated_skip(pytestconfig, backend_name, world)
    library = {"cuda": "deep_ep", "ascend": "torch_npu"}[backend_name]
    if not pytestconfig.getoption("--emulated") and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (the native EP path runs with it or under --emulated)")
    results = ep_results(world)
    for rank, raw in sorted((results.get("native_calls") or {}).items()):
        calls = json.loads(raw or "{}")
        missing = [name for name in expected if not calls.get(name)]
        assert not missing, f"rank {rank}: native EP path(s) never served: {missing} (calls: {calls})"
    assert len(results.get("native_calls") or {}) == world, "some ranks reported no native call counts"
