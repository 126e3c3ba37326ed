"""Logits processors that run before hwlayer's ``sample`` op, and the logprobs a request asks for.

Each processor works on the whole ready batch at once (one ``[B, V]`` logits tensor on the device)
and touches only the rows that asked for it; the per-row data (token ids, biases) is built on the
host once per step and moved in one transfer per processor. Order, as in vLLM: ``logit_bias``,
``min_tokens`` (stop tokens banned until enough tokens exist), the repetition / frequency /
presence penalties, the grammar mask (structured output), then ``min_p``. Temperature, top-k and
top-p stay inside ``sample`` (its contract is unchanged).

Semantics (OpenAI / vLLM):

* ``presence_penalty`` p, ``frequency_penalty`` f (both in [-2, 2]): ``logit -= f * count + p * (count > 0)``
  over the tokens generated so far.
* ``repetition_penalty`` r > 0 (1 disables): a token seen in the prompt or the output has its logit
  divided by r when positive, multiplied by r when negative.
* ``logit_bias`` {token id: bias in [-100, 100]}: added to the logit.
* ``min_p`` m in [0, 1]: tokens whose probability (after temperature) is below m x the top token's are dropped.
* logprobs are those of the model's raw distribution (``log_softmax`` of the logits before any
  processor), like vLLM's default ``raw_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> None:
    rows, cols, vals = [], [], []
    for b, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            rows.append(b)
            cols.append(token)
            vals.append(value)
    if rows:
        device = logits.device
        logits.index_put_((_row_index(rows, device), _row_index(cols, device)),
                          torch.tensor(vals, dtype=logits.dtype, device=device), accumulate=True)


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> None:
    """``logits[b, t] = -inf`` for every ``t`` in ``banned[b]`` (min_tokens: the stop tokens)."""
    rows = [b for b, tokens in enumerate(banned) for _ in tokens]
    if rows:
        cols = [t for tokens in banned for t in tokens]
        logits[_row_index(rows, logits.device), _row_index(cols, logits.device)] = float("-inf")


def apply_penalties(logits: torch.Tensor, rows: list[int], prompts: list[list[int]], outputs: list[list[int]],
                    presence: list[float], frequency: list[float], repetition: list[float]) -> None:
    """The three penalties on ``logits[rows]`` (in place); ``prompts`` / ``outputs`` / the factors per row."""
    if not rows:
        return
    device, V = logits.device, logits.shape[1]
    idx = _row_index(rows, device)
    sub = logits[idx].float()

    def counts_of(lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(ids) for ids in lists))
        padded = torch.full((len(lists), width), V, dtype=torch.int64)  # V: a spare column for the padding
        for r, ids in enumerate(lists):
            padded[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        counts = torch.zeros(len(lists), V + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, dtype=torch.float32, device=device))
        return counts[:, :V]

    out_counts = counts_of(outputs)
    if any(r != 1.0 for r in repetition):  # decided on the host: no device read
        rep = torch.tensor(repetition, dtype=torch.float32, device=device).unsqueeze(1)
        seen = (counts_of(prompts) > 0) | (out_counts > 0)
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor(frequency, dtype=torch.float32, device=device).unsqueeze(1)
    pres = torch.tensor(presence, dtype=torch.float32, device=device).unsqueeze(1)
    sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    logits[idx] = sub.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, rows: list[int], min_p: list[float], temperature: list[float]) -> None:
    """Drop tokens below ``min_p`` x the top probability (after temperature) in ``logits[rows]`` (in place)."""
    if not rows:
        return
    device = logits.device
    idx = _row_index(rows, device)
    sub = logits[idx].float()
    temp = torch.tensor(temperature, dtype=torch.float32, device=device).clamp(min=1e-5).unsqueeze(1)
    probs = (sub / temp).softmax(-1)
    threshold = torch.tensor(min_p, dtype=torch.float32, device=device).unsqueeze(1) * probs.amax(-1, keepdim=True)
    logits[idx] = sub.masked_fill(probs < threshold, float("-inf")).to(logits.dtype)


def logprobs_of(raw_logits: torch.Tensor, rows: list[int], chosen: torch.Tensor, chosen_ids: list[int],
                num_top: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens of ``rows`` and each row's ``num_top`` best alternatives
    (one device-to-host copy). ``chosen``: the sampled ids of the whole batch on the device; ``chosen_ids``:
    the same on the host."""
    device = raw_logits.device
    idx = _row_index(rows, device)
    logp = raw_logits[idx].float().log_softmax(-1)
    picked = logp.gather(1, chosen[idx].unsqueeze(1)).squeeze(1)
    k = max(num_top) if num_top else 0
    if k > 0:
        top_vals, top_ids = logp.topk(k, dim=-1)
        host = torch.cat([picked.unsqueeze(1).double(), top_vals.double(), top_ids.double()], dim=1).tolist()
    else:
        host = [[v] for v in picked.tolist()]
    out = []
    for r, row in enumerate(host):
        top = [(int(row[1 + k + j]), row[1 + j]) for j in range(num_top[r])]
        out.append(TokenLogprob(chosen_ids[rows[r]], row[0], top))
    return out
