"""sample: greedy rows exact, seeded rows reproducible, top_k=1 and tiny top_p equal greedy,
temperature far from 1 with top-k and top-p (nothing outside the support is drawn, every support
token of non-trivial mass is), and a fixed-seed frequency check."""

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
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.6], device=device)  # both sampled rows restrict their support
    runs = [ck.fn(logits, temperature, top_k, top_p, _generators(device, [11, 12, 13, 14])) for _ in range(2)]
    ck.exact("same generator seeds, same tokens", runs[1], runs[0])
    greedy = temperature.cpu() <= 0
    ck.exact("greedy rows", _is_argmax(logits, runs[0])[greedy], torch.ones(int(greedy.sum()), dtype=torch.bool))
    for b in (1, 3):
        probs = golden.sampling_distribution(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]))
        assert int((probs > 0).sum()) < V // 2, f"test data: row {b}'s support is not restricted"
        if probs[int(runs[0][b])] <= 0:
            ck.fail("sampled token", f"row {b} drew token {int(runs[0][b])}, outside the top-k/top-p support")


def _cold_row(gen: torch.Generator) -> torch.Tensor:
    """Eight tokens at 12 - j/16 (exact in every dtype), the rest in [-4, 4]. At temperature 0.1 the
    scaled logits are ~120 (exp overflows fp32 without the max subtraction) and the eight differ by
    0.625 steps: a softmax of real width, not a one-hot."""
    row = torch.rand(SUPPORT_V, generator=gen, dtype=torch.float64) * 8 - 4
    top = torch.randperm(SUPPORT_V, generator=gen)[:8]
    row[top] = 12.0 - torch.arange(8, dtype=torch.float64) / 16
    return row


def _hot_row(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(SUPPORT_V, generator=gen, dtype=torch.float64) * 1.5


SUPPORT_V, SUPPORT_DRAWS, MIN_MASS = 64, 1000, 0.01
SUPPORT_CASES = {
    # name: (row, temperature, top_k, top_p); golden support sizes in the comments
    "cold-T0.1-top_k6-top_p0.9": (_cold_row, 0.1, 6, 0.9),  # top-p cuts inside the top-6: 4 tokens
    "hot-T4-top_k5-top_p0.95": (_hot_row, 4.0, 5, 0.95),  # near-uniform: top-k binds, 5 tokens
    "hot-T4-top_k40-top_p0.49": (_hot_row, 4.0, 40, 0.49),  # top-p binds inside the top-40: 16 tokens
    "T1-top_p0.5": (_hot_row, 1.0, 0, 0.5),
}


@pytest.mark.parametrize("case", list(SUPPORT_CASES))
def test_sample_support(checker, dtype, device, case):
    """1000 seeded draws from one row, temperature far from 1 with top-k and top-p: no token outside
    the golden support is ever drawn, and every support token of probability >= 1% is drawn.

    A correct sampler misses a support token of probability p in all N draws with probability
    (1 - p)^N; the test computes the union bound over the support from the golden and requires it
    <= 1e-6 (it is below 1e-20 for these rows), so that is the false-failure probability of the
    fixed seeds for a correct implementation. Top-p margins are kept >= 2e-3 from every cumulative
    mass, so fp32 vs float64 rounding cannot move the cut."""
    ck = checker("sample", case)
    make_row, temperature, top_k, top_p = SUPPORT_CASES[case]
    row = make_row(generator("sample", case)).to(device=device, dtype=ck.dtype).unsqueeze(0)
    probs = golden.sampling_distribution(row[0], temperature, top_k, top_p)
    support = probs > 0
    # test data: a real restriction, real choices, and no cut within rounding of top_p
    assert 2 <= int(support.sum()) < SUPPORT_V, f"test data: support of {int(support.sum())} tokens"
    full = golden.sampling_distribution(row[0], temperature, top_k, 1.0)
    mass = torch.sort(full, descending=True).values.cumsum(0)
    assert bool(((mass - top_p).abs() >= 2e-3).all()) or top_p == 1.0, "test data: a cumulative mass near top_p"
    must = (probs >= MIN_MASS).nonzero().flatten().tolist()
    miss_bound = sum((1 - float(probs[t])) ** SUPPORT_DRAWS for t in must)
    assert miss_bound <= 1e-6, f"test data: false-failure bound {miss_bound:.2g}"

    B = SUPPORT_DRAWS
    tokens = ck.fn(row.expand(B, SUPPORT_V).contiguous(), *_args(device, B, temperature, top_k, top_p),
                   _generators(device, list(range(5000, 5000 + B))))
    ck.shape_dtype("tokens", tokens, (B,), torch.int64)
    counts = torch.bincount(tokens.cpu(), minlength=SUPPORT_V)
    outside = [t for t in range(SUPPORT_V) if counts[t] and not support[t]]
    ck.exact("tokens drawn outside the top-k/top-p support (token: draws)",
             {t: int(counts[t]) for t in outside}, {})
    never = [t for t in must if counts[t] == 0]
    ck.exact(f"support tokens of probability >= {MIN_MASS} never drawn in {B} draws (token: golden p)",
             {t: round(float(probs[t]), 4) for t in never}, {})


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
