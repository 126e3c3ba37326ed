"""serve.py with decode graphs (the default; on the CPU backend its traced steps) and serve.py
--enforce-eager give the same greedy completions, over real HTTP, for concurrent requests whose
decode batches shrink as they finish (padded graph sizes, several context buckets' worth of steps)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow  # real server processes

REQUESTS = [("The quick brown fox", 24), ("A list of numbers: 1, 2, 3,", 40), ("hello", 8),
            ("Once upon a time in a land far away there lived", 56), ("x y z", 16)]


def completions(url: str) -> list[tuple[str, str, int]]:
    def one(req: tuple[str, int]) -> tuple[str, str, int]:
        prompt, n = req
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": n,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text[:300]
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"], r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # at once: they decode in shared, shrinking batches
        return list(pool.map(one, REQUESTS))


def test_default_and_enforce_eager_give_the_same_greedy_outputs(tmp_path):
    from model.tiny import ensure_default_model

    path = ensure_default_model(cache_dir=tmp_path)
    env = {"HWLAYER_CACHE": str(tmp_path), "GLM_BACKEND": "cpu", "OMP_NUM_THREADS": "1"}
    args = [str(path), "--served-model-name", "m", "--max-num-seqs", "8", "--max-model-len", "256"]
    with ServerProcess(args, env=env) as graphs, ServerProcess([*args, "--enforce-eager"], env=env) as eager:
        assert "decode graphs on (hwlayer.backends.cpu.graph.TracedStepGraph, batch sizes 1..8)" in graphs.output()
        assert "decode graphs off (--enforce-eager)" in eager.output()
        with_graphs, without = completions(graphs.url), completions(eager.url)
    assert with_graphs == without
    assert [n for _, _, n in with_graphs] == [n for _, n in REQUESTS]
    assert all(reason == "length" and text for text, reason, _ in with_graphs)
