"""Conformance certificates: what a vendor hands a reviewer after running the conformance suite.

``hwlayer conformance --backend NAME --out DIR`` runs ``pytest conformance/ --backend NAME
--report DIR/report.json`` and then calls :func:`write_certificate`, which turns that report into
three self-contained files in ``DIR``:

* ``certificate.json``: the machine-readable certificate (environment + one record per op/dtype);
* ``certificate.md``: the same as Markdown, for a pull request or an issue;
* ``certificate.html``: a single page with inline CSS only, including a heat map of op x dtype
  error ratio (max error / tolerance) so a reviewer sees at a glance what passes near the edge.

``hwlayer conformance diff A.json B.json`` compares two reports or certificates
(:func:`diff_reports`): pass/fail flips and error-ratio changes per op and dtype.

The input is the JSON report the conformance suite writes (schema documented in
``conformance/report.py``). :func:`normalise_records` reads the fields it needs and tolerates
absent optional ones (timing, model metrics), so a partial run still yields a certificate.
"""

from __future__ import annotations

import datetime as _dt
import html
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

CERTIFICATE_SCHEMA = "hwlayer-certificate/1"

# Distributions whose versions matter for a backend's numerics. Absent ones are left out.
KNOWN_VENDOR_DISTRIBUTIONS = (
    "torch",
    "triton",
    "torch-npu",
    "torch_mlu",
    "torch-mlu",
    "torch_mlu_ops",
    "torch-mlu-ops",
    "torch_musa",
    "torch-musa",
    "mate",
    "mcoplib",
    "lightop",
    "torch_xmlir",
    "kunlun_ops",
    "ixformer",
    "deep_gemm",
    "flash_mla",
)

# The one report schema: what conformance/report.py writes (documented there) and this module reads.
REPORT_SCHEMA = "hwlayer-conformance-report/1"
# The fields of one op x dtype record of a report, in the order the report writes them.
REPORT_RECORD_FIELDS = (
    "op", "dtype", "cases", "passed", "failed_cases", "max_abs_err", "max_rel_err", "atol", "rtol", "error_ratio",
    "origin", "plan_origin", "implementation", "calls", "implementations", "tolerance_override", "recall",
    "recall_min", "timing", "message",
)


def report_record(**fields: Any) -> dict[str, Any]:
    """One report record with exactly :data:`REPORT_RECORD_FIELDS` (the writer's side of the schema:
    a field added, renamed or dropped in one place fails here instead of silently in the reader)."""
    if tuple(fields) != REPORT_RECORD_FIELDS:
        missing = [f for f in REPORT_RECORD_FIELDS if f not in fields]
        extra = [f for f in fields if f not in REPORT_RECORD_FIELDS]
        raise ValueError(f"report record: expected the fields of {REPORT_SCHEMA} in order; missing {missing}, "
                         f"unknown {extra}")
    return fields


class CertificateError(ValueError):
    """A report or certificate file is missing or malformed (the message is one line)."""


# --------------------------------------------------------------------------------------------
# Reading reports


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a report or certificate JSON, turning every failure into a one-line CertificateError."""
    p = Path(path)
    if not p.is_file():
        raise CertificateError(f"{p}: no such file (expected a conformance report.json or certificate.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CertificateError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CertificateError(f"{p}: expected a JSON object with per-op records, got {type(data).__name__}")
    return data


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f


def _override_reason(rec: dict[str, Any]) -> str | None:
    """The override's reason: a report holds ``{"reason": ...}``, a certificate the reason itself."""
    ov = rec.get("tolerance_override")
    if isinstance(ov, dict):
        return ov.get("reason") or json.dumps(ov, sort_keys=True)
    return ov if isinstance(ov, str) and ov else None


def _timing(rec: dict[str, Any]) -> tuple[float | None, float | None]:
    """(backend time, generic time) in milliseconds: a report's ``timing`` object, or a certificate's
    own ``backend_ms`` / ``generic_ms``."""
    t = rec.get("timing")
    src = t if isinstance(t, dict) else rec
    return _num(src.get("backend_ms")), _num(src.get("generic_ms"))


_TIER_ORDER = ("native", "inherited", "generic")


def tier_name(tier: str) -> str:
    """Display name of a traced tier label: ``native``, the inherited backend (``inherited:triton``
    -> ``triton``), ``generic``."""
    return tier.removeprefix("inherited:")


def served_origin(calls: dict[str, int]) -> str:
    """What served a set of calls, from the traced counts (``DispatchPlan.call_counts``): one
    tier's name, or every tier that served some of them with its count, most calls first
    (``"triton 12 / generic 3"``); ``"not called"`` when nothing was traced."""
    live = [(tier, n) for tier, n in calls.items() if n]
    if not live:
        return "not called"
    if len(live) == 1:
        return tier_name(live[0][0])
    rank = {t: i for i, t in enumerate(_TIER_ORDER)}
    live.sort(key=lambda tn: (-tn[1], rank.get(tn[0].split(":")[0], 9), tn[0]))
    return " / ".join(f"{tier_name(t)} {n}" for t, n in live)


def _serving(origin: str, calls: dict[str, int]) -> str:
    """``native`` (no call reached the generic fallback; inherited tiers count as the backend's
    own), ``mixed`` (some did), ``fallback`` (all did). From the traced calls when the report
    has them, else from the origin string."""
    live = {t: n for t, n in calls.items() if n}
    if live:
        generic = live.get("generic", 0)
        return "fallback" if generic == sum(live.values()) else "mixed" if generic else "native"
    return "native" if origin.startswith(("native", "inherited")) else "fallback"


def normalise_record(rec: dict[str, Any]) -> dict[str, Any]:
    """One op x dtype record in the certificate's own field names."""
    if not isinstance(rec, dict) or "op" not in rec:
        raise CertificateError(f"record without an 'op' field: {str(rec)[:80]}")
    max_abs = _num(rec.get("max_abs_err"))
    max_rel = _num(rec.get("max_rel_err"))
    atol = _num(rec.get("atol"))
    rtol = _num(rec.get("rtol"))
    ratio = _num(rec.get("error_ratio"))
    backend_ms, generic_ms = _timing(rec)
    speedup = generic_ms / backend_ms if backend_ms and generic_ms else None
    origin = str(rec.get("origin") or "unknown")
    passed_raw = rec.get("passed")
    calls = rec.get("calls") if isinstance(rec.get("calls"), dict) else {}
    calls = {str(k): int(v) for k, v in calls.items() if isinstance(v, (int, float))}
    serving = _serving(origin, calls)
    cases = rec.get("cases")
    return {
        "op": str(rec["op"]),
        "dtype": str(rec.get("dtype") or "-"),
        "cases": cases if isinstance(cases, int) and cases > 0 else 1,
        "passed": bool(passed_raw),
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "atol": atol,
        "rtol": rtol,
        "error_ratio": ratio,
        "origin": origin,
        "serving": serving,
        "native": serving == "native",
        "implementation": rec.get("implementation"),
        "implementations": dict(rec.get("implementations") or {}),
        "plan_origin": rec.get("plan_origin"),
        "calls": calls,
        "recall": _num(rec.get("recall")),
        "recall_min": _num(rec.get("recall_min")),
        "failed_cases": list(rec.get("failed_cases") or []),
        "tolerance_override": _override_reason(rec),
        "backend_ms": backend_ms,
        "generic_ms": generic_ms,
        "speedup": speedup,
        "message": rec.get("message"),
    }


def normalise_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """All records of a report (or of a certificate, which stores them already normalised)."""
    raw = report.get("records")
    if not isinstance(raw, list):
        raise CertificateError(f"report has no per-op records: expected a 'records' list (schema {REPORT_SCHEMA})")
    return [normalise_record(r) for r in raw]


def _merge_cases(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several cases of one op x dtype collapse to the worst one (highest error ratio, any failure)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (r["op"], r["dtype"])
        cur = merged.get(key)
        if cur is None:
            merged[key] = dict(r)
            continue
        worse = (not r["passed"] and cur["passed"]) or (
            r["passed"] == cur["passed"] and (r["error_ratio"] or 0.0) > (cur["error_ratio"] or 0.0)
        )
        keep = dict(r) if worse else dict(cur)
        keep["cases"] = cur["cases"] + r["cases"]
        keep["failed_cases"] = cur["failed_cases"] + r["failed_cases"]
        keep["passed"] = cur["passed"] and r["passed"]
        keep["tolerance_override"] = cur["tolerance_override"] or r["tolerance_override"]
        if cur["calls"] or r["calls"]:  # what served the merged cases: all of their calls
            keep["calls"] = {t: cur["calls"].get(t, 0) + r["calls"].get(t, 0) for t in {**cur["calls"], **r["calls"]}}
            keep["implementations"] = {**cur["implementations"], **r["implementations"]}
            keep["origin"] = served_origin(keep["calls"])
            keep["serving"] = _serving(keep["origin"], keep["calls"])
            keep["native"] = keep["serving"] == "native"
        merged[key] = keep
    return list(merged.values())


# --------------------------------------------------------------------------------------------
# Building the certificate


def distribution_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the known vendor distributions plus ``extra`` (absent ones omitted)."""
    versions: dict[str, str] = {}
    for name in (*extra, *KNOWN_VENDOR_DISTRIBUTIONS):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        versions.setdefault(dist.metadata["Name"] or name, dist.version)
    return versions


def plugin_distribution(plugin_name: str) -> str | None:
    """The distribution that provides entry point ``plugin_name`` in group ``hwlayer``, if any."""
    for ep in importlib.metadata.entry_points(group="hwlayer"):
        if ep.name == plugin_name and ep.dist is not None:
            return ep.dist.metadata["Name"]
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def _device_name(device_type: str) -> str:
    """A human name for the device the backend ran on (vendor modules expose get_device_name)."""
    import torch

    if device_type == "cpu":
        return f"CPU: {_cpu_model()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    mod = getattr(torch, device_type, None)
    try:
        if mod is not None and mod.is_available():
            return str(mod.get_device_name(0))
    except Exception as exc:  # a vendor module that cannot name its device still gets a certificate
        return f"{device_type} (name unavailable: {type(exc).__name__})"
    return f"{device_type} (not available in this process)"


def environment(backend_name: str) -> dict[str, Any]:
    """Facts about this machine and the backend, looked up now (called right after the run)."""
    import torch

    from . import __version__
    from .hookspecs import HOOKSPEC_VERSION
    from .registry import registry

    reg = registry()
    backend = reg.backends.get(backend_name)
    plugin = reg.backend_plugins.get(backend_name)
    dist = plugin_distribution(plugin) if plugin else None
    env: dict[str, Any] = {
        "hwlayer": __version__,
        "hookspec_version": HOOKSPEC_VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "plugin": plugin,
        "plugin_distribution": dist,
        "packages": distribution_versions((dist,) if dist else ()),
    }
    if backend is not None:
        status = backend.availability()
        env.update(
            vendor=backend.vendor,
            device_type=backend.device_type,
            dist_backend=backend.dist_backend,
            device=_device_name(backend.device_type),
            availability=status.reason,
            verified=backend.verified,
        )
    return env


def build_certificate(report: dict[str, Any], env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The certificate dict from a conformance report and (optionally) the environment facts."""
    records = sorted(_merge_cases(normalise_records(report)), key=lambda r: (r["op"], r["dtype"]))
    backend = str(report.get("backend") or (env or {}).get("backend") or "unknown")
    env = dict(env or {})
    for key in ("torch", "hwlayer", "python", "device"):  # what the run itself recorded wins
        if report.get(key) and key not in env:
            env[key] = report[key]
    env.setdefault("run_created", report.get("created"))
    env.setdefault("report_schema", report.get("schema"))
    failed = [f"{r['op']}/{r['dtype']}" for r in records if not r["passed"]]
    ratios = [r["error_ratio"] for r in records if r["error_ratio"] is not None and not math.isnan(r["error_ratio"])]
    model = report.get("model")
    return {
        "schema": CERTIFICATE_SCHEMA,
        "backend": backend,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "report_torch": report.get("torch"),
        "environment": env,
        "summary": {
            "passed": not failed and bool(records),
            "records": len(records),
            "failed": failed,
            "native": sum(1 for r in records if r["serving"] == "native"),
            "mixed": sum(1 for r in records if r["serving"] == "mixed"),
            "fallback": sum(1 for r in records if r["serving"] == "fallback"),
            "overrides": sum(1 for r in records if r["tolerance_override"]),
            "max_error_ratio": max(ratios) if ratios else None,
        },
        "model": model if isinstance(model, dict) else None,
        "records": records,
    }


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def _speed(r: dict[str, Any]) -> str:
    if r["backend_ms"] is None:
        return "-"
    s = f"{r['backend_ms']:.3g} ms"
    if r["generic_ms"] is not None:
        s += f" vs {r['generic_ms']:.3g} ms generic"
    if r["speedup"] is not None:
        s += f" ({r['speedup']:.2f}x)"
    return s


def _path(r: dict[str, Any]) -> str:
    """What served the op, from the traced calls: one tier with its call count, or the mixed
    tiers with theirs; the plan's origin is added where it promised something else."""
    text = "generic fallback" if r["origin"] == "generic" else r["origin"]
    total = sum(r["calls"].values())
    if total and "/" not in r["origin"]:
        text += f" ({total} calls)"
    plan = r.get("plan_origin")
    if plan and r["calls"] and tier_name(plan.removesuffix("+fallback")) != r["origin"]:
        text += f"; plan: {plan}"
    return text


def _recall(r: dict[str, Any]) -> str:
    if r["recall"] is None:
        return "-"
    return f"{r['recall']:.3f}" + (f" (min {r['recall_min']:.3f})" if r["recall_min"] is not None else "")


def json_safe(value: Any) -> Any:
    """Infinities and NaN as strings ("inf", "-inf", "nan"): JSON has no literal for them. The
    conformance report and the certificate both write through this."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _env_rows(cert: dict[str, Any]) -> list[tuple[str, str]]:
    env = cert["environment"]
    rows = [("backend", cert["backend"])]
    for key in ("vendor", "device", "device_type", "dist_backend", "verified", "availability", "hwlayer",
                "hookspec_version", "torch", "python", "platform", "plugin", "plugin_distribution", "run_created"):
        if env.get(key) is not None:
            rows.append((key, str(env[key])))
    pkgs = env.get("packages") or {}
    if pkgs:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in sorted(pkgs.items()))))
    rows.append(("date", cert["date"]))
    return rows


def render_markdown(cert: dict[str, Any]) -> str:
    s = cert["summary"]
    verdict = "PASSED" if s["passed"] else f"FAILED ({len(s['failed'])}: {', '.join(s['failed']) or 'no records'})"
    lines = [f"# hwlayer conformance certificate: `{cert['backend']}`", "", f"**Result: {verdict}**", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _env_rows(cert)]
    lines += ["", f"{s['records']} op x dtype records: {s['native']} served natively, {s.get('mixed', 0)} partly "
              f"by the generic fallback, {s['fallback']} by the generic fallback only (from traced calls), "
              f"{s['overrides']} with a tolerance override; highest error ratio "
              f"{_fmt(s['max_error_ratio'])} (1.0 = at the tolerance).", ""]
    lines += ["## Per op and dtype", "",
              "| op | dtype | result | cases | max abs err | max rel err | atol | rtol | error ratio | top-k recall "
              "| path | time vs generic | tolerance override |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cert["records"]:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {'pass' if r['passed'] else '**FAIL**'} | {r['cases']} | "
            f"{_fmt(r['max_abs_err'])} | {_fmt(r['max_rel_err'])} | {_fmt(r['atol'])} | {_fmt(r['rtol'])} | "
            f"{_fmt(r['error_ratio'])} | {_recall(r)} | {_path(r)} | "
            f"{_speed(r)} | {r['tolerance_override'] or ''} |"
        )
    failed = [r for r in cert["records"] if not r["passed"]]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r['op']}` {r['dtype']}: {r['message'] or 'failed'}"
                  + (f" (cases: {', '.join(map(str, r['failed_cases']))})" if r["failed_cases"] else "")
                  for r in failed]
    if cert.get("model"):
        lines += ["", "## End-to-end model", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, '.4g')} |" for k, v in cert["model"].items()]
    lines += ["", "Error ratio = max over elements of |err| / (atol + rtol * |golden|); the op passes when it "
              "is <= 1. A tolerance override widens the tolerance for one op/dtype and must state why.", ""]
    return "\n".join(lines)


def ratio_colour(ratio: float | None, passed: bool) -> str:
    """Cell colour: green (far from the tolerance) -> yellow -> red (at it); dark red when failed."""
    if not passed:
        return "#8b0000"
    if ratio is None or not math.isfinite(ratio):
        return "#d0d0d0"
    r = min(max(ratio, 0.0), 1.0)
    hue = 120.0 * (1.0 - r)  # 120 green, 60 yellow, 0 red
    return f"hsl({hue:.0f}, 75%, {80 - 25 * r:.0f}%)"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;font-size:13px}
th{background:#eee}.heat td{text-align:center;min-width:70px}.fail{color:#fff;font-weight:bold}
.ok{color:#060;font-weight:bold}.bad{color:#a00;font-weight:bold}.legend span{display:inline-block;
width:60px;text-align:center;font-size:12px;padding:2px}.small{color:#555;font-size:12px}
"""


def render_html(cert: dict[str, Any]) -> str:
    e = html.escape
    s = cert["summary"]
    records = cert["records"]
    ops = sorted({r["op"] for r in records})
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    dtypes = sorted({r["dtype"] for r in records}, key=lambda d: (order.get(d, 9), d))
    by_key = {(r["op"], r["dtype"]): r for r in records}
    verdict = ("<span class='ok'>PASSED</span>" if s["passed"]
               else f"<span class='bad'>FAILED</span> ({e(', '.join(s['failed']) or 'no records')})")
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>hwlayer certificate: {e(cert['backend'])}</title><style>{_CSS}</style></head><body>",
           f"<h1>hwlayer conformance certificate: <code>{e(cert['backend'])}</code></h1>",
           f"<p>Result: {verdict}. {s['records']} op x dtype records, {s['native']} served natively, "
           f"{s.get('mixed', 0)} partly by the generic fallback, {s['fallback']} by the generic fallback only "
           f"(from traced calls), {s['overrides']} tolerance overrides; highest error ratio "
           f"{e(_fmt(s['max_error_ratio']))}.</p><table>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _env_rows(cert)]
    out.append("</table><h2>Error ratio heat map (max error / tolerance)</h2>")
    out.append("<p class='legend'>" + "".join(
        f"<span style='background:{ratio_colour(x, True)}'>{x:.2f}</span>" for x in (0.0, 0.25, 0.5, 0.75, 1.0)
    ) + f"<span class='fail' style='background:{ratio_colour(None, False)}'>fail</span>"
        "<span style='background:#d0d0d0'>n/a</span></p>")
    out.append("<table class='heat'><tr><th>op</th>" + "".join(f"<th>{e(d)}</th>" for d in dtypes) + "</tr>")
    for op in ops:
        cells = []
        for d in dtypes:
            r = by_key.get((op, d))
            if r is None:
                cells.append("<td style='background:#f4f4f4'></td>")
                continue
            label = _fmt(r["error_ratio"], ".2f") + {"native": "", "mixed": " <small>(partly generic)</small>"}.get(
                r["serving"], " <small>(generic)</small>")
            if r["tolerance_override"]:
                label += " *"
            cls = " class='fail'" if not r["passed"] else ""
            title = e(f"{op} {d}: abs {_fmt(r['max_abs_err'])}, rel {_fmt(r['max_rel_err'])}, "
                      f"atol {_fmt(r['atol'])}, rtol {_fmt(r['rtol'])}, {r['origin']}")
            cells.append(f"<td{cls} title='{title}' style='background:{ratio_colour(r['error_ratio'], r['passed'])}'>"
                         f"{label}</td>")
        out.append(f"<tr><th>{e(op)}</th>{''.join(cells)}</tr>")
    out.append("</table><p class='small'>* tolerance override (reason in the table below). "
               "(generic) / (partly generic) = the generic torch fallback served all / some of this op's calls "
               "(traced).</p>")
    out.append("<h2>Per op and dtype</h2><table><tr><th>op</th><th>dtype</th><th>result</th><th>cases</th>"
               "<th>max abs err</th><th>max rel err</th><th>atol</th><th>rtol</th><th>error ratio</th>"
               "<th>top-k recall</th><th>path</th><th>time vs generic</th><th>tolerance override</th></tr>")
    for r in records:
        res = "<span class='ok'>pass</span>" if r["passed"] else "<span class='bad'>FAIL</span>"
        path = _path(r)
        out.append(
            f"<tr><td>{e(r['op'])}</td><td>{e(r['dtype'])}</td><td>{res}</td><td>{r['cases']}</td>"
            f"<td>{_fmt(r['max_abs_err'])}</td><td>{_fmt(r['max_rel_err'])}</td><td>{_fmt(r['atol'])}</td>"
            f"<td>{_fmt(r['rtol'])}</td><td>{_fmt(r['error_ratio'])}</td><td>{e(_recall(r))}</td><td>{e(path)}</td>"
            f"<td>{e(_speed(r))}</td><td>{e(r['tolerance_override'] or '')}</td></tr>"
        )
    out.append("</table>")
    failed = [r for r in records if not r["passed"]]
    if failed:
        out.append("<h2>Failures</h2><ul>")
        out += [f"<li><code>{e(r['op'])}</code> {e(r['dtype'])}: {e(str(r['message'] or 'failed'))}</li>"
                for r in failed]
        out.append("</ul>")
    if cert.get("model"):
        out.append("<h2>End-to-end model</h2><table>")
        out += [f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v, '.4g'))}</td></tr>" for k, v in cert["model"].items()]
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_certificate(report_path: str | Path, out_dir: str | Path, env: dict[str, Any] | None = None) -> dict:
    """Read ``report_path``, write certificate.{json,md,html} into ``out_dir``; return the certificate."""
    cert = build_certificate(load_json(report_path), env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certificate.json").write_text(json.dumps(json_safe(cert), indent=2) + "\n", encoding="utf-8")
    (out / "certificate.md").write_text(render_markdown(cert), encoding="utf-8")
    (out / "certificate.html").write_text(render_html(cert), encoding="utf-8")
    return cert


# --------------------------------------------------------------------------------------------
# Diff


def diff_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per op x dtype rows comparing report (or certificate) ``a`` to ``b``, sorted by op, dtype."""
    ra = {(r["op"], r["dtype"]): r for r in _merge_cases(normalise_records(a))}
    rb = {(r["op"], r["dtype"]): r for r in _merge_cases(normalise_records(b))}
    rows = []
    for key in sorted(set(ra) | set(rb)):
        x, y = ra.get(key), rb.get(key)
        if x is None or y is None:
            change = "added" if x is None else "removed"
        elif x["passed"] != y["passed"]:
            change = "now passes" if y["passed"] else "now FAILS"
        else:
            change = "same"
        ratio_a = x["error_ratio"] if x else None
        ratio_b = y["error_ratio"] if y else None
        delta = ratio_b - ratio_a if ratio_a is not None and ratio_b is not None else None
        rows.append({
            "op": key[0], "dtype": key[1], "change": change,
            "passed_a": x["passed"] if x else None, "passed_b": y["passed"] if y else None,
            "ratio_a": ratio_a, "ratio_b": ratio_b, "ratio_delta": delta,
            "origin_a": x["origin"] if x else None, "origin_b": y["origin"] if y else None,
        })
    return rows


def render_diff(rows: list[dict[str, Any]], name_a: str, name_b: str) -> str:
    def res(p: bool | None) -> str:
        return "-" if p is None else ("pass" if p else "FAIL")

    lines = [f"A = {name_a}", f"B = {name_b}", "",
             f"{'op':<22} {'dtype':<6} {'A':<5} {'B':<5} {'ratio A':>9} {'ratio B':>9} {'delta':>9}  change"]
    for r in rows:
        delta = "-" if r["ratio_delta"] is None else f"{r['ratio_delta']:+.3f}"
        origin = f" (path {r['origin_a']} -> {r['origin_b']})" if r["origin_a"] != r["origin_b"] and r["origin_a"] \
            and r["origin_b"] else ""
        lines.append(f"{r['op']:<22} {r['dtype']:<6} {res(r['passed_a']):<5} {res(r['passed_b']):<5} "
                     f"{_fmt(r['ratio_a']):>9} {_fmt(r['ratio_b']):>9} {delta:>9}  {r['change']}{origin}")
    flips = sum(1 for r in rows if r["change"] in ("now passes", "now FAILS"))
    lines += ["", f"{len(rows)} op x dtype rows, {flips} pass/fail flips, "
              f"{sum(1 for r in rows if r['change'] in ('added', 'removed'))} added/removed"]
    return "\n".join(lines)
