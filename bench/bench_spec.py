"""MTP speculative decoding: batch-1 decode tokens/s with and without speculation, in the engine.

Runs the serving engine in this process exactly as serve.py builds it (a :class:`model.runner.ModelRunner`
with the backend's decode graphs, unless ``--enforce-eager``) on the bigram checkpoint of
:func:`model.tiny.make_bigram_checkpoint` (attention and MLP outputs zeroed, so the MTP layer computes
the model's own bigram chain and its drafts agree; ``--mtp-noise`` perturbs the MTP layer for lower
agreement). One greedy request at a time (``ignore_eos``, ``--max-tokens`` new tokens); decode
tokens/s counts the tokens after the first (the prefill is the same either way), per wall second
and per CPU second of this (single-threaded) process: on a shared machine the CPU-time rate is the
steadier of the two, since waiting for a core does not count. The peer is the
same engine without speculation in the same run; greedy outputs must be identical.

    .venv/bin/python bench/bench_spec.py                          # N = 1, 2, 3 vs no speculation
    .venv/bin/python bench/bench_spec.py --mtp-noise 0.5 --num-speculative-tokens 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(model, tokenizer, prompt: list[int], max_tokens: int, num_spec: int, graphs, repeats: int) -> dict:
    from model.runner import ModelRunner
    from serving.engine import Engine, SamplingParams

    max_len = len(prompt) + max_tokens + 8
    runner = ModelRunner(model, max_num_seqs=1, max_model_len=max_len, graphs=graphs,
                         num_speculative_tokens=num_spec)
    engine = Engine(model, tokenizer, num_blocks=-(-max_len // 16) + 2, block_size=16, max_num_seqs=1,
                    max_num_batched_tokens=512, max_model_len=max_len, eos_token_ids=[], forward=runner,
                    num_speculative_tokens=num_spec)
    rates, cpu_rates, output = [], [], None
    for _ in range(repeats + 1):  # the first run warms up (graph capture, allocator)
        stamps: list[float] = []
        cpu: list[float] = []

        def on_event(event, stamps=stamps, cpu=cpu) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        seq = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            on_event)
        drafts0, accepted0, steps0 = engine.num_draft_tokens, engine.num_accepted_tokens, engine.steps
        while engine.has_work():
            engine.step()
        rates.append((len(seq.output_ids) - 1) / (stamps[-1] - stamps[0]))
        cpu_rates.append((len(seq.output_ids) - 1) / (cpu[-1] - cpu[0]))
        output = seq.output_ids
    drafts, accepted = engine.num_draft_tokens - drafts0, engine.num_accepted_tokens - accepted0
    return {"num_speculative_tokens": num_spec, "decode_tokens_per_s": statistics.median(rates[1:]),
            "decode_tokens_per_cpu_s": statistics.median(cpu_rates[1:]),
            "runs_tokens_per_s": rates[1:], "steps_per_request": engine.steps - steps0,
            "acceptance": accepted / drafts if drafts else None, "graph_replays": runner.replays,
            "eager_steps": runner.eager_steps, "output": output}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mtp-noise", type=float, default=0.0)
    ap.add_argument("--layers", type=int, default=3,
                    help="decoder layers of the bigram checkpoint (default 3, the tiny model's; GLM-5 has 78, so "
                         "its one MTP layer costs a far smaller share of a step than on 3)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from model import load_model
    from model.tiny import make_bigram_checkpoint
    from model.tokenizer import load_tokenizer

    path = make_bigram_checkpoint(tempfile.mkdtemp(prefix="bigram-"), mtp_noise=args.mtp_noise,
                                  config_overrides={"num_hidden_layers": args.layers})
    model, tokenizer = load_model(path, backend=os.environ.get("GLM_BACKEND", "cpu")), load_tokenizer(path)
    prompt = [(7 * i + 3) % 400 + 10 for i in range(args.prompt_len)]
    graphs = None if args.enforce_eager else "auto"
    base = run(model, tokenizer, prompt, args.max_tokens, 0, graphs, args.repeats)
    rows = [base]
    for n in args.num_speculative_tokens:
        r = run(model, tokenizer, prompt, args.max_tokens, n, graphs, args.repeats)
        r["identical"] = r["output"] == base["output"]
        r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["cpu_speedup"] = r["decode_tokens_per_cpu_s"] / base["decode_tokens_per_cpu_s"]
        rows.append(r)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "backend": model.plan.backend.name}
    if args.json:
        print(json.dumps({"machine": machine, "results": [{k: v for k, v in r.items() if k != "output"}
                                                          for r in rows]}, indent=2))
        return 0
    print(f"machine: {machine}")
    print(f"batch 1, {args.layers} layers, {args.prompt_len}-token prompt, {args.max_tokens} new tokens, greedy, "
          f"{'eager' if args.enforce_eager else 'decode graphs'}, mtp_noise {args.mtp_noise}")
    print(f"{'N':>3} {'decode tok/s':>13} {'speed-up':>9} {'tok/CPU-s':>10} {'speed-up':>9} {'accept':>7} "
          f"{'steps':>6} {'identical':>9}")
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        print(f"{r['num_speculative_tokens']:>3} {r['decode_tokens_per_s']:>13.1f} {r.get('speedup', 1.0):>8.2f}x "
              f"{r['decode_tokens_per_cpu_s']:>10.1f} {r.get('cpu_speedup', 1.0):>8.2f}x "
              f"{acc:>7} {r['steps_per_request']:>6} {str(r.get('identical', '-')):>9}")
    return 0 if all(r.get("identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
