"""Expert-parallel serving: two real processes (torch.distributed, gloo on CPU), rank 0 serving HTTP.

(The torchrun launch itself, greedy equality with one process and SIGTERM shutdown are covered by
tests/test_ep_serve.py; this file covers what happens when a rank dies.)

The ranks are started the way torchrun starts them (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT in the environment), without the elastic agent, so the test sees each rank's own exit
status: with torchrun the agent tears the job down when a rank dies, which can beat rank 0's answer.
"""

import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import server_process
from server_process import free_port, wait_healthy

pytestmark = pytest.mark.slow  # an EP server under torchrun


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import ensure_default_model

    cache = tmp_path_factory.mktemp("ep-cache")
    return cache, ensure_default_model(cache_dir=cache)


def start_ranks(cache: Path, http_port: int, world: int = 2) -> list[subprocess.Popen]:
    args = ["--ep", str(world), "--max-model-len", "256", "--log-level", "warning"]
    return server_process.start_ranks(cache, http_port, args, world)


def test_ep2_serves_greedy_tokens_and_a_dead_rank_gives_503_and_exit_1(checkpoint):
    cache, path = checkpoint
    from model import load_model
    from model.generate import generate
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    prompt = "Hello there, experts"
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    reference = generate(load_model(path, backend="cpu"), [ids], max_new_tokens=8)[0][len(ids):]
    expected = tokenizer.decode([int(t) for t in reference], skip_special_tokens=False)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = start_ranks(cache, port)
    try:
        wait_healthy(url, procs, 90, lambda: "\n".join(p.stdout.read() for p in procs if p.poll() is not None))
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert first["choices"][0]["text"] == expected  # the sharded experts compute what one process does
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert again["choices"][0]["text"] == expected

        procs[1].send_signal(signal.SIGKILL)  # a follower dies
        procs[1].wait(10)
        failed = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert failed.status_code == 503, failed.text
        assert "rank 1 exited" in failed.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503
        assert procs[0].wait(30) == 1  # rank 0 stops serving and exits non-zero
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

