"""serve.py's command line: bad flags and an unavailable backend fail in one line, exit 2, fast."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts serve.py

REPO = Path(__file__).resolve().parent.parent


def run_serve(args, tmp_path, **env):
    full_env = {**os.environ, "HWLAYER_CACHE": str(tmp_path / "cache"), **env}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_unavailable_backend_exits_2_with_one_line_before_loading_weights(tmp_path):
    pytest.importorskip("hwlayer.backends")
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed here")
    except ImportError:
        pass
    result = run_serve([], tmp_path, GLM_BACKEND="ascend")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ascend" in lines[0] and "unavailable" in lines[0], result.stderr
    assert not (tmp_path / "cache").exists()  # nothing was written: no checkpoint was created or read


@pytest.mark.parametrize("args, words", [
    (["--port", "abc"], "--port"),
    (["--port", "70000"], "--port 70000"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0"),
    (["--num-kv-blocks", "-3"], "--num-kv-blocks -3"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--model", "/nonexistent/dir"], "config.json"),
    (["--api-key", " "], "--api-key"),
    (["--ep", "2"], "--ep 2 needs exactly 2 processes"),  # not under torchrun: checked before any weight loads
    (["--kv-cache-memory-bytes", "12X"], "--kv-cache-memory-bytes '12X' is not a size"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5"),
    (["--speculative-config", "{mtp"], "--speculative-config"),
    (["--speculative-config", '{"method": "eagle3", "num_speculative_tokens": 1}'],
     "'eagle3' is not supported"),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 0}'], "num_speculative_tokens"),
    (["--ep", "2", "--dp-attention", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'],
     "--speculative-config with --dp-attention is not supported yet"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, words):
    result = run_serve(args, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_unknown_backend_name(tmp_path):
    result = run_serve([], tmp_path, GLM_BACKEND="nosuchchip")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nosuchchip" in result.stderr
