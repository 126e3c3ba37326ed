"""Record the signatures of the vendor functions the adapters call, from the vendors' own files.

* torch_npu cannot be imported without Ascend's CANN runtime, but its wheel (pip-downloadable from
  PyPI on any machine) ships the op prototypes as text: the docstrings in
  ``torch_npu/_op_plugin_docs.py`` and the meta kernels in
  ``torch_npu/op_plugin/meta/_meta_registrations.py``. Read from the wheel without importing::

      pip download --no-deps torch-npu==2.14.0 -d /tmp/npu
      python -m conformance.emulators.record_stubs /tmp/npu/torch_npu-2.14.0-*.whl

* The other libraries are not installable here (no CPU wheels on PyPI); their Python interfaces are
  read from a git checkout at a named commit, without importing (``ast``; pybind ``m.def`` blocks
  with ``py::arg`` for DeepGEMM)::

      python -m conformance.emulators.record_stubs --git NAME REPO_DIR COMMIT PATH FUNCTION [FUNCTION...]

Both write ``stubs/<name>.json``, which ``tests/test_backends_emulated.py`` compares with the
emulators' signatures.
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
            return eval(text, {"__builtins__": {}})
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


def _pybind_prototype(source: str, fn: str) -> tuple[list[dict], bool]:
    """``m.def("fn", &impl, py::arg("a"), py::arg("b") = default, ...)`` -> parameters."""
    m = re.search(rf'm\.def\("{fn}",\s*&\w+,(.*?)\);', source, re.S)
    if m is None:
        raise LookupError(f"no m.def for {fn}")
    params = []
    for name, default in re.findall(r'py::arg\("(\w+)"\)(?:\s*=\s*([^,)]+))?', m.group(1)):
        value = {"true": True, "false": False, "std::nullopt": None}.get(default.strip(), default.strip())
        params.append({"name": name, "default": _value(str(value)) if default else REQUIRED, "kwonly": False})
    return params, False


def record_git(name: str, repo: Path, commit: str, path: str, functions: list[str]) -> dict:
    import subprocess

    source = subprocess.run(["git", "--git-dir", str(repo), "show", f"{commit}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    ops = {}
    for fn in functions:
        params, kw = _pybind_prototype(source, fn) if path.endswith((".hpp", ".cpp")) else _meta_prototype(source, fn)
        ops[fn] = {"source": path, "kinds_recorded": True, "params": params}
    return {"package": name, "commit": commit, "path": path, "ops": ops}


def main(argv: list[str]) -> int:
    stubs_dir = Path(__file__).parent / "stubs"
    if len(argv) >= 6 and argv[0] == "--git":
        name, repo, commit, path, *functions = argv[1:]
        stubs = record_git(name, Path(repo), commit, path, functions)
        out = stubs_dir / f"{name}.json"
    elif len(argv) == 1 and argv[0].endswith(".whl"):
        stubs = record(Path(argv[0]))
        out = stubs_dir / f"torch_npu-{stubs['version']}.json"
    else:
        print("usage: python -m conformance.emulators.record_stubs TORCH_NPU_WHEEL.whl\n"
              "       python -m conformance.emulators.record_stubs --git NAME REPO_GIT_DIR COMMIT PATH FUNCTION...",
              file=sys.stderr)
        return 2
    out.write_text(json.dumps(stubs, indent=1, default=str) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
