"""Bad distributed / expert-parallel configurations: one clear line, before anything is loaded.

(Ranks that exit or hang mid-run, and bad --ep in a real job, are tested with the model in
tests/test_ep_model.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwlayer.distributed import (
    DistConfigError,
    check_dist_backend,
    check_ep_config,
    init_distributed,
    local_expert_range,
)

REPO = Path(__file__).resolve().parents[1]


def test_ep_not_dividing_the_experts() -> None:
    with pytest.raises(DistConfigError, match=r"^--ep 3 does not divide the 8 routed experts .*1, 2, 4, 8$"):
        check_ep_config(3, 8, 3)


def test_world_size_mismatch() -> None:
    with pytest.raises(DistConfigError, match=r"--ep 2 needs exactly 2 processes but the job has 4 \(WORLD_SIZE\)"):
        check_ep_config(2, 8, 4)
    with pytest.raises(DistConfigError, match=r"--ep 4 needs exactly 4 processes but the job has 1 .*nproc-per-node 4"):
        check_ep_config(4, 8, 1)
    with pytest.raises(DistConfigError, match=r"--ep must be a positive integer"):
        check_ep_config(0, 8, 1)
    with pytest.raises(DistConfigError, match=r"needs a MoE model"):
        check_ep_config(2, 0, 2)
    check_ep_config(4, 8, 4)  # fine
    check_ep_config(1, 8, 1)


def test_local_expert_range_is_the_dispatch_sharding() -> None:
    assert [list(local_expert_range(r, 4, 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_collective_backend_not_supported_by_the_backend() -> None:
    import hwlayer

    cpu = hwlayer.select_backend("cpu")
    with pytest.raises(DistConfigError, match=r"collective backend 'nccl' is not supported by hwlayer backend 'cpu' "
                                              r"\(device 'cpu'\); it runs its collectives on 'gloo'"):
        check_dist_backend(cpu, "nccl")
    assert check_dist_backend(cpu, None) == "gloo"


def test_init_outside_torchrun_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistConfigError, match=r"environment variable RANK is not set: launch .* with torchrun"):
        init_distributed("cpu", timeout_s=1)


def test_bad_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwlayer.distributed import default_timeout_s

    monkeypatch.setenv("HWLAYER_DIST_TIMEOUT", "soon")
    with pytest.raises(DistConfigError, match=r"HWLAYER_DIST_TIMEOUT='soon': expected a number of seconds > 0"):
        default_timeout_s()
    monkeypatch.setenv("HWLAYER_DIST_TIMEOUT", "7.5")
    assert default_timeout_s() == 7.5


@pytest.mark.slow
def test_bad_collective_backend_in_a_job_fails_before_the_process_group() -> None:
    """HWLAYER_DIST_BACKEND=nccl on the cpu backend: the rank stops with the one line, at once
    (MASTER_PORT 1 has no listener: reaching the rendezvous would fail differently)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HWLAYER_DIST_BACKEND": "nccl", "RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    code = (
        "import sys\n"
        "from hwlayer.distributed import DistConfigError, init_distributed\n"
        "try:\n"
        "    init_distributed('cpu')\n"
        "except DistConfigError as exc:\n"
        "    sys.exit(f'error: {exc}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: collective backend 'nccl' is not supported by hwlayer backend 'cpu' (device 'cpu'); "
        "it runs its collectives on 'gloo'"
    ]
