"""End to end: ``torchrun --nproc-per-node 2 serve.py --ep 2`` answers a greedy chat completion
exactly as the single-process server does (default glm5-tiny-random model, real HTTP, the
openai client)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from server_process import REPO, ServerProcess

pytestmark = pytest.mark.slow  # an EP server under torchrun

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
START_LIMIT_S = 120
STOP_LIMIT_S = 30


def _chat(url: str) -> dict:
    """The greedy reply: the whole assistant message (the tiny model's noise usually lands in
    reasoning_content), finish reason and token count."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60)
    reply = client.chat.completions.create(model="glm5-tiny-random", messages=MESSAGES, temperature=0, max_tokens=12)
    choice = reply.choices[0]
    return {"message": choice.message.model_dump(), "finish_reason": choice.finish_reason,
            "completion_tokens": reply.usage.completion_tokens}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_ep2_server_answers_like_the_single_process_server() -> None:
    with ServerProcess() as single:
        want = _chat(single.url)

    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HWLAYER_DIST_TIMEOUT": "60"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    server = ServerProcess(["--ep", "2"], env=env, launcher=torchrun, new_session=True)
    job = server.proc
    workers: list[int] = []
    left_behind: list[int] = []
    try:
        server.wait_healthy(START_LIMIT_S)
        workers = _children(job.pid)
        assert len(workers) == 2, f"expected torchrun to run 2 ranks, found processes {workers}"
        got = _chat(server.url)
        text = (want["message"].get("content") or "") + (want["message"].get("reasoning_content") or "")
        assert want["completion_tokens"] == 12 and text, f"the single-process server answered nothing: {want!r}"
        assert got == want, f"EP=2 answered {got!r}, single process {want!r}"
        # the whole job stops on SIGTERM (torchrun forwards it to both ranks)
        job.send_signal(signal.SIGTERM)
        job.wait(STOP_LIMIT_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        time.sleep(0.5)  # let the kernel finish reaping
        left_behind = [p for p in workers if _alive(p)]
        for pid in left_behind:  # never leave a rank behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        os.unlink(server.log.name)
    assert not left_behind, f"ranks {left_behind} outlived the job"
