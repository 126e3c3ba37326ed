"""The CPU's device graph: a decode step traced once into a TorchScript graph and replayed from C++.

What a CUDA graph does for a GPU (the host stops paying, per step, for the Python and dispatch of
every op), a trace does for a CPU: ``torch.jit.trace`` records the aten calls one run of the step
makes, and a replay runs that recording in TorchScript's C++ interpreter, without the model's or
the ops' Python (argument checks, views, metadata arithmetic). As with a CUDA graph, everything
the step reads stays where it was at capture: tensors the step closes over (weights, the paged
cache, the runner's static input buffer) are recorded by reference, so a replay reads their
current values and writes into them in place; host values (shapes, ``max_seqlen_k``) are fixed.

The graph executor's optimisation passes are switched off for capture and replay
(``torch.jit.optimized_execution(False)``): the recording runs exactly the kernels eager runs, in
the same order, so a replay is bit-identical to an eager step (the tests compare them). With the
passes on, replays stopped matching eager and padding rows wrote into the cache (torch 2.13, this
CPU; tests/test_runner_graphs.py and tests/test_serve_graphs.py fail that way). The likely cause:
to TorchScript the tensors a trace closes over are constants, and constant propagation may fold work
on them, freezing the static inputs seen at capture. The step needs no optimisation, only the
Python gone.

Why TorchScript, which torch 2.13 marks deprecated in favour of ``torch.compile`` / ``torch.export``:
it is the one facility in a stock CPU build of torch that replays a recorded op sequence without
Python. ``torch.compile(backend="eager")`` was measured on the same decode step and cut nothing (its
graph still makes every torch call from Python: 3.1 ms of host overhead per step against 2.7 eager,
bench/bench_model.py's measure); inductor would generate and compile C++ at startup, a compiler
dependency this backend does not take. If a torch build drops ``torch.jit``, :func:`available`
says so, the CPU backend declares no graph, and steps run eagerly; a step the tracer cannot record
makes the runner fall back to eager steps with a warning. ``--enforce-eager`` turns it off.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def available() -> bool:
    return hasattr(torch, "jit") and hasattr(torch.jit, "trace") and hasattr(torch.jit, "optimized_execution")


class TracedStepGraph:
    """One captured step (the model runner's ``StepGraph`` protocol): :meth:`capture` traces ``fn``
    (which reads only tensors that stay in place between steps) and returns its output tensor;
    :meth:`replay` reruns the recording and refreshes that same output tensor."""

    def __init__(self) -> None:
        self._step: Callable[[], torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.jit.optimized_execution(False), warnings.catch_warnings():
            # The tracer warns that closed-over tensors become constants of the recording: that is
            # the point (they are recorded by reference, like the addresses a CUDA graph bakes in).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch.jit.trace is deprecated in favour of torch.compile / torch.export (module doc: why
            # it is used here anyway); the warning says nothing a user of the server can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._step = torch.jit.trace(fn, (), check_trace=False)
            self._out = self._step()
        return self._out

    def replay(self) -> None:
        assert self._step is not None and self._out is not None, "replay before capture"
        with torch.jit.optimized_execution(False):
            self._out.copy_(self._step())
