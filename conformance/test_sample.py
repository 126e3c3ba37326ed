"""sample: greedy rows exact, seeded rows reproducible, top_k=1 and tiny top_p equal greedy,
sampled tokens inside the top-k / top-p support, and a fixed-seed frequency check."""

from __future__ import annotations

import math

import pytest
import torch

from . import golden
from .cases import generator, randn
from .checks import Tolerance

V = 50


def _generators(device: torch.device, seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _args(device, B, temperature, top_k, top_p):
    return (
        torch.tensor(temperature, dtype=torch.float32, device=device).expand(B).contiguous(),
        torch.tensor(top_k, dtype=torch.int64, device=device).expand(B).contiguous(),
        torch.tensor(top_p, dtype=torch.float32, device=device).expand(B).contiguous(),
    )


def _is_argmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row: the token's logit equals the row maximum (ties may pick any maximum)."""
    lf = golden._f64(logits)
    return lf.gather(1, tokens.cpu().long().view(-1, 1)).squeeze(1) == lf.max(-1).values


@pytest.mark.parametrize(
    "case, temperature, top_k, top_p",
    [("greedy", 0.0, 0, 1.0), ("top_k=1", 1.0, 1, 1.0), ("tiny-top_p", 1.0, 0, 1e-6)],
)
def test_sample_equals_greedy(checker, dtype, device, case, temperature, top_k, top_p):
    ck = checker("sample", case)
    B = 6
    logits = randn(generator("sample", case, dtype), (B, V), ck.dtype, device, scale=3.0)
    gens = _generators(device, list(range(B))) if temperature > 0 else None
    tokens = ck.fn(logits, *_args(device, B, temperature, top_k, top_p), gens)
    ck.shape_dtype("tokens", tokens, (B,), torch.int64)
    ck.exact("argmax rows", _is_argmax(logits, tokens), torch.ones(B, dtype=torch.bool))
    if case == "greedy":
        ck.time(logits, *_args(device, B, temperature, top_k, top_p), gens)


def test_sample_seeded_rows_reproducible(checker, dtype, device):
    ck = checker("sample", "seeded-mixed-batch")
    B = 4
    logits = randn(generator("sample", "seeded", dtype), (B, V), ck.dtype, device)
    temperature = torch.tensor([0.0, 0.8, 0.0, 1.3], device=device)
    top_k = torch.tensor([0, 10, 5, 0], dtype=torch.int64, device=device)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0], device=device)
    runs = [ck.fn(logits, temperature, top_k, top_p, _generators(device, [11, 12, 13, 14])) for _ in range(2)]
    ck.exact("same generator seeds, same tokens", runs[1], runs[0])
    greedy = temperature.cpu() <= 0
    ck.exact("greedy rows", _is_argmax(logits, runs[0])[greedy], torch.ones(int(greedy.sum()), dtype=torch.bool))
    for b in (1, 3):
        probs = golden.sampling_distribution(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]))
        if probs[int(runs[0][b])] <= 0:
            ck.fail("sampled token", f"row {b} drew token {int(runs[0][b])}, outside the top-k/top-p support")


@pytest.mark.parametrize("case, top_k, top_p", [("top_k=3", 3, 1.0), ("top_p=0.5", 0, 0.5)])
def test_sample_support(checker, dtype, device, case, top_k, top_p):
    """Many seeded draws from one row: every token drawn has golden probability > 0."""
    ck = checker("sample", case)
    B = 200
    row = randn(generator("sample", case, dtype), (1, V), ck.dtype, device, scale=2.0)
    tokens = ck.fn(row.expand(B, V).contiguous(), *_args(device, B, 1.0, top_k, top_p),
                   _generators(device, list(range(1000, 1000 + B))))
    probs = golden.sampling_distribution(row[0], 1.0, top_k, top_p)
    drawn = sorted(set(tokens.cpu().tolist()))
    ck.exact("tokens drawn outside the support", [t for t in drawn if probs[t] <= 0], [])


def test_sample_distribution(checker, dtype, device):
    """Frequencies of 4000 seeded draws match the golden distribution (fixed seeds: no flakes).
    Bound per token: 5 standard errors of a binomial proportion."""
    ck = checker("sample", "distribution")
    B, vocab = 4000, 6
    row = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -3.0]], dtype=torch.float64).to(device=device, dtype=ck.dtype)
    temperature, top_p = 0.7, 0.95
    tokens = ck.fn(row.expand(B, vocab).contiguous(), *_args(device, B, temperature, 0, top_p),
                   _generators(device, list(range(B))))
    probs = golden.sampling_distribution(row[0], temperature, 0, top_p)
    freq = torch.bincount(tokens.cpu(), minlength=vocab).double() / B
    bound = 5 * math.sqrt(0.25 / B)
    ck.close("token frequencies", freq, probs, tol=Tolerance(atol=bound, rtol=0.0))
