"""The ``hwlayer`` command: ``hwlayer info`` and ``hwlayer ops [--backend X]``, each with --json;
``hwlayer new-backend NAME`` (scaffold a plugin package), ``hwlayer conformance --backend NAME``
(run the conformance suite and write a certificate) and ``hwlayer conformance diff A.json B.json``.

Errors (unknown or unavailable backend, strict-mode refusal, bad names or files) print one line and
exit with status 2. ``hwlayer conformance`` exits 1 when any op fails conformance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .dispatch import BackendError, plan, select_backend
from .hookspecs import HOOKSPEC_VERSION
from .registry import PluginError, registry


def _info() -> dict[str, Any]:
    import torch

    reg = registry()
    try:
        chosen: str | None = select_backend(None, reg).name
        choice_error = None
    except BackendError as exc:
        chosen, choice_error = None, str(exc)
    backends = []
    for name, b in sorted(reg.backends.items(), key=lambda kv: -kv[1].priority):
        status = b.availability()
        backends.append(
            {
                "name": name,
                "vendor": b.vendor,
                "device_type": b.device_type,
                "dist_backend": b.dist_backend,
                "visible_devices_env": b.visible_devices_env,
                "priority": b.priority,
                "available": status.available,
                "reason": status.reason,
                "install_hint": b.install_hint if not status.available else "",
                "verified": b.verified,
                "device_graph": b.device_graph.api if b.device_graph else None,
                "device_graph_verified": b.device_graph.verified if b.device_graph else None,
                "weight_formats": list(b.native_weight_formats()),
                "cache_layout": b.layout().name,
                "plugin": reg.backend_plugins[name],
            }
        )
    return {
        "hwlayer": __version__,
        "hookspec_version": HOOKSPEC_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "plugins": reg.plugins,
        "skipped_plugins": reg.skipped,
        "chosen_backend": chosen,
        "choice_error": choice_error,
        "backends": backends,
    }


def _print_info(info: dict[str, Any]) -> None:
    print(f"hwlayer {info['hwlayer']} (hook specs {info['hookspec_version']}), torch {info['torch']}, "
          f"python {info['python']} on {info['machine']}")
    print(f"CUDA-visible devices: {info['cuda_devices']}")
    print(f"chosen backend: {info['chosen_backend'] or 'none (' + str(info['choice_error']) + ')'}")
    print()
    vw = max([len("vendor"), *(len(b["vendor"]) for b in info["backends"])])
    header = f"{'backend':<11} {'vendor':<{vw}} {'device':<7} {'collective':<10} {'status':<12}"
    indent = " " * (len(header) + 1)
    print(f"{header} reason / verified")
    for b in info["backends"]:
        status = "available" if b["available"] else "unavailable"
        row = f"{b['name']:<11} {b['vendor']:<{vw}} {b['device_type']:<7} {b['dist_backend']:<10} {status:<12}"
        print(f"{row} {b['reason']}")
        if b["install_hint"]:
            print(f"{indent}install: {b['install_hint']}")
        print(f"{indent}verified: {b['verified']}")
        graph = f"{b['device_graph']} ({b['device_graph_verified']})" if b["device_graph"] else "none (eager steps)"
        print(f"{indent}device graphs: {graph}")
        print(f"{indent}weight formats: {', '.join(b['weight_formats'])}")
        print(f"{indent}cache layout: {b['cache_layout']}")
    for name, why in info["skipped_plugins"].items():
        print(f"skipped plugin {name}: {why}")


def _ops(backend: str | None) -> dict[str, Any]:
    p = plan(backend)
    return {
        "backend": p.backend.name,
        "device": str(p.device),
        "ops": [e.__dict__ for e in p.entries.values()],
        "fallbacks": p.fallbacks(),
    }


def _print_ops(data: dict[str, Any]) -> None:
    print(f"dispatch plan for backend {data['backend']} (device {data['device']})")
    print(f"{'op':<22} {'origin':<26} {'implementation':<52} reason")
    for e in data["ops"]:
        print(f"{e['op']:<22} {e['origin']:<26} {e['implementation']:<52} {e['reason']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwlayer", description="GLM-5 hardware-abstraction layer")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="torch, devices, every registered backend and the chosen one")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_ops = sub.add_parser("ops", help="the dispatch plan: op -> implementation, native or fallback")
    p_ops.add_argument("--backend", default=None, help="backend name (default: GLM_BACKEND or auto-detect)")
    p_ops.add_argument("--json", action="store_true", help="machine-readable output")

    p_new = sub.add_parser("new-backend", help="scaffold an installable backend plugin package hwlayer-NAME/")
    p_new.add_argument("name", help="backend name: lower case, starts with a letter, [a-z0-9_], 2-32 characters")
    p_new.add_argument("--out", default=".", help="directory to create hwlayer-NAME/ in (default: .)")
    p_new.add_argument("--vendor", default=None, help="hardware vendor (default: NAME)")
    p_new.add_argument("--device-type", default=None, help="torch device type of the hardware (default: NAME)")
    p_new.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: gloo)")

    p_conf = sub.add_parser(
        "conformance",
        help="run the conformance suite on a backend and write a certificate; or 'conformance diff A B'",
        description="Run `pytest conformance/ --backend NAME --report OUT/report.json`, then write "
        "OUT/certificate.{json,md,html}. Arguments after `--` go to pytest (e.g. `-- -k rms_norm`).",
    )
    p_conf.add_argument("--backend", default=None, help="backend to certify (required unless 'diff')")
    p_conf.add_argument("--out", default="conformance-report", help="output directory (default: conformance-report)")
    p_conf.add_argument("--dtype", action="append", default=None,
                        help="restrict to a dtype (repeatable), passed to the suite as --dtype")
    conf_sub = p_conf.add_subparsers(dest="conf_command")
    p_diff = conf_sub.add_parser("diff", help="per op x dtype changes between two reports or certificates")
    p_diff.add_argument("a", help="report.json or certificate.json (before)")
    p_diff.add_argument("b", help="report.json or certificate.json (after)")
    p_diff.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def conformance_suite_dir() -> Path | None:
    """The conformance suite: $HWLAYER_CONFORMANCE_DIR, else ../conformance next to the hwlayer package
    (a source checkout or an editable install). None when not found, as from a wheel: the suite is a
    pytest tree with its goldens and tolerances, kept in the checkout rather than installed as a
    top-level ``conformance`` package with pytest as a runtime dependency."""
    override = os.environ.get("HWLAYER_CONFORMANCE_DIR")
    suite = Path(override) if override else Path(__file__).resolve().parent.parent / "conformance"
    return suite if (suite / "conftest.py").is_file() else None


def _run_conformance(backend: str, out: str, dtypes: list[str] | None, pytest_args: list[str]) -> int:
    from .certificate import environment, write_certificate
    from .dispatch import select_backend

    select_backend(backend)  # unknown / unavailable backend: one line, exit 2, before a long run
    suite = conformance_suite_dir()
    if suite is None:
        raise ValueError("conformance suite not found: it is not part of the wheel; run from a source checkout "
                         "(pip install -e '.[dev]' in it) or set HWLAYER_CONFORMANCE_DIR to its conformance/ folder")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.json"
    report.unlink(missing_ok=True)  # never certify a stale report
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
           "--backend", backend, "--report", str(report)]
    for d in dtypes or []:
        cmd += ["--dtype", d]
    cmd += pytest_args
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=suite.parent)
    if not report.is_file():
        raise ValueError(f"conformance run wrote no report (pytest exit status {rc}); see the pytest output above")
    cert = write_certificate(report, out_dir, environment(backend))
    s = cert["summary"]
    print(f"certificate: {out_dir / 'certificate.html'} (also .md, .json); {s['records']} op x dtype records, "
          f"{len(s['failed'])} failed, highest error ratio {s['max_error_ratio']}")
    if s["failed"]:
        print(f"hwlayer: conformance FAILED for {backend}: {', '.join(s['failed'])}", file=sys.stderr)
        return 1
    if rc != 0:
        print(f"hwlayer: pytest exited with status {rc} although every recorded op passed", file=sys.stderr)
        return 1
    return 0


def _conformance_diff(a: str, b: str, as_json: bool) -> int:
    from .certificate import diff_reports, load_json, render_diff

    rows = diff_reports(load_json(a), load_json(b))
    print(json.dumps(rows, indent=2)) if as_json else print(render_diff(rows, a, b))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` goes to pytest (hwlayer conformance only).
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from .certificate import CertificateError
    from .scaffold import ScaffoldError

    try:
        if args.command == "new-backend":
            from .scaffold import new_backend

            target = new_backend(args.name, args.out, vendor=args.vendor, device_type=args.device_type,
                                 dist_backend=args.dist_backend)
            print(f"created {target}")
            print(f"next: pip install -e {target} && hwlayer conformance --backend {args.name} --out report")
        elif args.command == "conformance":
            if args.conf_command == "diff":
                return _conformance_diff(args.a, args.b, args.json)
            if not args.backend:
                raise ValueError("conformance needs --backend NAME (or the 'diff A.json B.json' subcommand)")
            return _run_conformance(args.backend, args.out, args.dtype, pytest_args)
        elif args.command == "info":
            info = _info()
            print(json.dumps(info, indent=2)) if args.json else _print_info(info)
        elif args.command == "ops":
            data = _ops(args.backend)
            print(json.dumps(data, indent=2)) if args.json else _print_ops(data)
    except (BackendError, PluginError, ValueError, CertificateError, ScaffoldError) as exc:
        print(f"hwlayer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
