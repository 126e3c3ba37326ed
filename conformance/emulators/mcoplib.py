"""CPU emulation of MetaX ``mcoplib``: the package and its ``_C`` extension.

MetaX-MACA/mcoplib f722323 (2026-02-09): ``mcoplib/__init__.py`` only checks versions; it does not
import ``mcoplib._C``. The vLLM-compatible ``torch.ops._C`` ops are registered when ``mcoplib._C`` is
imported, which vLLM-metax 3aadf08 (2026-08-05) does explicitly (``vllm_metax/platform.py``,
``import_kernels``: ``import mcoplib._C``). The emulation keeps that split: ``import mcoplib`` alone
registers nothing.
"""

from __future__ import annotations

import types

from . import vllm_c
from ._common import fill


def install_package(module: types.ModuleType) -> None:
    fill(module, "MetaX-MACA/mcoplib f722323 (2026-02-09): package without _C", "0.0.0+emulated")


def install_extension(module: types.ModuleType) -> None:
    vllm_c.register()
    fill(module, "MetaX-MACA/mcoplib f722323 op/vllm/torch_bindings.cpp", "0.0.0+emulated")
