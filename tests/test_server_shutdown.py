"""SIGTERM drains a real ``serve.py``: new requests get 503, in-flight streams end with a final chunk and
``[DONE]`` (finished, or cut with finish_reason ``abort`` at ``--shutdown-timeout``), the process exits 0."""

import json
import signal
import threading

import httpx
import pytest

pytest.importorskip("model")
pytestmark = pytest.mark.slow  # real server processes

from server_process import ServerProcess, scrape_metrics  # noqa: E402


def stream(url, max_tokens, started, out):
    """One streaming completion; appends ``(finish_reason of the last chunk, saw [DONE])`` to ``out``."""
    body = {"model": "glm5-tiny-random", "prompt": "Tell me a long story about blocks.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    finish, done, started_once = None, False, False
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if finish is None and not started_once:
                        started_once = True
                        started.release()
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    finish = choices[0].get("finish_reason") or finish
    except httpx.HTTPError as exc:
        finish = f"{type(exc).__name__}: {exc}"
    out.append((finish, done))


def run_streams(server, n, max_tokens):
    started, results = threading.Semaphore(0), []
    threads = [threading.Thread(target=stream, args=(server.url, max_tokens, started, results)) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):  # every stream has its first chunk: they are in flight
        assert started.acquire(timeout=60)
    return threads, results


def test_sigterm_lets_streams_finish_and_refuses_new_requests():
    with ServerProcess(["--shutdown-timeout", "120"]) as server:
        threads, results = run_streams(server, 4, 400)
        server.proc.send_signal(signal.SIGTERM)
        refused = httpx.post(server.url + "/v1/completions", timeout=30,
                             json={"model": "glm5-tiny-random", "prompt": "hi", "max_tokens": 2})
        health = httpx.get(server.url + "/health", timeout=30)
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == 0, server.output()[-2000:]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    assert results == [("length", True)] * 4


def test_sigterm_aborts_what_outlives_the_shutdown_timeout_with_a_final_chunk():
    with ServerProcess(["--shutdown-timeout", "1"]) as server:
        whole = []
        body = {"model": "glm5-tiny-random", "prompt": "Go on.", "max_tokens": 2000, "ignore_eos": True}
        plain = threading.Thread(target=lambda: whole.append(
            httpx.post(server.url + "/v1/completions", json=body, timeout=120)))
        plain.start()
        threads, results = run_streams(server, 4, 2000)
        for _ in range(600):  # the non-streaming request is in the batch too (5 x 2000 tokens fit the cache)
            if scrape_metrics(server.url)["hwlayer_num_requests_running"] == 5:
                break
        server.proc.send_signal(signal.SIGTERM)
        for t in [*threads, plain]:
            t.join(120)
        assert server.proc.wait(60) == 0, server.output()[-2000:]
        assert "ending 5 requests with finish_reason 'abort'" in server.output()
    assert results == [("abort", True)] * 4
    assert whole[0].status_code == 503 and "--shutdown-timeout" in whole[0].json()["error"]["message"]
