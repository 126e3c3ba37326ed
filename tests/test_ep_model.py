"""The GLM-5 model with expert parallelism: real torchrun jobs on gloo, against one process.

Each job runs this file as its worker script: every rank joins with ``init_distributed``, loads the
tiny checkpoint with ``load_model(..., ep=N)`` (only its experts), then scores and greedily
generates the same prompts. The test compares every rank's logits (fp32) and generations with a
single-process ``load_model`` of the same checkpoint, and checks each rank's expert tensors are
exactly its slice of the full model. The fault tests make one rank exit or hang inside its n-th
``ep_dispatch`` (mid-generation) and check the survivors stop, name that rank, and leave nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun workers

REPO = Path(__file__).resolve().parents[1]
JOB_LIMIT_S = 90  # hard bound on one torchrun job
FAULT_TIMEOUT_S = 2  # HWLAYER_DIST_TIMEOUT of the fault jobs
NEW_TOKENS = 6
# Spread each token over 3 of the 8 experts without group limits, so every step crosses ranks.
ROUTING = {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ep-ckpt"), config_overrides=ROUTING)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict:
    """Single-process logits, generations and the full expert weights of the first MoE layer."""
    from model import load_model
    from model.generate import generate, score

    m = load_model(checkpoint, backend="cpu")
    prompts = _prompts(m.config.vocab_size)
    moe = _moe_layers(m)
    return {
        "logits": [t.clone() for t in score(m, prompts)],
        "generated": [t.tolist() for t in generate(m, prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False)],
        "w13": moe[0].w13.clone(),
        "experts": m.config.n_routed_experts,
    }


def _moe_layers(m) -> list:
    return [layer.mlp for layer in m.layers if hasattr(layer.mlp, "w13")]


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def _job(nproc: int, checkpoint: Path, out_dir: Path, fault: str = "none", fail_rank: int = -1, fail_call: int = -1,
         timeout_s: float = 60, monitor_s: float = 0.2) -> tuple[int, str, float, dict[int, int]]:
    """Run the worker under torchrun: (exit code, output, seconds, {rank: pid}). Workers still
    alive after torchrun returned are killed and reported in the output as "left behind".
    ``monitor_s``: how often torchrun polls its workers; once one has failed it stops the rest."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--monitor-interval={monitor_s}", __file__, str(checkpoint), str(out_dir), fault, str(fail_rank),
           str(fail_call)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HWLAYER_DIST_TIMEOUT": str(timeout_s), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[test] torchrun job killed after {JOB_LIMIT_S} s"
    elapsed = time.monotonic() - start
    pids = {int(r): int(p) for r, p in re.findall(r"rank (\d+) worker pid (\d+)", out)}
    time.sleep(0.5)  # torchrun has returned: give the kernel a moment to finish reaping
    for pid in _pids_alive(list(pids.values())):  # never leave a worker behind, even on failure
        os.kill(pid, signal.SIGKILL)
        out += f"\n[test] worker pid {pid} left behind after torchrun returned"
    return proc.returncode, out, elapsed, pids


@pytest.mark.parametrize("ep", [2, 4])
def test_ep_matches_single_process(ep: int, checkpoint: Path, reference: dict, tmp_path: Path) -> None:
    code, out, _, pids = _job(ep, checkpoint, tmp_path)
    assert code == 0, out
    assert sorted(pids) == list(range(ep)), out
    per_rank = reference["experts"] // ep
    for rank in range(ep):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # only this rank's experts were loaded, and they are exactly its slice of the checkpoint
        assert result["local_experts"] == [per_rank] * len(result["local_experts"]) and result["local_experts"]
        assert torch.equal(result["w13"], reference["w13"][rank * per_rank:(rank + 1) * per_rank])
        for got, want in zip(result["logits"], reference["logits"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert result["generated"] == reference["generated"]


def test_rank_that_exits_mid_generation_is_named(checkpoint: Path, tmp_path: Path) -> None:
    # Rank 1 of 4 exits inside its 5th ep_dispatch: a decode step, all ranks mid-collective. torchrun
    # stops the other workers as soon as it sees one exit; polling every 10 s gives the survivors
    # (which notice at once, then probe for up to FAULT_TIMEOUT_S) time to say who died before that,
    # even on a loaded 2-core machine (2 s polling lost a survivor's line there once).
    code, out, elapsed, pids = _job(4, checkpoint, tmp_path, "exit", 1, 5, timeout_s=FAULT_TIMEOUT_S, monitor_s=10)
    assert code != 0, out
    assert sorted(pids) == [0, 1, 2, 3], out
    named = re.findall(r"rank (\d): EP generation failed: rank 1 exited", out)
    assert set(named) == {"0", "2", "3"}, out
    assert not re.search(r"rank [023] (exited|hung)", out), out
    assert elapsed < JOB_LIMIT_S
    assert "left behind" not in out, out


def test_rank_that_hangs_mid_generation_is_named(checkpoint: Path, tmp_path: Path) -> None:
    code, out, elapsed, pids = _job(2, checkpoint, tmp_path, "hang", 1, 5, timeout_s=FAULT_TIMEOUT_S)
    assert code != 0, out
    assert re.search(rf"rank 0: EP generation failed: rank 1 hung \(pid {pids[1]} alive", out), out
    assert elapsed < JOB_LIMIT_S
    assert "left behind" not in out, out


def test_bad_ep_config_fails_before_loading_weights(checkpoint: Path, tmp_path: Path) -> None:
    """--ep 3 for 8 experts, and --ep 4 in a 2-process job: one line, before any weight is read
    (run as the rank-0 process of such a job, with the torchrun variables set by hand)."""
    for fault, world, message in [
        ("config-ep", 3, "--ep 3 does not divide the 8 routed experts (n_routed_experts); choose one of 1, 2, 4, 8"),
        ("config-world", 2, "--ep 4 needs exactly 4 processes but the job has 2 (WORLD_SIZE); launch with torchrun "
                            "--nproc-per-node 4 ..."),
    ]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # nothing listens there: never reached
        proc = subprocess.run([sys.executable, __file__, str(checkpoint), str(tmp_path), fault, "-1", "-1"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_LIMIT_S)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [f"worker: error: {message}"]
        assert "loading weights" not in proc.stdout


# --------------------------------------------------------------------------------------------
# The worker (run by torchrun)


def _inject_fault(plan, rank: int, fault: str, fail_rank: int, fail_call: int) -> None:
    """Make ``fail_rank`` exit or hang inside its ``fail_call``-th ep_dispatch (this process's plan only)."""
    if rank != fail_rank or fault not in ("exit", "hang"):
        return
    real = plan.ep_dispatch
    calls = {"n": 0}

    def ep_dispatch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_call:
            if fault == "exit":
                os._exit(3)
            time.sleep(3600)
        return real(*args, **kwargs)

    plan.ep_dispatch = ep_dispatch


def _worker(checkpoint: str, out_dir: str, fault: str, fail_rank: int, fail_call: int) -> int:
    import hwlayer
    from hwlayer.distributed import DistConfigError, RankFailure, check_ep_config, init_distributed, rank_failure_guard
    from model import ModelConfig, load_model
    from model.generate import generate, score

    world = int(os.environ["WORLD_SIZE"])
    ep = {"config-ep": 3, "config-world": 4}.get(fault, world)
    try:
        check_ep_config(ep, ModelConfig.from_json(Path(checkpoint)).n_routed_experts, world)
        ctx = init_distributed("cpu")
    except DistConfigError as exc:
        print(f"worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"rank {ctx.rank} worker pid {os.getpid()}", flush=True)
    print(f"rank {ctx.rank} loading weights", flush=True)
    m = load_model(checkpoint, backend="cpu", ep=ep)
    _inject_fault(hwlayer.plan("cpu"), ctx.rank, fault, fail_rank, fail_call)
    prompts = _prompts(m.config.vocab_size)
    try:
        with rank_failure_guard("EP generation"):
            generated = generate(m, prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            logits = score(m, prompts)
    except RankFailure as exc:
        print(f"worker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    moe = _moe_layers(m)
    torch.save({"logits": logits, "generated": [t.tolist() for t in generated],
                "local_experts": [layer.w13.shape[0] for layer in moe], "w13": moe[0].w13},
               Path(out_dir) / f"rank{ctx.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
