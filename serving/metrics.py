"""Prometheus metrics of one server, in their own registry (so two apps in a process never clash)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """Counters the engine and the API update; gauges read live from the engine at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hwlayer_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hwlayer_prompt_tokens", "Prompt tokens admitted to the batch", registry=r)
        self.generation_tokens = Counter("hwlayer_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("hwlayer_request_finished", "Requests finished, by reason", ["reason"], registry=r)
        self.preemptions = Counter("hwlayer_preemptions", "Sequences preempted for lack of KV blocks", registry=r)
        self.prefix_cache_queries = Counter("hwlayer_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Counter("hwlayer_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         registry=r)
        self.prefix_cache_hit_rate = Gauge("hwlayer_prefix_cache_hit_rate",
                                           "Prefix-cache hits / queries (prompt tokens) since start", registry=r)
        self.ttft = Histogram("hwlayer_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hwlayer_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("hwlayer_engine_step_seconds", "One engine step: schedule, forward, sample",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("hwlayer_forward_seconds", "forward_batch of one step",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.info = Info("hwlayer_server", "Backend, device and model of this server", registry=r)
        self.waiting = Gauge("hwlayer_num_requests_waiting", "Requests queued for the batch", registry=r)
        self.running = Gauge("hwlayer_num_requests_running", "Sequences in the running batch", registry=r)
        self.kv_used = Gauge("hwlayer_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.kv_free = Gauge("hwlayer_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_total = Gauge("hwlayer_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.kv_cache_tokens = Gauge("hwlayer_kv_cache_tokens", "Tokens the KV cache holds (all ranks)", registry=r)
        self.kv_cache_max_concurrency = Gauge("hwlayer_kv_cache_max_concurrency",
                                              "Full --max-model-len contexts the KV cache holds at once", registry=r)
        self.spec_num_drafts = Counter("hwlayer_spec_decode_num_drafts", "Verify steps that carried drafts",
                                       registry=r)
        self.spec_num_draft_tokens = Counter("hwlayer_spec_decode_num_draft_tokens", "Draft tokens proposed",
                                             registry=r)
        self.spec_num_accepted_tokens = Counter("hwlayer_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                                registry=r)
        self.spec_accepted_per_pos = Counter("hwlayer_spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft", ["position"],
                                             registry=r)
        self.kv_cached = Gauge("hwlayer_kv_blocks_cached", "KV cache blocks registered in the prefix cache "
                               "(held or free)", registry=r)

    def bind(self, engine: Any, backend: str, device: str, model_name: str, block_size: int) -> None:
        """Read the engine's queue, batch and cache state whenever /metrics is scraped."""
        self.waiting.set_function(lambda: engine.num_waiting)
        self.running.set_function(lambda: engine.num_running)
        self.kv_used.set_function(lambda: engine.allocator.num_used)
        self.kv_free.set_function(lambda: engine.allocator.num_free)
        self.kv_total.set_function(lambda: engine.allocator.num_blocks)
        self.kv_cached.set_function(lambda: engine.allocator.num_cached)
        self.prefix_cache_hit_rate.set_function(lambda: engine.allocator.hit_rate)
        self.info.info({"backend": backend, "device": device, "model": model_name, "kv_block_size": str(block_size)})

    def bind_capacity(self, tokens: int, max_concurrency: float) -> None:
        """What the KV cache holds: tokens, and full --max-model-len contexts at once (vLLM's start-up line)."""
        self.kv_cache_tokens.set(tokens)
        self.kv_cache_max_concurrency.set(max_concurrency)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
