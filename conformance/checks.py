"""Comparison helpers: tolerances, element-wise checks against goldens, tie-aware top-k checks.

A :class:`Checker` is bound to one test invocation (op, case, dtype): every check records its
figures in the session's :class:`report.Recorder` and raises ``AssertionError`` with a one-line
message naming op, case, dtype and the error figures when it fails.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from hwlayer.ops import CATALOGUE

from .report import CaseResult, Recorder

TOLERANCES_FILE = Path(__file__).with_name("tolerances.yaml")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}  # half an ulp, relative
_FIELDS = ("atol", "rtol", "atol_per_k")


class ToleranceFileError(ValueError):
    pass


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_per_k: float = 0.0
    override_reason: str | None = None

    def atol_at(self, k: int) -> float:
        return self.atol + self.atol_per_k * k

    def override(self) -> dict[str, Any] | None:
        if self.override_reason is None:
            return None
        return {"reason": self.override_reason, "atol": self.atol, "rtol": self.rtol, "atol_per_k": self.atol_per_k}


def load_tolerances(path: Path = TOLERANCES_FILE) -> dict[str, Any]:
    """Parse and validate the tolerance file (see its header for the schema)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for dtype, entry in (data.get("defaults") or {}).items():
        _validate(f"defaults.{dtype}", dtype, entry)
    for op, by_dtype in (data.get("ops") or {}).items():
        if op not in CATALOGUE:
            raise ToleranceFileError(f"{path.name}: ops.{op}: unknown op")
        for dtype, entry in by_dtype.items():
            _validate(f"ops.{op}.{dtype}", dtype, entry)
    for op, by_dtype in (data.get("interpreter") or {}).items():
        if op not in CATALOGUE:
            raise ToleranceFileError(f"{path.name}: interpreter.{op}: unknown op")
        for dtype, entry in by_dtype.items():
            where = f"interpreter.{op}.{dtype}"
            _validate(where, dtype, entry, allow_reason=True)
            if not str(entry.get("reason") or "").strip():
                raise ToleranceFileError(f"{path.name}: {where}: an interpreter override needs a written 'reason'")
    for backend, by_op in (data.get("backends") or {}).items():
        for op, by_dtype in (by_op or {}).items():
            for dtype, entry in by_dtype.items():
                where = f"backends.{backend}.{op}.{dtype}"
                _validate(where, dtype, entry, allow_reason=True)
                if not str(entry.get("reason") or "").strip():
                    raise ToleranceFileError(f"{path.name}: {where}: a backend override needs a written 'reason'")
    return data


def _validate(where: str, dtype: str, entry: Any, allow_reason: bool = False) -> None:
    if dtype not in DTYPES:
        raise ToleranceFileError(f"{TOLERANCES_FILE.name}: {where}: dtype must be one of {', '.join(DTYPES)}")
    allowed = set(_FIELDS) | ({"reason"} if allow_reason else set())
    if not isinstance(entry, dict) or set(entry) - allowed:
        raise ToleranceFileError(f"{TOLERANCES_FILE.name}: {where}: expected a mapping with keys {sorted(allowed)}")


def triton_interpreter() -> bool:
    """Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``) in this process."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def tolerance_for(data: dict[str, Any], backend: str, op: str, dtype: str, interpreter: bool = False) -> Tolerance:
    """defaults < ops < interpreter (when ``interpreter``) < backends; the last override's reason wins."""
    values = dict(data["defaults"][dtype])
    values.update((data.get("ops") or {}).get(op, {}).get(dtype, {}))
    overrides = [((data.get("interpreter") or {}).get(op) or {}).get(dtype) if interpreter else None,
                 ((data.get("backends") or {}).get(backend) or {}).get(op, {}).get(dtype)]
    reason = None
    for override in overrides:
        if override:
            values.update({k: v for k, v in override.items() if k != "reason"})
            reason = override["reason"]
    return Tolerance(float(values["atol"]), float(values["rtol"]), float(values.get("atol_per_k", 0.0)), reason)


# --------------------------------------------------------------------------------------------
# Figures


@dataclass
class Figures:
    max_abs: float
    max_rel: float
    ratio: float
    where: str


def error_figures(actual: torch.Tensor, golden: torch.Tensor, atol: float, rtol: float) -> Figures:
    """Element-wise error of ``actual`` against a float64 ``golden``. Infinite golden entries must
    be matched exactly; NaN anywhere in ``actual`` is an infinite error."""
    a = actual.detach().to("cpu", torch.float64)
    g = golden.to(torch.float64)
    finite = torch.isfinite(g)
    nonfinite_mismatch = (~finite & (a != g)) | torch.isnan(a) | (finite & ~torch.isfinite(a))
    err = torch.where(finite, (a - g).abs(), torch.zeros_like(g))
    err = torch.where(nonfinite_mismatch, torch.full_like(err, math.inf), err)
    if err.numel() == 0:
        return Figures(0.0, 0.0, 0.0, "")
    ratio = err / (atol + rtol * g.abs().where(finite, torch.zeros_like(g)))
    worst = int(ratio.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
    big = finite & (g.abs() >= atol)
    rel = (err[big] / g[big].abs()).max().item() if bool(big.any()) else 0.0
    where = f"worst at {list(index)}: got {a.reshape(-1)[worst].item():.6g}, golden {g.reshape(-1)[worst].item():.6g}"
    return Figures(err.max().item(), rel, ratio.reshape(-1)[worst].item(), where)


# --------------------------------------------------------------------------------------------
# The per-test checker


def synchronize(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


class Checker:
    """Checks for one test invocation; use ``checker(op, case)`` (a fixture) to get one."""

    def __init__(self, op: str, case: str, dtype: str, plan: Any, recorder: Recorder, tolerances: dict[str, Any],
                 nodeid: str) -> None:
        self.op = op
        self.case = case
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.plan = plan
        self.device = plan.device
        self.fn: Callable = getattr(plan, op)
        self.tol = tolerance_for(tolerances, plan.backend.name, op, dtype, triton_interpreter())
        self._tolerances = tolerances
        self.result: CaseResult = recorder.case(op, dtype, case, nodeid)
        self.result.override = self.tol.override()
        self.recorder = recorder
        self._calls_before = dict(plan.call_counts())

    def tolerance_of(self, dtype: str) -> Tolerance:
        """This op's tolerance for another dtype: for an output whose arithmetic does not depend on
        the input dtype (sparse_mla_attention's fp32 lse from fp32 logits)."""
        return tolerance_for(self._tolerances, self.plan.backend.name, self.op, dtype, triton_interpreter())

    def label(self) -> str:
        return f"{self.op} [{self.case}] {self.dtype_name}"

    def finish(self) -> None:
        """Record which implementations served this case, from the traced plan's call counts
        (never from the plan entry: a native adapter whose ``supports()`` declines hands the call
        to the next tier, and only the counts show it)."""
        for (op, tier), n in self.plan.call_counts().items():
            delta = n - self._calls_before.get((op, tier), 0)
            if op == self.op and delta:
                self.result.calls[tier] = self.result.calls.get(tier, 0) + delta
                self.result.implementations.setdefault(tier, tier_implementation(self.plan, op, tier))

    # ---------------------------------------------------------------------------------------

    def fail(self, what: str, detail: str) -> None:
        __tracebackhide__ = True  # pytest shows the message, not this helper's source
        message = f"{self.label()}: {what}: {detail}"
        self.result.merge(passed=False, max_abs=math.inf, max_rel=math.inf, atol=None, rtol=None,
                          ratio=math.inf, message=message)
        raise AssertionError(message)

    def shape_dtype(self, what: str, t: Any, shape: tuple[int, ...],
                    dtype: torch.dtype | tuple[torch.dtype, ...]) -> None:
        """The output is a tensor of the contract's shape and dtype (on the plan's device)."""
        __tracebackhide__ = True  # pytest shows the message, not this helper's source
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if not isinstance(t, torch.Tensor):
            self.fail(what, f"expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            self.fail(what, f"expected shape {list(shape)} {want}, got {list(t.shape)} "
                            f"{str(t.dtype).removeprefix('torch.')}")
        if t.device.type != self.device.type:
            self.fail(what, f"expected a tensor on {self.device.type}, got {t.device}")

    def close(self, what: str, actual: torch.Tensor, golden: torch.Tensor, k: int = 1,
              tol: Tolerance | None = None) -> Figures:
        """``actual`` within tolerance of the float64 ``golden`` (``k``: reduction length)."""
        __tracebackhide__ = True  # pytest shows the message, not this helper's source
        tol = tol or self.tol
        atol = tol.atol_at(k)
        fig = error_figures(actual, golden, atol, tol.rtol)
        passed = fig.ratio <= 1.0
        message = (f"{self.label()}: {what} max_abs_err={fig.max_abs:.3g} max_rel_err={fig.max_rel:.3g} "
                   f"error_ratio={fig.ratio:.3g} (atol={atol:.3g}, rtol={tol.rtol:.3g}); {fig.where}")
        self.result.merge(passed=passed, max_abs=fig.max_abs, max_rel=fig.max_rel, atol=atol, rtol=tol.rtol,
                          ratio=fig.ratio, message=message)
        if not passed:
            raise AssertionError(message)
        return fig

    def exact(self, what: str, actual: Any, expected: Any) -> None:
        """Equality for outputs the contract fixes exactly (ids, copies, greedy tokens)."""
        __tracebackhide__ = True  # pytest shows the message, not this helper's source
        a = actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual
        e = expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected
        if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor):
            a_t, e_t = torch.as_tensor(a), torch.as_tensor(e)
            same = a_t.shape == e_t.shape and bool(torch.equal(a_t.to(e_t.dtype), e_t))
            if not same and a_t.shape == e_t.shape:
                diff = (a_t.to(e_t.dtype) != e_t).nonzero()
                first = tuple(diff[0].tolist())
                detail = (f"{diff.shape[0]} of {e_t.numel()} entries differ, first at {list(first)}: "
                          f"got {a_t[first].item()}, expected {e_t[first].item()}")
            else:
                detail = f"got shape {list(a_t.shape)}, expected {list(e_t.shape)}"
        else:
            same = a == e
            detail = f"got {str(a)[:200]}, expected {str(e)[:200]}"
        if not same:
            message = f"{self.label()}: {what} mismatch: {detail}"
            self.result.merge(passed=False, max_abs=math.inf, max_rel=math.inf, atol=0.0, rtol=0.0,
                              ratio=math.inf, message=message)
            raise AssertionError(message)
        self.result.merge(passed=True, max_abs=0.0, max_rel=0.0, atol=0.0, rtol=0.0, ratio=0.0, message=None)

    def topk(self, what: str, chosen: list[list[int]], golden_scores: list[torch.Tensor], k: int,
             reduction: int = 1) -> float:
        """Tie-aware top-k check of ``chosen`` (per row, ``-1`` = padding) against float64 scores.

        Per row ``r`` with ``n = min(k, len(golden_scores[r]))`` candidates: exactly ``n`` distinct
        valid indices (the rest ``-1``), each a candidate (``-inf`` scores mark ineligible ones); the
        sorted golden scores at the chosen indices equal the sorted golden top-``n`` scores within
        tolerance, so a different index is accepted only where golden scores tie. Returns recall:
        the mean fraction of the golden top-n set that was chosen.
        """
        __tracebackhide__ = True  # pytest shows the message, not this helper's source
        atol, rtol = self.tol.atol_at(reduction), self.tol.rtol
        recalls, worst_ratio, worst_abs = [], 0.0, 0.0
        for r, (row, scores) in enumerate(zip(chosen, golden_scores, strict=True)):
            n = min(k, scores.numel())
            valid = [i for i in row if i >= 0]
            if len(row) != k or len(valid) != n or row.count(-1) != k - n:
                self.fail(what, f"row {r}: expected {n} valid indices and {k - n} x -1 (padding), got {row}")
            if len(set(valid)) != n:
                self.fail(what, f"row {r}: duplicate indices in {row}")
            bad = [i for i in valid if i >= scores.numel()]
            if bad:
                self.fail(what, f"row {r}: index {bad[0]} is not a valid candidate (expected < {scores.numel()}); "
                                f"got {row}")
            got = torch.sort(scores[valid], descending=True).values
            best_vals, best_idx = torch.sort(scores, descending=True)
            want = best_vals[:n]
            err = torch.where(got == want, torch.zeros_like(want), (got - want).abs())  # -inf == -inf: no error
            ratio = (err / (atol + rtol * want.abs())).max().item() if n else 0.0
            worst_ratio, worst_abs = max(worst_ratio, ratio), max(worst_abs, err.max().item() if n else 0.0)
            recalls.append(len(set(valid) & set(best_idx[:n].tolist())) / n if n else 1.0)
            if ratio > 1.0:
                missing = sorted(set(best_idx[:n].tolist()) - set(valid))
                message = (f"{self.label()}: {what} row {r}: chosen indices are not a top-{n} set (error_ratio="
                           f"{ratio:.3g}, max score gap {err.max().item():.3g}, atol={atol:.3g}, rtol={rtol:.3g}); "
                           f"missed {missing[:8]}, recall {recalls[-1]:.3f}")
                self.result.merge(passed=False, max_abs=worst_abs, max_rel=0.0, atol=atol, rtol=rtol,
                                  ratio=worst_ratio, message=message)
                self._recall(recalls)
                raise AssertionError(message)
        self.result.merge(passed=True, max_abs=worst_abs, max_rel=0.0, atol=atol, rtol=rtol, ratio=worst_ratio,
                          message=None)
        return self._recall(recalls)

    def _recall(self, recalls: list[float]) -> float:
        mean = sum(recalls) / len(recalls) if recalls else 1.0
        low = min(recalls) if recalls else 1.0
        self.result.recall = mean if self.result.recall is None else min(self.result.recall, mean)
        self.result.recall_min = low if self.result.recall_min is None else min(self.result.recall_min, low)
        return mean

    # ---------------------------------------------------------------------------------------

    def time(self, *args: Any, runs: int = 3, **kwargs: Any) -> None:
        """Median wall time of the backend's implementation and of the generic one on this case.

        Data for the report, never an assertion. Inputs are reused across runs, so only call it
        with ops that do not consume their inputs (kv_cache_write rewrites the same slots).
        """
        generic = generic_implementation(self.op)
        counts_before = self.plan.call_counts()
        backend_ms = _median_ms(self.fn, args, kwargs, runs, self.device)
        same = self.plan.entries[self.op].origin == "generic"  # the plan runs the generic code itself
        generic_ms = backend_ms if same else _median_ms(generic, args, kwargs, runs, self.device)
        self.recorder.add_timing(self.op, self.dtype_name, self.case, backend_ms, generic_ms, runs)
        for key, n in self.plan.call_counts().items():  # timing calls are not the case's calls
            self._calls_before[key] = self._calls_before.get(key, 0) + n - counts_before.get(key, 0)


def tier_implementation(plan: Any, op: str, tier: str) -> str:
    """The function(s) behind a traced tier label (``native``, ``inherited:<backend>``, ``generic``)."""
    if tier == "generic":
        return f"hwlayer.ops.{op}" + (" (composite of the plan's parts)" if CATALOGUE[op].composite else "")
    from hwlayer.registry import registry  # the registry the plan was resolved from (cached)

    backend = plan.backend.name if tier == "native" else tier.removeprefix("inherited:")
    names = [f"{r.fn.__module__}.{r.fn.__qualname__}" for r in registry().implementations(op, backend)]
    return " | ".join(names) or f"{backend} implementation"


def skip_unless_reference(backend_name: str) -> None:
    """Skip a suite self-test (it checks the suite, not the backend) unless the backend under test
    is the reference: it runs once, with ``--backend cpu``, instead of counting as a pass for
    every backend."""
    import pytest

    import hwlayer

    if not hwlayer.select_backend(backend_name).reference:
        pytest.skip("suite self-test: checks the conformance suite itself, not the backend; runs with the "
                    "reference backend (--backend cpu)")


def _median_ms(fn: Callable, args: tuple, kwargs: dict, runs: int, device: torch.device) -> float:
    fn(*args, **kwargs)  # warm-up (compilation, caches)
    synchronize(device)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


class _GenericParts:
    """Attribute access to the generic implementations, for building a generic composite."""

    def __getattr__(self, name: str) -> Callable:
        return CATALOGUE[name].default


def generic_implementation(op: str) -> Callable:
    spec = CATALOGUE[op]
    return spec.default(_GenericParts()) if spec.composite else spec.default
