"""Generation on a GLM5 model: scoring, greedy decoding, MTP speculative decoding.

The network lives in :mod:`model.glm5` (layers, ``context``, ``hidden_states``, ``logits``,
``forward_batch``); this module drives it, as DeepSeek-V3.2 keeps ``generate.py`` beside
``model.py``. Every function takes the model as its first argument and uses a private paged cache
that is dropped afterwards (the server's engine manages its own cache and batches instead).

    from model import load_model, generate, generate_speculative, score
    m = load_model(path)
    logits = score(m, ids)                                # [B, T] -> fp32 [B, T, vocab]
    tokens = generate(m, ids, max_new_tokens=32)          # [B, T] -> [B, T + new]
    result = generate_speculative(m, ids, max_new_tokens=32)
    result.tokens, result.acceptance_rate                 # same tokens as generate()

Input ids are an integer tensor ``[B, T]`` (or ``[T]``), or a list of token lists (sequences of
different lengths); outputs follow the input's form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .glm5 import GLM5, Batch, PagedCache

BLOCK_SIZE = 64  # of the private cache


@dataclass(frozen=True)
class SpeculativeResult:
    """What :func:`generate_speculative` returns: the tokens (exactly those of :func:`generate`)
    and how the MTP drafts fared. ``proposed``: verify steps, one draft each; ``accepted``: drafts
    the main model confirmed."""

    tokens: torch.Tensor | list[torch.Tensor]
    proposed: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@torch.inference_mode()
def score(model: GLM5, input_ids: torch.Tensor | list) -> torch.Tensor | list[torch.Tensor]:
    """Logits of every position: LongTensor ``[B, T]`` -> fp32 ``[B, T, vocab]`` (list input ->
    list of ``[T_b, vocab]``)."""
    seqs, rect = _as_sequences(input_ids)
    _check_ids(model, seqs)
    lens = [len(s) for s in seqs]
    cache, table = _contiguous_blocks(model, lens, max(lens))
    batch = _varlen(seqs, table, lens)
    ctx = model.context(batch, cache)
    logits = model.logits(model.hidden_states(batch.input_ids, ctx, cache))
    parts = list(logits.split(lens))
    return torch.stack(parts) if rect else parts


@torch.inference_mode()
def generate(model: GLM5, input_ids: torch.Tensor | list, max_new_tokens: int = 32,
             stop_at_eos: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Greedy decoding with the paged cache, all sequences batched. ``[B, T]`` -> ``[B, T + new]``
    (sequences that stopped at an eos token are padded with ``pad_token_id``); a list of token
    lists -> a list of 1-D tensors."""
    seqs, rect, cache, table, eos = _prepare(model, input_ids, max_new_tokens, stop_at_eos)
    return _outputs(model, seqs, _decode_plain(model, seqs, cache, table, max_new_tokens, eos), rect)


@torch.inference_mode()
def generate_speculative(model: GLM5, input_ids: torch.Tensor | list, max_new_tokens: int = 32,
                         stop_at_eos: bool = True) -> SpeculativeResult:
    """Greedy decoding that drafts one token per step with the MTP layer and verifies it with the
    main model: the same tokens as :func:`generate`, in fewer main-model steps when drafts are
    accepted. Needs a checkpoint with its MTP layer (``model.mtp``)."""
    if model.mtp is None:
        raise ValueError("speculative decoding needs an MTP layer (num_nextn_predict_layers >= 1 with its "
                         "weights in the checkpoint)")
    seqs, rect, cache, table, eos = _prepare(model, input_ids, max_new_tokens, stop_at_eos)
    new, proposed, accepted = _decode_speculative(model, seqs, cache, table, max_new_tokens, eos)
    return SpeculativeResult(_outputs(model, seqs, new, rect), proposed, accepted)


# ---------------------------------------------------------------------------------- decoding loops


def _decode_plain(model: GLM5, seqs: list[list[int]], cache: PagedCache, table: torch.Tensor, max_new: int,
                  eos: set[int]) -> list[list[int]]:
    new: list[list[int]] = [[] for _ in seqs]
    if max_new == 0:
        return new
    lens = [len(s) for s in seqs]
    logits = model.forward_batch(_varlen(seqs, table, lens), cache)  # prefill all prompts at once
    active = list(range(len(seqs)))
    while True:
        tokens = logits.argmax(-1).tolist()
        still = []
        for b, t in zip(active, tokens, strict=True):
            new[b].append(t)
            lens[b] += 1
            if t not in eos and len(new[b]) < max_new:
                still.append(b)
        active = still
        if not active:
            return new
        batch = _varlen([[new[b][-1]] for b in active], table[active], [lens[b] for b in active])
        logits = model.forward_batch(batch, cache)


def _decode_speculative(model: GLM5, seqs: list[list[int]], cache: PagedCache, table: torch.Tensor, max_new: int,
                        eos: set[int]) -> tuple[list[list[int]], int, int]:
    """One MTP draft per step; returns ``(new tokens, drafts proposed, drafts accepted)``.
    Invariant per active sequence: the main cache holds positions ``0..L-1``; ``pending`` (token L,
    already emitted) is not cached yet; ``draft`` is the MTP's guess for token L+1. A verify step
    feeds ``[pending, draft]``: if the main model's token after ``pending`` equals the draft, both
    are kept and its next token comes for free."""
    new: list[list[int]] = [[] for _ in seqs]
    if max_new == 0:
        return new, 0, 0
    lens = [len(s) for s in seqs]
    batch = _varlen(seqs, table, lens)
    ctx = model.context(batch, cache)
    h = model.hidden_states(batch.input_ids, ctx, cache)
    last = ctx.cu_seqlens_q[1:].long() - 1
    pending = model.logits(h[last]).argmax(-1).tolist()
    # MTP prefill: position i sees (h_i, token i+1); the last position sees the first new token.
    shifted = [s[1:] + [p] for s, p in zip(seqs, pending, strict=True)]
    drafts = _mtp(model, shifted, h, table, lens, cache)
    active = []
    for b, p in enumerate(pending):
        new[b].append(p)
        if p not in eos and len(new[b]) < max_new:
            active.append(b)
    proposed = accepted = 0
    while active:
        # Verify [pending, draft] for every active sequence in one main-model forward.
        verify = [[new[b][-1], drafts[b]] for b in active]
        batch = _varlen(verify, table[active], [lens[b] + 2 for b in active])
        ctx = model.context(batch, cache)
        h = model.hidden_states(batch.input_ids, ctx, cache)
        predicted = model.logits(h).argmax(-1).view(-1, 2).tolist()
        still, catch_up = [], []  # catch_up: (sequence, tokens for the MTP, rows of h they pair with)
        for j, b in enumerate(active):
            proposed += 1
            y1, y2 = predicted[j]
            if y1 == drafts[b]:  # draft accepted: both verified positions are kept, y2 is free
                accepted += 1
                emitted, rows = [y1, y2], [2 * j, 2 * j + 1]
            else:  # rejected: position L+1 of the cache is stale and is overwritten next step
                emitted, rows = [y1], [2 * j]
            lens[b] += len(emitted)
            done = False
            for t in emitted:
                new[b].append(t)
                if t in eos or len(new[b]) >= max_new:
                    done = True
                    break
            if not done:
                still.append(b)
                catch_up.append((b, emitted, rows))
        # MTP catch-up over the newly cached positions (1 or 2 per sequence), drafting the next token.
        if catch_up:
            sub = [b for b, _, _ in catch_up]
            rows = torch.tensor([r for _, _, rs in catch_up for r in rs], device=h.device)
            drafts.update(_mtp(model, [toks for _, toks, _ in catch_up], h[rows], table, [lens[b] for b in sub],
                               cache, rows_of=sub))
        active = still
    return new, proposed, accepted


def _mtp(model: GLM5, tokens: list[list[int]], hidden: torch.Tensor, table: torch.Tensor, context: list[int],
         cache: PagedCache, rows_of: list[int] | None = None) -> dict[int, int]:
    """Run the MTP layer over the given tokens (hidden rows aligned); return its greedy draft
    for each sequence's last row, keyed by sequence index."""
    seq_ids = rows_of if rows_of is not None else list(range(len(tokens)))
    batch = _varlen(tokens, table[seq_ids], context)
    ctx = model.context(batch, cache)
    logits = model.mtp(batch.input_ids.to(model.device), hidden, ctx, cache)
    last = ctx.cu_seqlens_q[1:].long() - 1
    return dict(zip(seq_ids, logits[last].argmax(-1).tolist(), strict=True))


# ---------------------------------------------------------------------------------- helpers


def _prepare(model: GLM5, input_ids: torch.Tensor | list, max_new_tokens: int,
             stop_at_eos: bool) -> tuple[list[list[int]], bool, PagedCache, torch.Tensor, set[int]]:
    """Checked sequences, whether the input was a tensor, a private cache with room for the new
    tokens (+2 for a speculative verify step), its block table, and the eos ids to stop at."""
    seqs, rect = _as_sequences(input_ids)
    _check_ids(model, seqs)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lens = [len(s) for s in seqs]
    cache, table = _contiguous_blocks(model, lens, max(lens) + max_new_tokens + 2)
    eos = set(model.config.eos_token_ids) if stop_at_eos else set()
    return seqs, rect, cache, table, eos


def _outputs(model: GLM5, seqs: list[list[int]], new: list[list[int]],
             rect: bool) -> torch.Tensor | list[torch.Tensor]:
    """Prompt + new tokens per sequence, as a padded ``[B, T + new]`` tensor for tensor input."""
    outs = [torch.tensor(s + n, dtype=torch.int64) for s, n in zip(seqs, new, strict=True)]
    if not rect:
        return outs
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_ids[0]
    width = max(o.numel() for o in outs)
    return torch.stack([F.pad(o, (0, width - o.numel()), value=pad) for o in outs])


def _contiguous_blocks(model: GLM5, lengths: list[int], cache_len: int) -> tuple[PagedCache, torch.Tensor]:
    """A private cache with ``ceil(cache_len / BLOCK_SIZE)`` consecutive blocks per sequence."""
    per_seq = max(1, -(-cache_len // BLOCK_SIZE))
    cache = model.new_cache(len(lengths) * per_seq, BLOCK_SIZE)
    table = torch.arange(len(lengths) * per_seq, dtype=torch.int32).view(len(lengths), per_seq)
    return cache, table


def _as_sequences(input_ids: torch.Tensor | list) -> tuple[list[list[int]], bool]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected input_ids as an integer tensor [B, T], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        return input_ids.tolist(), True
    return [list(map(int, s)) for s in input_ids], False


def _check_ids(model: GLM5, seqs: list[list[int]]) -> None:
    V = model.config.vocab_size
    if not seqs:
        raise ValueError("expected at least one sequence")
    for s in seqs:
        if not s:
            raise ValueError("expected every sequence to hold at least one token")
        if min(s) < 0 or max(s) >= V:
            raise ValueError(f"token ids must be in [0, {V}), got one in [{min(s)}, {max(s)}]")


def _varlen(seqs: list[list[int]], table: torch.Tensor, context: list[int]) -> Batch:
    """The varlen batch of ``seqs`` (new tokens) whose contexts, these tokens included, are ``context``."""
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return Batch(torch.tensor([t for s in seqs for t in s], dtype=torch.int64), cu,
                 torch.tensor(context, dtype=torch.int32), table)
