"""Engine overhead per step, in process: ``step - forward`` with N concurrent greedy streams.

What ``/metrics`` reports as ``hwlayer_engine_step_seconds - hwlayer_forward_seconds`` (scheduling,
batch building, sampling, detokenizing, stop checks, events), measured without HTTP so that the
event loop of the API does not share the numbers. The engine runs as serve.py builds it (a
``ModelRunner`` with the backend's decode graphs) on the default tiny checkpoint; ``forward`` is
timed around the runner call. Run it under two checkouts to compare engines (PYTHONPATH selects
the code; the script only uses the engine's public API):

    PYTHONPATH=. .venv/bin/python bench/bench_engine_overhead.py --streams 16
    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/bench_engine_overhead.py --streams 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import serving.engine as engine_mod
    from model import load_model
    from model.runner import ModelRunner
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer
    from serving.engine import Engine, SamplingParams

    path = ensure_default_model()
    model, tokenizer = load_model(path, backend="cpu"), load_tokenizer(path)
    runner = ModelRunner(model, max_num_seqs=args.streams, max_model_len=512)
    timed = {"forward": 0.0}

    def forward(batch, cache):
        t = time.perf_counter()
        out = runner(batch, cache)
        timed["forward"] += time.perf_counter() - t
        return out

    engine = Engine(model, tokenizer, num_blocks=256, block_size=64, max_num_seqs=args.streams,
                    max_num_batched_tokens=2048, max_model_len=512, eos_token_ids=[], forward=forward)
    prompt = tokenizer.encode("Explain continuous batching in one paragraph. " * 4, add_special_tokens=False).ids
    overheads = []
    for r in range(args.repeats + 1):  # the first run warms up (graph capture)
        for i in range(args.streams):
            engine.submit(prompt + [i + 10], SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                            ignore_eos=True), lambda e: None)
        steps, step_s = 0, 0.0
        timed["forward"] = 0.0
        while engine.has_work():
            t = time.perf_counter()
            engine.step()
            step_s += time.perf_counter() - t
            steps += 1
        if r:
            overheads.append(1e3 * (step_s - timed["forward"]) / steps)
    print(json.dumps({"engine": engine_mod.__file__, "streams": args.streams, "steps_per_run": steps,
                      "overhead_ms_per_step": overheads, "median_ms": statistics.median(overheads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
