"""OpenAI-compatible serving of GLM-5 models on any hwlayer backend.

Modules: :mod:`serving.chat` (the GLM chat template in Python), :mod:`serving.parsers` (reasoning
and tool-call parsing of generated text, streaming included), :mod:`serving.engine` (continuous
batching over a paged KV cache: the engine thread around :mod:`serving.scheduler` (what runs, KV
blocks on demand), :mod:`serving.runner` (cache, forward, sampling) and :mod:`serving.output`
(detokenizing, stops, events); :mod:`serving.request` the request types, :mod:`serving.memory` the
cache sizing, :mod:`serving.speculative` MTP speculative decoding), :mod:`serving.protocol` (the
OpenAI wire format: request schemas, error and response bodies), :mod:`serving.api` (the FastAPI app: routes and request
handling), :mod:`serving.metrics` (Prometheus metrics), :mod:`serving.server` (the command line) and
:mod:`serving.ep` (expert-parallel serving) with :mod:`serving.dp` (its data-parallel attention mode).
``serve.py`` at the repository root is the entry point.
"""
