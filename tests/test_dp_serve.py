"""``serve.py --ep 2 --dp-attention``: two real processes (gloo), rank 0 serving HTTP.

Concurrent greedy requests are spread over the ranks (``/metrics`` on rank 0 reports each rank's
running sequences and KV blocks with a ``rank`` label) and answer exactly what one process
generates for each prompt; then a rank is killed mid-generation: rank 0 names it, answers 503 and
exits non-zero. The ranks are started the way torchrun starts them (the torchrun environment, no
elastic agent) so the test sees rank 0's own exit status; the torchrun launch of the DP path is
covered by tests/test_dp_model.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import server_process
from server_process import free_port, wait_healthy

pytestmark = pytest.mark.slow  # a DP+EP server as two processes

PROMPTS = ["Hello there, experts", "The quick brown fox", "Data parallel attention", "1 2 3 4 5"]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import ensure_default_model

    cache = tmp_path_factory.mktemp("dp-cache")
    return cache, ensure_default_model(cache_dir=cache)


def start_ranks(cache: Path, http_port: int, world: int = 2) -> list[subprocess.Popen]:
    args = ["--ep", str(world), "--dp-attention", "--max-model-len", "256", "--num-kv-blocks", "16",
            "--kv-block-size", "16", "--log-level", "warning"]
    return server_process.start_ranks(cache, http_port, args, world)


def stream_completion(url: str, prompt: str, max_tokens: int, first: threading.Event, out: dict) -> None:
    """Stream one greedy completion; set ``first`` on its first text chunk; ``out['text']`` at the end."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                text.append(chunk["choices"][0]["text"])
                first.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        first.set()
        out["text"] = "".join(text)


def rank_metrics(url: str) -> dict[str, dict[int, float]]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found: dict[str, dict[int, float]] = {}
    for name, rank, value in re.findall(r'^(hwlayer_rank_\w+)\{rank="(\d+)"\} (\S+)$', text, re.M):
        found.setdefault(name, {})[int(rank)] = float(value)
    total = re.search(r"^hwlayer_kv_blocks_used (\S+)$", text, re.M)
    found["total_used"] = {0: float(total.group(1))}
    return found


def test_dp2_spreads_requests_answers_like_one_process_and_a_dead_rank_gives_503(checkpoint):
    cache, path = checkpoint
    from model import load_model
    from model.tokenizer import load_tokenizer
    from serving.engine import Engine, SamplingParams

    # the reference: the single-process server's engine (same detokenizer), one request at a time
    tokenizer = load_tokenizer(path)
    engine = Engine(load_model(path, backend="cpu"), tokenizer, num_blocks=64, block_size=16, max_num_seqs=4,
                    max_num_batched_tokens=2048, max_model_len=256, eos_token_ids=[])
    expected = []
    for prompt in PROMPTS:
        events = []
        engine.submit(tokenizer.encode(prompt, add_special_tokens=False).ids,
                      SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                     skip_special_tokens=True), events.append)  # the server's default
        while not (events and events[-1].finished):
            engine.step()
        expected.append("".join(e.text for e in events))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = start_ranks(cache, port)
    try:
        wait_healthy(url, procs, 90, lambda: "\n".join(p.stdout.read() for p in procs if p.poll() is not None))
        # four concurrent streams: while all four run, each rank holds two of them
        firsts = [threading.Event() for _ in PROMPTS]
        results: list[dict] = [{} for _ in PROMPTS]
        threads = [threading.Thread(target=stream_completion, args=(url, p, MAX_TOKENS, f, r))
                   for p, f, r in zip(PROMPTS, firsts, results, strict=True)]
        for t in threads:
            t.start()
        for f in firsts:
            assert f.wait(60)
        during = rank_metrics(url)
        for t in threads:
            t.join(120)
        assert [r.get("error") for r in results] == [None] * 4, results
        assert [r["text"] for r in results] == expected  # identical to one process, request by request
        assert during["hwlayer_rank_num_requests_running"] == {0: 2.0, 1: 2.0}, during
        used = during["hwlayer_rank_kv_blocks_used"]
        assert used[0] >= 2 and used[1] >= 2 and used[0] + used[1] == during["total_used"][0], during
        assert during["hwlayer_rank_kv_blocks_total"] == {0: 16.0, 1: 16.0}, during
        after = rank_metrics(url)
        assert after["hwlayer_rank_kv_blocks_used"] == {0: 0.0, 1: 0.0}, after
        tokens = after["hwlayer_rank_attention_tokens_total"]
        assert tokens[0] > 0 and tokens[1] > 0, after
        sampled = after["hwlayer_rank_sampled_tokens_total"]  # each rank sampled its own rows: ids, not logits
        assert sampled[0] >= 2 * MAX_TOKENS and sampled[1] >= 2 * MAX_TOKENS, after

        # a follower dies mid-generation
        first, result = threading.Event(), {}
        victim = threading.Thread(target=stream_completion, args=(url, PROMPTS[0], 200, first, result))
        victim.start()
        assert first.wait(60)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        victim.join(60)
        assert result.get("error"), result  # the stream in flight ends with an error, not silently
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        failed = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert failed.status_code == 503, failed.text
        assert "rank 1 exited" in failed.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        assert procs[0].wait(30) == 1  # rank 0 stops serving and exits non-zero
        assert "rank 1 exited" in procs[0].stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
