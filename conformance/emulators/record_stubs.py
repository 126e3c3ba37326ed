"""Record the signatures of the torch_npu ops the Ascend adapters call, from a real torch-npu wheel.

torch_npu cannot be imported without Ascend's CANN runtime, but its wheel (pip-downloadable from
PyPI on any machine) ships the op prototypes as text: the docstrings in ``torch_npu/_op_plugin_docs.py``
and the meta kernels in ``torch_npu/op_plugin/meta/_meta_registrations.py``. This script reads them
from the wheel without importing anything and writes ``stubs/torch_npu-<version>.json``, which
``tests/test_emulators.py`` compares with the emulator's signatures::

    pip download --no-deps torch-npu==2.14.0 -d /tmp/npu
    python -m conformance.emulators.record_stubs /tmp/npu/torch_npu-2.14.0-*.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

# op -> where its public prototype is written in the wheel: the docstring's prototype line, or the
# Python meta kernel (whose parameters mirror the schema) where the docstring is an older variant.
SOURCES = {
    "npu_rms_norm": "doc",
    "npu_add_rms_norm": "meta:npu_add_rms_norm_meta",
    "npu_swiglu": "doc",
    "npu_rotary_mul": "doc",
    "npu_lightning_indexer": "meta:npu_lightning_indexer_forward",
    "npu_sparse_flash_attention": "meta:npu_sparse_flash_attention_forward",
    "npu_moe_gating_top_k": "doc",
    "npu_grouped_matmul": "doc",
    "npu_moe_init_routing_v2": "doc",
    "npu_moe_token_unpermute": "doc",
}
REQUIRED = "<required>"


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[0-9*+\-<() ]+", text):
            return eval(text, {"__builtins__": {}})  # noqa: S307 - digits and operators only
        return text


def _params(arg_text: str) -> list[dict]:
    params, kwonly = [], False
    for item in _split_top_level(arg_text):
        if item == "*":
            kwonly = True
            continue
        left, _, default = item.partition("=")
        name = left.split()[-1].strip()
        params.append({"name": name, "default": _value(default.strip()) if default else REQUIRED, "kwonly": kwonly})
    return params


def _doc_prototype(docs: str, op: str) -> tuple[list[dict], bool]:
    for line in docs.splitlines():
        m = re.match(rf"\s*(?:torch_npu\.)?{op}\((.*)\)\s*->", line)
        if m:
            return _params(m.group(1)), "*" in _split_top_level(m.group(1))
    raise LookupError(f"no prototype line for {op}")


def _meta_prototype(meta: str, fn: str) -> tuple[list[dict], bool]:
    tree = ast.parse(meta)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == fn:
            a = node.args
            pos = a.posonlyargs + a.args
            defaults = [REQUIRED] * (len(pos) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
            params = [{"name": p.arg, "default": d, "kwonly": False} for p, d in zip(pos, defaults, strict=True)]
            for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
                value = REQUIRED if d is None else _value(ast.unparse(d))
                params.append({"name": p.arg, "default": value, "kwonly": True})
            return params, bool(a.kwonlyargs)
    raise LookupError(f"no meta function {fn}")


def record(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        docs = zf.read("torch_npu/_op_plugin_docs.py").decode()
        meta = zf.read("torch_npu/op_plugin/meta/_meta_registrations.py").decode()
        version = re.search(r"__version__ = '([^']+)'", zf.read("torch_npu/version.py").decode()).group(1)
    ops = {}
    for op, where in SOURCES.items():
        if where.startswith("meta:"):
            params, explicit_kwonly = _meta_prototype(meta, where[5:])
        else:
            params, explicit_kwonly = _doc_prototype(docs, op)
        ops[op] = {"source": where, "kinds_recorded": explicit_kwonly, "params": params}
    return {"package": "torch-npu", "version": version, "wheel": wheel.name, "ops": ops}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith(".whl"):
        print("usage: python -m conformance.emulators.record_stubs TORCH_NPU_WHEEL.whl", file=sys.stderr)
        return 2
    stubs = record(Path(argv[0]))
    out = Path(__file__).parent / "stubs" / f"torch_npu-{stubs['version']}.json"
    out.write_text(json.dumps(stubs, indent=1, default=str) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
