"""Sampling: ``sample``, one token per row (greedy, temperature, top-k, top-p, per-row generators)."""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    ``logits``: ``[B, V]``; ``temperature``: fp32 ``[B]`` (``<= 0`` means greedy argmax);
    ``top_k``: int ``[B]`` (``<= 0`` or ``>= V`` disables); ``top_p``: fp32 ``[B]`` in ``(0, 1]``
    (1 disables; the smallest prefix of the sorted distribution whose mass reaches ``top_p`` is
    kept, at least one token). ``generators[b]``, when given, makes row ``b`` reproducible
    (same generator state, same logits -> same token); ``None`` rows use the default generator.
    Returns int64 ``[B]``. Draws by the exponential race ``argmax(p / Exp(1))``. Reads nothing
    on the host.
    """
    op = "sample"
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    B, V = logits.shape
    check_tensor(op, "temperature", temperature, ndim=1, shape=[B])
    check_tensor(op, "top_k", top_k, ndim=1, dtypes=INDEX_DTYPES, shape=[B])
    check_tensor(op, "top_p", top_p, ndim=1, shape=[B])
    if generators is not None and len(generators) != B:
        fail(op, "generators", f"{B} entries", len(generators))
    logits = logits.float()
    greedy_ids = logits.argmax(-1)
    greedy = temperature <= 0
    # Both answers are computed and picked per row on the device: an "all greedy?" shortcut would
    # read the device on the host (callers that know it on the host may call argmax themselves).
    scaled = logits / temperature.float().clamp(min=1e-5).unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where((top_k > 0) & (top_k < V), top_k.long(), V).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p.float().unsqueeze(1), 0.0)
    noise = torch.empty_like(probs)
    if generators is None or all(g is None for g in generators):
        noise.exponential_()
    else:
        for b, g in enumerate(generators):  # per row (request), never per token
            noise[b].exponential_(generator=g)
    choice = (probs / noise).argmax(-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    return torch.where(greedy, greedy_ids, sampled)
