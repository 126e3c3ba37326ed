"""Serving throughput and latency of serve.py at 1, 4 and 16 concurrent streams.

Starts a real ``serve.py`` subprocess (default model unless ``--server-args`` says otherwise) or uses
``--url``, then for each concurrency level runs that many streaming ``/v1/completions`` requests at
once (greedy, ``ignore_eos`` so every request generates exactly ``--max-tokens`` tokens) and reports:

* aggregate throughput: generated tokens of all streams / wall time of the level,
* TTFT (request sent -> first token) and ITL (gap between a stream's tokens), p50 and p99.

    .venv/bin/python bench/bench_serve.py                       # default: --concurrency 1 4 16
    .venv/bin/python bench/bench_serve.py --url http://127.0.0.1:8000 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test suite's server launcher

from server_process import ServerProcess


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - sent if stamps else float("nan"), "itl": gaps, "tokens": tokens,
            "end": stamps[-1] if stamps else sent}


def server_steps(url: str) -> tuple[float, float, float]:
    """(steps, seconds in steps, seconds in forward_batch) so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("hwlayer_engine_step_seconds_", "hwlayer_forward_seconds_")):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return (values.get("hwlayer_engine_step_seconds_count", 0.0), values.get("hwlayer_engine_step_seconds_sum", 0.0),
            values.get("hwlayer_forward_seconds_sum", 0.0))


async def level(url: str, model: str, prompt: str, concurrency: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    steps0, step_s0, forward_s0 = server_steps(url)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, model, prompt, max_tokens)
                                         for _ in range(concurrency)))
        wall = max(r["end"] for r in results) - start
    steps1, step_s1, forward_s1 = server_steps(url)
    steps = max(steps1 - steps0, 1)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    itls = [g for r in results for g in r["itl"]]
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
            "itl_p50_ms": 1e3 * percentile(itls, 50), "itl_p99_ms": 1e3 * percentile(itls, 99),
            "step_ms": 1e3 * (step_s1 - step_s0) / steps, "forward_ms": 1e3 * (forward_s1 - forward_s0) / steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start serve.py here)")
    ap.add_argument("--server-args", default="", help="extra serve.py flags when starting one")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median by throughput is reported")
    ap.add_argument("--prompt", default="Explain continuous batching in one paragraph. " * 4)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    server = None
    url = args.url
    if url is None:
        server = ServerProcess(shlex.split(args.server_args)).wait_healthy()
        url = server.url
    try:
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = info["id"]
        asyncio.run(level(url, model, args.prompt, 2, 8))  # warm-up: first-call allocations, thread pools
        rows = []
        for c in args.concurrency:  # shared machines are noisy: report each level's median run
            runs = [asyncio.run(level(url, model, args.prompt, c, args.max_tokens)) for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["tokens_per_s"])
            rows.append(runs[len(runs) // 2])
    finally:
        if server is not None:
            server.stop()

    base = rows[0]["tokens_per_s"]
    if args.json:
        print(json.dumps({"model": model, "backend": info.get("backend"), "rows": rows}, indent=2))
        return 0
    print(f"model {model} on backend {info.get('backend')}; {platform.processor() or platform.machine()}, "
          f"{args.max_tokens} tokens per stream, greedy, median of {args.repeats} runs per level")
    print(f"{'streams':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x vs 1':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'step':>7} {'forward':>8}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['tokens']:>7} {r['wall_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base:>7.2f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
              f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms {r['step_ms']:>5.1f}ms {r['forward_ms']:>6.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
