"""Dispatch overhead per op call: ``plan.op(...)`` vs calling the implementation directly vs an
implementation guarded by a ``supports()`` predicate (and the traced plan, for reference).

The op under test returns its input (a no-op-ish ``silu_and_mul`` of a bench-only backend) so the
per-call cost is all call overhead; a real tiny op (generic ``rms_norm`` on a [1, 8] tensor) gives
the scale. Goal: <= 1 microsecond added per call by dispatch.

    .venv/bin/python bench/bench_dispatch.py [--number 200000] [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import timeit
import types

import torch

from hwlayer import Backend, hookimpl, ops
from hwlayer.dispatch import DispatchPlan
from hwlayer.registry import load_registry


def passthrough(x: torch.Tensor) -> torch.Tensor:
    """Returns its input: the cheapest function with the op's signature."""
    return x


def always_supported(x: torch.Tensor) -> bool:
    return True


def bench_plugin(name: str, backend: str, supports) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def hwlayer_register_backends(register):
        register(Backend(name=backend, vendor="bench", device_type="cpu", dist_backend="gloo", priority=-1000))

    @hookimpl
    def hwlayer_register_ops(register):
        register("silu_and_mul", passthrough, backend=backend, supports=supports)

    mod.hwlayer_register_backends, mod.hwlayer_register_ops = hwlayer_register_backends, hwlayer_register_ops
    return mod


def ns_per_call(stmt, number: int, repeat: int) -> float:
    """Median over ``repeat`` runs of ``number`` calls, in nanoseconds per call."""
    runs = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=7, help="timing runs (the median is reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    reg = load_registry(extra_plugins=(bench_plugin("bench_plain", "benchplain", None),
                                       bench_plugin("bench_guarded", "benchguarded", always_supported)))
    plain = DispatchPlan(reg.backends["benchplain"], reg)
    guarded = DispatchPlan(reg.backends["benchguarded"], reg)
    traced = DispatchPlan(reg.backends["benchplain"], reg, trace=True)
    cpu = DispatchPlan(reg.backends["cpu"], reg)
    # hook specs 2.0: the plan binds the op's contract check in front of the function, nothing else
    assert plain.silu_and_mul.__wrapped__ is passthrough

    x = torch.zeros(1, 8)
    w = torch.ones(8)
    n, r = args.number, args.repeat
    rows = {
        "direct call passthrough(x)": ns_per_call(lambda: passthrough(x), n, r),
        "plan.silu_and_mul(x) (no supports)": ns_per_call(lambda: plain.silu_and_mul(x), n, r),
        "plan.silu_and_mul(x) (supports() guard)": ns_per_call(lambda: guarded.silu_and_mul(x), n, r),
        "plan.silu_and_mul(x) (HWLAYER_TRACE)": ns_per_call(lambda: traced.silu_and_mul(x), n, r),
        "direct ops.rms_norm(x[1,8])": ns_per_call(lambda: ops.rms_norm(x, w, 1e-6), n // 20, r),
        "plan.rms_norm(x[1,8]) (cpu plan)": ns_per_call(lambda: cpu.rms_norm(x, w, 1e-6), n // 20, r),
    }
    base = rows["direct call passthrough(x)"]
    overhead = {name: t - base for name, t in list(rows.items())[:4]}
    if args.json:
        print(json.dumps({"ns_per_call": rows, "overhead_ns_vs_direct": overhead, "torch": torch.__version__,
                          "python": platform.python_version()}, indent=2))
        return
    print(f"python {platform.python_version()}, torch {torch.__version__}, {n} calls x {r} runs (median)")
    print(f"{'call':<44} {'ns/call':>10} {'vs direct':>10}")
    for name, t in rows.items():
        extra = f"{overhead[name]:+10.1f}" if name in overhead else f"{'':>10}"
        print(f"{name:<44} {t:10.1f} {extra}")


if __name__ == "__main__":
    main()
