"""The ``hwlayer`` command: ``hwlayer info`` and ``hwlayer ops [--backend X]``, each with --json.

Errors (unknown or unavailable backend, strict-mode refusal) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
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
    header = f"{'backend':<11} {'vendor':<14} {'device':<7} {'collective':<10} {'status':<12}"
    print(f"{header} reason / verified")
    for b in info["backends"]:
        status = "available" if b["available"] else "unavailable"
        row = f"{b['name']:<11} {b['vendor']:<14} {b['device_type']:<7} {b['dist_backend']:<10} {status:<12}"
        print(f"{row} {b['reason']}")
        if b["install_hint"]:
            print(f"{'':<57}install: {b['install_hint']}")
        print(f"{'':<57}verified: {b['verified']}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            info = _info()
            print(json.dumps(info, indent=2)) if args.json else _print_info(info)
        elif args.command == "ops":
            data = _ops(args.backend)
            print(json.dumps(data, indent=2)) if args.json else _print_ops(data)
    except (BackendError, PluginError, ValueError) as exc:
        print(f"hwlayer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
