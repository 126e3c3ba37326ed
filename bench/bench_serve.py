"""Serving benchmarks of serve.py: throughput by concurrency, KV pressure, multi-turn prefix caching.

``--scenario throughput`` (default): throughput and latency at 1, 4 and 16 concurrent streams.

Starts a real ``serve.py`` subprocess (default model unless ``--server-args`` says otherwise) or uses
``--url``, then for each concurrency level runs that many streaming ``/v1/completions`` requests at
once (greedy, ``ignore_eos`` so every request generates exactly ``--max-tokens`` tokens) and reports:

* aggregate throughput: generated tokens of all streams / wall time of the level,
* TTFT (request sent -> first token) and ITL (gap between a stream's tokens), p50 and p99.

    .venv/bin/python bench/bench_serve.py                       # default: --concurrency 1 4 16
    .venv/bin/python bench/bench_serve.py --url http://127.0.0.1:8000 --max-tokens 128

``--scenario kv-pressure``: ``--requests`` long requests (``--prompt-items`` list items, about 18 tokens
each with the tiny tokenizer: 84 -> ~1500 tokens; ``--max-tokens`` 600, ``ignore_eos``) whose KV together
exceeds the cache, all at once, against the same requests one after another (the peer). Reports both
wall times, their ratio, preemptions and tokens the engine computed (recomputation shows there).

    .venv/bin/python bench/bench_serve.py --scenario kv-pressure --requests 12
    .venv/bin/python bench/bench_serve.py --scenario kv-pressure --requests 6 --server-args "--num-kv-blocks 100"

``--scenario multi-turn``: ``--conversations`` chats of ``--turns`` turns, each turn resending the whole
conversation (a long system prompt, every earlier question and answer) plus a new question, on a server
with prefix caching and one with ``--no-enable-prefix-caching`` (the peer): time to first token per turn
and the prefix-cache hit rate from ``/metrics``.

    .venv/bin/python bench/bench_serve.py --scenario multi-turn

``--scenario chat-no-max-tokens``: ``--requests`` streaming chat requests WITHOUT ``max_tokens`` (OpenAI
clients' default: up to the context limit) at once, on a server whose cache holds ``--contexts`` full
``--max-model-len`` contexts (default 12 requests on 3 contexts). Each client reads ``--max-tokens``
tokens and disconnects. Reports how many streamed at the same time (received a token before any
stream ended), preemptions, and the KV blocks still held a moment after the last disconnect (0: every
block came back).

    .venv/bin/python bench/bench_serve.py --scenario chat-no-max-tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
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


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def long_prompt(tag: str, items: int) -> str:
    """A distinct prompt (``tag`` first, so no two share a cached block) of about 18 tokens per item."""
    return f"{tag}: summarise this list. " + " ".join(f"item{tag}_{k} costs {k * 7 % 100} dollars;"
                                                      for k in range(items))


async def one_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    sent = time.perf_counter()
    response = await client.post(url + "/v1/completions", json=body)
    response.raise_for_status()
    return {"seconds": time.perf_counter() - sent, **response.json()["usage"]}


def kv_pressure(url: str, model: str, args: argparse.Namespace) -> dict:
    """The same kind of requests one after another (the peer), then all at once."""
    async def run(tag: str, concurrent: bool) -> dict:
        prompts = [long_prompt(f"{tag}{i}", args.prompt_items) for i in range(args.requests)]
        before = {name: metric(url, name) for name in ("hwlayer_preemptions_total", "hwlayer_prompt_tokens_total")}
        async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=args.requests + 4)) as client:
            start = time.perf_counter()
            if concurrent:
                results = await asyncio.gather(*(one_completion(client, url, model, p, args.max_tokens)
                                                 for p in prompts))
            else:
                results = [await one_completion(client, url, model, p, args.max_tokens) for p in prompts]
            wall = time.perf_counter() - start
        return {"wall_s": wall, "finished": sum(r["completion_tokens"] == args.max_tokens for r in results),
                "prompt_tokens": [r["prompt_tokens"] for r in results],
                "latency_s": sorted(r["seconds"] for r in results),
                "preemptions": metric(url, "hwlayer_preemptions_total") - before["hwlayer_preemptions_total"]}

    async def warm_up() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            await one_completion(client, url, model, "warm up", 8)

    asyncio.run(warm_up())
    sequential = asyncio.run(run("S", concurrent=False))
    concurrent = asyncio.run(run("C", concurrent=True))
    block = int(metric(url, "hwlayer_kv_blocks_total"))
    info = httpx.get(url + "/metrics", timeout=30).text
    block_size = int(info.split('kv_block_size="')[1].split('"')[0]) if 'kv_block_size="' in info else 0
    need = sum(-(-(p + args.max_tokens) // block_size) for p in concurrent["prompt_tokens"]) if block_size else 0
    return {"requests": args.requests, "max_tokens": args.max_tokens, "kv_blocks": block, "kv_block_size": block_size,
            "kv_blocks_needed_all": need, "sequential": sequential, "concurrent": concurrent,
            "ratio": concurrent["wall_s"] / sequential["wall_s"]}


async def chat_turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> tuple:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "chat_template_kwargs": {"enable_thinking": False}}
    sent, ttft, text = time.perf_counter(), None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = choice["delta"].get("content") or choice["delta"].get("reasoning_content") or ""
                if piece:
                    ttft = ttft or time.perf_counter() - sent
                    text.append(piece)
    return ttft, "".join(text)


def multi_turn(args: argparse.Namespace, extra: list[str]) -> dict:
    """TTFT per turn and prefix-cache hit rate, with prefix caching and without (the peer)."""
    system = "You are an agent working in a large code base. " + long_prompt("system", args.prompt_items)
    out = {}
    for label, flags in (("caching", []), ("no caching", ["--no-enable-prefix-caching"])):
        with ServerProcess([*extra, *flags]) as server:
            url = server.url
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

            async def run() -> list[list[float]]:
                ttfts = [[] for _ in range(args.turns)]
                async with httpx.AsyncClient(timeout=600) as client:
                    await chat_turn(client, url, model, [{"role": "user", "content": "warm up"}], 4)
                    for c in range(args.conversations):
                        messages = [{"role": "system", "content": system}]
                        for turn in range(args.turns):
                            messages.append({"role": "user", "content": f"Conversation {c}, step {turn}: what next?"})
                            ttft, answer = await chat_turn(client, url, model, messages, args.max_tokens)
                            ttfts[turn].append(ttft)
                            messages.append({"role": "assistant", "content": answer})
                return ttfts

            ttfts = asyncio.run(run())
            out[label] = {"ttft_ms_per_turn": [1e3 * statistics.median(t) for t in ttfts],
                          "hit_rate": metric(url, "hwlayer_prefix_cache_hit_rate"),
                          "prompt_tokens": metric(url, "hwlayer_prompt_tokens_total"),
                          "hits": metric(url, "hwlayer_prefix_cache_hits_total")}
    return out


def chat_no_max_tokens(args: argparse.Namespace, extra: list[str]) -> dict:
    """``args.requests`` chat streams without max_tokens, on a cache of ``args.contexts`` contexts."""
    max_len = 256
    flags = [*extra, "--max-model-len", str(max_len), "--kv-block-size", "16",
             "--num-kv-blocks", str(args.contexts * max_len // 16), "--max-num-seqs", str(max(16, args.requests))]
    with ServerProcess(flags) as server:
        url = server.url
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        first: list[float] = []
        ends: list[float] = []

        async def one(i: int) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}],
                    "stream": True, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
            got = 0
            async with httpx.AsyncClient(timeout=600) as client:
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for choice in json.loads(line[6:]).get("choices", []):
                            delta = choice["delta"]
                            if delta.get("content") or delta.get("reasoning_content"):
                                got += 1
                                if got == 1:
                                    first.append(time.perf_counter())
                        if got >= args.max_tokens:
                            break  # the client goes away mid-stream
            ends.append(time.perf_counter())
            return got

        async def run() -> list[int]:
            return await asyncio.gather(*(one(i) for i in range(args.requests)))

        start = time.perf_counter()
        got = asyncio.run(run())
        wall = time.perf_counter() - start
        time.sleep(1.0)  # the engine frees an aborted request's blocks at its next step
        return {"requests": args.requests, "contexts": args.contexts, "max_model_len": max_len,
                "tokens_read": got, "wall_s": wall,
                "streaming_at_once": sum(1 for t in first if t < min(ends)),
                "preemptions": metric(url, "hwlayer_preemptions_total"),
                "kv_blocks_total": metric(url, "hwlayer_kv_blocks_total"),
                "kv_blocks_used_after": metric(url, "hwlayer_kv_blocks_used"),
                "running_after": metric(url, "hwlayer_num_requests_running")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="throughput",
                    choices=["throughput", "kv-pressure", "multi-turn", "chat-no-max-tokens"])
    ap.add_argument("--contexts", type=int, default=3, help="chat-no-max-tokens: cache size in full contexts")
    ap.add_argument("--url", help="an already running server (default: start serve.py here; not for multi-turn)")
    ap.add_argument("--server-args", default="", help="extra serve.py flags when starting one")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, help="tokens per request (default 128; kv-pressure 600; multi-turn 32)")
    ap.add_argument("--requests", type=int, default=12, help="kv-pressure: requests (default 12)")
    ap.add_argument("--prompt-items", type=int, default=84,
                    help="kv-pressure / multi-turn: list items in each long prompt (84: ~1500 tiny-tokenizer tokens)")
    ap.add_argument("--conversations", type=int, default=3, help="multi-turn: conversations (default 3)")
    ap.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median by throughput is reported")
    ap.add_argument("--prompt", default="Explain continuous batching in one paragraph. " * 4)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.max_tokens is None:
        args.max_tokens = {"throughput": 128, "kv-pressure": 600, "multi-turn": 32,
                           "chat-no-max-tokens": 100}[args.scenario]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.scenario == "chat-no-max-tokens":
        result = chat_no_max_tokens(args, shlex.split(args.server_args))
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"chat-no-max-tokens: {args.requests} streaming chats without max_tokens, cache of {args.contexts} "
              f"contexts x {result['max_model_len']} tokens ({result['kv_blocks_total']:.0f} blocks); each client "
              f"reads {args.max_tokens} tokens, then disconnects; {machine}")
        print(f"streaming at once: {result['streaming_at_once']}/{args.requests}; tokens read "
              f"{min(result['tokens_read'])}-{max(result['tokens_read'])}; preemptions {result['preemptions']:.0f}; "
              f"wall {result['wall_s']:.1f} s; after the disconnects: {result['kv_blocks_used_after']:.0f} KV blocks "
              f"held, {result['running_after']:.0f} running")
        return 0
    if args.scenario == "multi-turn":
        result = multi_turn(args, shlex.split(args.server_args))
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"multi-turn: {args.conversations} conversations x {args.turns} turns, system prompt of "
              f"{args.prompt_items} items, {args.max_tokens} tokens per answer; {machine}")
        print(f"{'server':>12} {'hit rate':>9} " + " ".join(f"{'TTFT t' + str(t + 1):>10}" for t in range(args.turns)))
        for label, r in result.items():
            print(f"{label:>12} {r['hit_rate']:>9.2f} " + " ".join(f"{v:>8.0f}ms" for v in r["ttft_ms_per_turn"]))
        return 0

    server = None
    url = args.url
    if url is None:
        server = ServerProcess(shlex.split(args.server_args)).wait_healthy()
        url = server.url
    try:
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = info["id"]
        if args.scenario == "kv-pressure":
            result = kv_pressure(url, model, args)
            if args.json:
                print(json.dumps(result, indent=2))
                return 0
            seq, con = result["sequential"], result["concurrent"]
            print(f"kv-pressure: {args.requests} requests, prompts {min(con['prompt_tokens'])}-"
                  f"{max(con['prompt_tokens'])} tokens + {args.max_tokens} (ignore_eos); they need "
                  f"{result['kv_blocks_needed_all']} KV blocks together, the cache has {result['kv_blocks']} x "
                  f"{result['kv_block_size']}; {machine}")
            for label, r in (("sequential", seq), ("concurrent", con)):
                print(f"{label:>11}: {r['wall_s']:7.1f} s, {r['finished']}/{args.requests} finished, "
                      f"{r['preemptions']:.0f} preemptions, latency min/median/max {r['latency_s'][0]:.1f} / "
                      f"{statistics.median(r['latency_s']):.1f} / {r['latency_s'][-1]:.1f} s")
            print(f"concurrent / sequential wall time: {result['ratio']:.2f}")
            return 0
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
