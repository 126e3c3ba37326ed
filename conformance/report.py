"""Conformance report: the records the suite collects and the JSON + Markdown it writes.

``pytest conformance/ --backend NAME --report PATH.json`` writes ``PATH.json`` and ``PATH.md``.
``hwlayer conformance`` (``hwlayer/certificate.py``) builds its certificate from the JSON, so the
schema below is a stable interface: fields are only ever added.

JSON schema ``hwlayer-conformance-report/1``::

    {
      "schema": "hwlayer-conformance-report/1",
      "backend": "cpu",                 # the backend under test
      "device": "cpu",                  # torch device the plan runs on
      "torch": "2.13.0+cpu",            # torch.__version__
      "hwlayer": "0.1.0",
      "python": "3.12.3",
      "created": "2026-01-01T00:00:00Z",
      "dtypes": ["fp32", "bf16", "fp16"],
      "pytest_exit_status": 0,          # of the session that wrote the report
      "passed": true,                   # every record passed (and at least one record)
      "tolerances": "conformance/tolerances.yaml",
      "plan": {"rms_norm": {"origin": "generic", "implementation": "hwlayer.ops.rms_norm",
                            "plugin": "hwlayer", "reason": "..."}, ...},   # the dispatch plan
      "records": [                      # one per op x dtype that ran
        {
          "op": "rms_norm", "dtype": "bf16",
          "cases": 4,                   # cases (test invocations) of this op and dtype
          "passed": true,
          "failed_cases": [],           # names of failing cases
          "max_abs_err": 0.0039,        # max over cases and elements of |out - golden|
          "max_rel_err": 0.0031,        # max |out - golden| / |golden| where |golden| >= atol
          "atol": 0.016, "rtol": 0.016, # tolerance of the worst case (atol may scale with a
                                        #   reduction length, see tolerances.yaml)
          "error_ratio": 0.12,          # max over elements of |err| / (atol + rtol * |golden|);
                                        #   a case passes when <= 1 (and integer parts match)
          "origin": "triton 12 / generic 3",  # what SERVED the cases, from the traced calls: one
                                        #   tier's name ("native", an inherited backend such as
                                        #   "triton", "generic") or mixed tiers with their counts,
                                        #   most calls first; "not called" when no call was traced
          "plan_origin": "native+fallback",   # the plan entry's origin verbatim (what was planned)
          "implementation": "pkg.module.fn",  # the plan entry's first-choice implementation
          "calls": {"inherited:triton": 12, "generic": 3},  # traced calls during the cases, by tier
          "implementations": {"inherited:triton": "hwlayer.backends.triton.adapters.rms_norm",
                              "generic": "hwlayer.ops.rms_norm"},   # the function(s) behind each tier
          "tolerance_override": null,   # or {"reason": "...", "atol": .., "rtol": .., "atol_per_k": ..}
          "recall": null,               # top-k ops: mean recall of the golden top-k set
          "recall_min": null,           #            worst row's recall
          "timing": null,               # or {"case": "...", "backend_ms": .., "generic_ms": ..,
                                        #     "runs": 5}: median wall time of one call, data only
          "message": null               # the first failure message, one line
        }, ...
      ],
      "cases": [ {"op", "dtype", "case", "nodeid", "passed", "max_abs_err", "max_rel_err",
                  "atol", "rtol", "error_ratio", "recall", "message", "calls", "implementations",
                  "origin"}, ... ],   # per case: which tier served it (same vocabulary as above)
      ...                               # extras other suites add (e.g. "model": {...})
    }

Exact-output ops (kv_cache_write, moe_permute ids, sample's greedy rows) record errors of 0 and
an ``error_ratio`` of 0 when they match, ``inf`` when they do not.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwlayer.certificate import REPORT_SCHEMA, json_safe, report_record, served_origin, tier_name

SCHEMA = REPORT_SCHEMA  # the one schema, shared with hwlayer/certificate.py (which reads it)
RESERVED_KEYS = frozenset(
    "schema backend device torch hwlayer python created dtypes pytest_exit_status passed tolerances "
    "plan records cases".split()
)


@dataclass
class CaseResult:
    """Figures of one case (one test invocation) of one op and dtype."""

    op: str
    dtype: str
    case: str
    nodeid: str
    passed: bool = True
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    atol: float | None = None
    rtol: float | None = None
    error_ratio: float = 0.0
    recall: float | None = None
    recall_min: float | None = None
    message: str | None = None
    override: dict[str, Any] | None = None
    calls: dict[str, int] = field(default_factory=dict)  # traced calls by tier: native, inherited:x, generic
    implementations: dict[str, str] = field(default_factory=dict)  # tier -> the function(s) behind it

    def merge(self, *, passed: bool, max_abs: float, max_rel: float, atol: float | None, rtol: float | None,
              ratio: float, message: str | None) -> None:
        """Fold one more check of this case in, keeping the worst figures."""
        if ratio >= self.error_ratio or self.atol is None:
            self.atol, self.rtol = atol, rtol
        self.max_abs_err = max(self.max_abs_err, max_abs)
        self.max_rel_err = max(self.max_rel_err, max_rel)
        self.error_ratio = max(self.error_ratio, ratio)
        if not passed:
            self.passed = False
            self.message = self.message or message


class Recorder:
    """Collects case results and timings during a session; writes the report at the end."""

    def __init__(self, backend: str, device: str, dtypes: list[str], tolerances: str) -> None:
        self.backend = backend
        self.device = device
        self.dtypes = dtypes
        self.tolerances = tolerances
        self.cases: dict[tuple[str, str, str], CaseResult] = {}
        self.timings: dict[tuple[str, str], dict[str, Any]] = {}
        self.plan: dict[str, dict[str, str]] = {}
        self.extra: dict[str, Any] = {}

    def case(self, op: str, dtype: str, case: str, nodeid: str) -> CaseResult:
        key = (op, dtype, nodeid)
        if key not in self.cases:
            self.cases[key] = CaseResult(op, dtype, case, nodeid)
        return self.cases[key]

    def add_timing(self, op: str, dtype: str, case: str, backend_ms: float, generic_ms: float, runs: int) -> None:
        self.timings[(op, dtype)] = {"case": case, "backend_ms": backend_ms, "generic_ms": generic_ms, "runs": runs}

    def add_extra(self, key: str, value: Any) -> None:
        """Attach a JSON-serialisable top-level entry (e.g. ``"model"`` from an end-to-end suite)."""
        if key in RESERVED_KEYS:
            raise ValueError(f"report key {key!r} is reserved; use another name")
        self.extra[key] = value

    # ---------------------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        grouped: dict[tuple[str, str], list[CaseResult]] = {}
        for c in self.cases.values():
            grouped.setdefault((c.op, c.dtype), []).append(c)
        out = []
        for (op, dtype), cases in sorted(grouped.items()):
            worst = max(cases, key=lambda c: (not c.passed, c.error_ratio))
            recalls = [c.recall for c in cases if c.recall is not None]
            mins = [c.recall_min for c in cases if c.recall_min is not None]
            calls: dict[str, int] = {}
            implementations: dict[str, str] = {}
            for c in cases:
                for tier, n in c.calls.items():
                    calls[tier] = calls.get(tier, 0) + n
                implementations.update(c.implementations)
            entry = self.plan.get(op, {})
            plan_origin = entry.get("origin", "unknown")
            override = next((c.override for c in cases if c.override), None)
            out.append(report_record(
                op=op,
                dtype=dtype,
                cases=len(cases),
                passed=all(c.passed for c in cases),
                failed_cases=[c.case for c in cases if not c.passed],
                max_abs_err=max(c.max_abs_err for c in cases),
                max_rel_err=max(c.max_rel_err for c in cases),
                atol=worst.atol,
                rtol=worst.rtol,
                error_ratio=worst.error_ratio,
                origin=served_origin(calls),
                plan_origin=plan_origin,
                implementation=entry.get("implementation"),
                calls=calls,
                implementations=implementations,
                tolerance_override=override,
                recall=sum(recalls) / len(recalls) if recalls else None,
                recall_min=min(mins) if mins else None,
                timing=self.timings.get((op, dtype)),
                message=next((c.message for c in cases if not c.passed), None),
            ))
        return out

    def to_dict(self, exit_status: int) -> dict[str, Any]:
        import torch

        import hwlayer

        records = self.records()
        return {
            "schema": SCHEMA,
            "backend": self.backend,
            "device": self.device,
            "torch": torch.__version__,
            "hwlayer": hwlayer.__version__,
            "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dtypes": self.dtypes,
            "pytest_exit_status": exit_status,
            "passed": bool(records) and all(r["passed"] for r in records),
            "tolerances": self.tolerances,
            "plan": self.plan,
            "records": records,
            "cases": [json_safe(asdict(c) | {"origin": served_origin(c.calls)}) for c in self.cases.values()],
            **self.extra,
        }

    def write(self, path: str | Path, exit_status: int) -> tuple[Path, Path]:
        """Write ``path`` (JSON) and the Markdown table next to it (same name, ``.md``)."""
        data = self.to_dict(exit_status)
        json_path = Path(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(json_safe(data), indent=2) + "\n", encoding="utf-8")
        md_path = json_path.with_suffix(".md")
        md_path.write_text(render_markdown(data), encoding="utf-8")
        return json_path, md_path


def simple_origin(plan_origin: str) -> str:
    """``native`` / ``inherited`` / ``generic`` from a plan entry's origin string."""
    if plan_origin.startswith("native"):
        return "native"
    if plan_origin.startswith("inherited"):
        return "inherited"
    return "generic" if plan_origin == "generic" else plan_origin


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _origin_cell(r: dict[str, Any]) -> str:
    """The served origin, plus the plan's where the two disagree (e.g. a native adapter that declined)."""
    plan_origin = r.get("plan_origin") or "unknown"
    planned = tier_name(plan_origin.removesuffix("+fallback"))
    return r["origin"] if r["origin"] == planned else f"{r['origin']} (plan: {plan_origin})"


def render_markdown(data: dict[str, Any]) -> str:
    """The report as a Markdown table: op x dtype -> pass/fail, errors, tolerance, origin, recall."""
    lines = [
        f"# Conformance report: backend `{data['backend']}`",
        "",
        f"torch {data['torch']}, hwlayer {data['hwlayer']}, device `{data['device']}`, created {data['created']}. "
        f"Overall: **{'PASS' if data['passed'] else 'FAIL'}** (pytest exit status {data['pytest_exit_status']}).",
        "",
        "| op | dtype | result | cases | max abs err | max rel err | atol | rtol | err/tol | served by "
        "| top-k recall | backend ms | generic ms | tolerance override |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        timing = r.get("timing") or {}
        override = (r.get("tolerance_override") or {}).get("reason", "")
        recall = "-" if r.get("recall") is None else f"{r['recall']:.3f} (min {r['recall_min']:.3f})"
        lines.append(
            f"| {r['op']} | {r['dtype']} | {'pass' if r['passed'] else '**FAIL**'} | {r['cases']} "
            f"| {_fmt(r['max_abs_err'])} | {_fmt(r['max_rel_err'])} | {_fmt(r['atol'])} | {_fmt(r['rtol'])} "
            f"| {_fmt(r['error_ratio'])} | {_origin_cell(r)} | {recall} | {_fmt(timing.get('backend_ms'))} "
            f"| {_fmt(timing.get('generic_ms'))} | {override} |"
        )
    failed = [r for r in data["records"] if not r["passed"]]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r['op']}` {r['dtype']}: {r['message']}" for r in failed]
    return "\n".join(lines) + "\n"
