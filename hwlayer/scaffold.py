"""``hwlayer new-backend NAME``: scaffold an installable backend plugin package.

The package (``hwlayer-NAME/``) is built from the templates in ``hwlayer/templates/backend/``:
a pyproject with the ``hwlayer`` entry point, a backend declaration that runs on the CPU device
until the vendor fills in detection, an ops module overriding one op (``rms_norm``, with its
``supports()``), a README on running conformance, and a smoke test. Installed as generated, it
passes ``hwlayer conformance --backend NAME`` on CPU.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from .hookspecs import HOOKSPEC_VERSION

TEMPLATE_DIR = Path(__file__).parent / "templates" / "backend"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")

# template file -> path inside hwlayer-NAME/ (NAME substituted)
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "init.py.tmpl": "hwlayer_${name}/__init__.py",
    "plugin.py.tmpl": "hwlayer_${name}/plugin.py",
    "ops.py.tmpl": "hwlayer_${name}/ops.py",
    "test_plugin.py.tmpl": "tests/test_plugin.py",
}


class ScaffoldError(ValueError):
    """Bad backend name, a name already taken, or an existing target directory (one-line message)."""


def check_name(name: str, registered: set[str] | None = None) -> None:
    """Raise ScaffoldError unless ``name`` is a usable, unclaimed backend name."""
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise ScaffoldError(
            f"invalid backend name {name!r}: expected 2-32 characters of lower-case letters, digits and '_', "
            "starting with a letter (it becomes GLM_BACKEND=NAME and the package hwlayer_NAME)"
        )
    if registered is None:
        from .registry import registry

        registered = set(registry().backends)
    if name in registered:
        raise ScaffoldError(
            f"backend name {name!r} is already registered (registered: {', '.join(sorted(registered))}); "
            "pick another name"
        )


def render_files(name: str, vendor: str, device_type: str, dist_backend: str) -> dict[str, str]:
    """{relative path: file text} of the package, without touching the disk."""
    values = {
        "name": name,
        "vendor": vendor,
        "device_type": device_type,
        "dist_backend": dist_backend,
        "vendor_module": f"torch_{name}",
        "hookspec_version": HOOKSPEC_VERSION,
    }
    return {
        Template(rel).substitute(values): Template((TEMPLATE_DIR / tmpl).read_text(encoding="utf-8")).substitute(values)
        for tmpl, rel in FILES.items()
    }


def new_backend(
    name: str,
    out: str | Path = ".",
    *,
    vendor: str | None = None,
    device_type: str | None = None,
    dist_backend: str | None = None,
) -> Path:
    """Create ``out/hwlayer-NAME/`` and return its path."""
    check_name(name)
    for label, value in (("--device-type", device_type), ("--dist-backend", dist_backend)):
        if value is not None and not re.match(r"^[a-z][a-z0-9_]*$", value):
            raise ScaffoldError(f"invalid {label} {value!r}: expected a lower-case identifier such as 'npu' or 'hccl'")
    if vendor is not None and (not vendor.strip() or any(c in vendor for c in "\"\\\n")):
        raise ScaffoldError(f"invalid --vendor {vendor!r}: expected a plain name without quotes or backslashes")
    target = Path(out) / f"hwlayer-{name}"
    if target.exists():
        raise ScaffoldError(f"target directory {target} already exists; remove it or choose another --out")
    files = render_files(name, vendor or name, device_type or name, dist_backend or "gloo")
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
