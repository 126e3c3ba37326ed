"""hwlayer example backend: one op override, the rest from hwlayer's generic implementations.

The two hooks below are the entire plugin interface. ``silu_and_mul`` is overridden by a version
that computes in fp32 (one rounding at the end, where the generic op rounds twice in bf16/fp16),
and declares through ``supports`` which calls it takes: contiguous inputs only. A declined call
goes to the generic implementation; ``hwlayer ops --backend example`` shows the op as
``native+fallback``.
"""

from __future__ import annotations

from typing import Callable

import torch

from hwlayer import Availability, Backend, hookimpl

HWLAYER_HOOKSPEC_VERSION = "2.0"


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` on the last dim, computed in fp32."""
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def silu_and_mul_supports(x: torch.Tensor) -> bool | str:
    """Take contiguous inputs with an even last dim; say why otherwise."""
    if not x.is_contiguous():
        return "non-contiguous input (this example handles only contiguous tensors)"
    if x.shape[-1] % 2:
        return f"odd last dim {x.shape[-1]}"
    return True


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(
        Backend(
            name="example",
            vendor="hwlayer example",
            device_type="cpu",
            dist_backend="gloo",
            detect=lambda: Availability(True, "pure torch; runs wherever torch does"),
            priority=-50,  # below the cpu reference: chosen only by name
            verified="conformance run on CPU (silu_and_mul only)",
            description="example out-of-tree plugin overriding silu_and_mul",
        )
    )


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    register("silu_and_mul", silu_and_mul, backend="example", supports=silu_and_mul_supports)
