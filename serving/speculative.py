"""MTP speculative decoding in the engine: the flag, the drafter and the acceptance rule.

    serve.py --speculative-config '{"method": "mtp", "num_speculative_tokens": 1}'

Each step the target model verifies a decoding sequence's pending token and its ``k`` draft tokens
in ONE forward (``1 + k`` rows, the same step as every other sequence's decode or prefill chunk),
then the checkpoint's MTP layer (``model.mtp``, the one :func:`model.generate.generate_speculative`
uses, same input convention: row ``i`` pairs the target's final hidden state ``h_i`` with token
``i + 1`` and predicts token ``i + 2``) runs over the same rows and proposes the next draft from the
last accepted row. The MTP layer's own cache layer is written for every row the target computes
(prefill chunks included), so its attention always sees the whole context. With
``num_speculative_tokens`` N > 1 the MTP layer is applied again on its own output (vLLM's way of
chaining one MTP layer), one extra draft token per application.

Acceptance is the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) with
a deterministic draft (the MTP's argmax, i.e. ``q`` puts all mass on the draft token ``d``):
accept ``d`` with probability ``p(d)`` under the target's distribution at that position (after
temperature, top-k, top-p); on the first rejection sample from ``p`` with ``d`` removed
(``max(0, p - q)`` renormalised); when all ``k`` are accepted sample a bonus token from the last
row. So the emitted tokens follow the target distribution exactly, and a greedy request (temperature
0) emits exactly what it would without speculation: drafts are accepted while they equal the
target's argmax, then the argmax follows.

Sequences with logits processors, logprobs or a grammar decode without drafts (their processed
distribution is not what the rule above verifies against).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

METHODS = ("mtp",)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """vLLM's ``--speculative-config`` JSON -> :class:`SpeculativeConfig`; ``ValueError`` (one line) when bad."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{text!r}: not JSON ({exc.msg}); expected e.g. "
                         '\'{"method": "mtp", "num_speculative_tokens": 1}\'') from None
    if not isinstance(raw, dict):
        raise ValueError(f"{text!r}: expected a JSON object with method and num_speculative_tokens")
    unknown = sorted(set(raw) - {"method", "num_speculative_tokens"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; this server reads method and num_speculative_tokens")
    method = raw.get("method")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported; expected one of {', '.join(METHODS)} (the "
                         "checkpoint's MTP layer drafts)")
    n = raw.get("num_speculative_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 8:
        raise ValueError(f"num_speculative_tokens {n!r}: expected an integer in [1, 8]")
    return SpeculativeConfig(method, n)


def uses_drafts(seq: Any) -> bool:
    """Whether ``seq`` decodes with drafts (see the module docstring for which do not)."""
    p = seq.params
    return not (p.needs_processing or p.logprobs is not None or seq.matcher is not None)


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """fp32 ``[R, V]``: the distribution ``plan.sample`` draws from (temperature, top-k, top-p) for
    rows with temperature > 0. Same conventions as :func:`hwlayer.ops.sampling.sample`."""
    R, V = logits.shape
    scaled = logits.float() / temperature.float().clamp(min=1e-5).unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where((top_k > 0) & (top_k < V), top_k.long(), V).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p.float().unsqueeze(1), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, sorted_ids, probs)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` by the exponential race (as ``plan.sample`` draws)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def verify_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection-sampling verification of one sequence: ``probs`` ``[k + 1, V]`` (the target's
    distribution at the pending token and at each draft), ``drafts`` the ``k`` draft tokens.
    Returns ``(accepted, token)``: how many drafts were accepted, and the token that follows them
    (the resampled one at the first rejection, or the bonus token)."""
    k = len(drafts)
    d = torch.tensor(drafts, dtype=torch.int64, device=probs.device)
    p_draft = probs[:k].gather(1, d.unsqueeze(1)).squeeze(1)
    u = torch.rand(k, generator=generator, device=probs.device)
    residual = probs[:k].scatter(1, d.unsqueeze(1), 0.0)
    residual = residual / residual.sum(-1, keepdim=True).clamp(min=1e-30)
    candidates = _draw(torch.cat([residual, probs[k:]]), generator)  # per row: resample, then the bonus
    accepted_mask = (u < p_draft).tolist()  # one host read per sequence, after everything is queued
    accepted = next((j for j, ok in enumerate(accepted_mask) if not ok), k)
    return accepted, int(candidates[accepted])


def verify_greedy(argmax: list[int], drafts: list[int]) -> tuple[int, int]:
    """Greedy verification: drafts accepted while they equal the target's argmax, then its argmax."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == argmax[accepted]:
        accepted += 1
    return accepted, argmax[accepted]
