"""Layout helpers shared by the generic ops and by backend adapters (public API).

The layouts themselves are described in :mod:`hwlayer.ops` (token-major varlen batches, paged
caches, positions within a sequence). This module holds the one copy of:

* argument validation: :func:`check_tensor`, :func:`check_varlen` and :func:`fail`, which raise
  the one-line ``ValueError`` every op uses ("<op>: argument '<arg>' expected <what>, got <what>");
  :func:`value_checks` says whether checks that must read device data run (``HWLAYER_CHECK=1``);
* index arithmetic: :func:`token_positions` (sequence and position of every query token) and
  :func:`positions_to_slots` (position -> flat paged-cache slot);
* :func:`groups_covering_rows`, for vendor grouped GEMMs that want group counts summing to exactly
  the row count (``grouped_gemm`` allows padding rows past the sum);
* :func:`chunk_rows`, the temporary-size budget of the generic implementations;
* :class:`AttentionMetadata` and its builder :func:`attention_metadata`: the per-step tables of a
  varlen batch (token -> sequence, key slots, rope rows, padding) that the attention ops accept as
  ``meta=`` so every layer reuses them instead of rebuilding them.

Vendor adapters import these instead of re-deriving them, so a layout rule lives in one place.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def value_checks() -> bool:
    """Whether validation that reads tensor *values* runs (``HWLAYER_CHECK=1``).

    Shape and dtype checks cost nothing and always run. Checks of values (indices in range,
    ``cu_seqlens_q`` monotone, slots inside the cache) must copy device data to the host, which
    stalls the host until the device catches up and cannot happen inside a captured device graph;
    a forward pass must never do it. So they run only under ``HWLAYER_CHECK=1``: the test and
    conformance suites turn it on (their conftest), serving leaves it off. Read per call so a test
    can flip it with ``monkeypatch.setenv``.
    """
    return os.environ.get("HWLAYER_CHECK", "") not in ("", "0")


def fail(op: str, arg: str, expected: str, got: Any) -> NoReturn:
    """Raise the op's one-line ``ValueError``: ``<op>: argument '<arg>' expected <expected>, got <got>``."""
    raise ValueError(f"{op}: argument '{arg}' expected {expected}, got {got}")


def check_tensor(
    op: str,
    arg: str,
    t: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: Sequence[int | None] | None = None,
) -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor with the given rank, dtype and sizes
    (``None`` in ``shape`` means any size). Public so vendor adapters can reuse it."""
    # Runs several times per op call, so it is written for speed: plain loops, no generators.
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "a torch.Tensor", type(t).__name__)
    if ndim is not None:
        if not (t.dim() in ndim if isinstance(ndim, tuple) else t.dim() == ndim):
            fail(op, arg, f"{ndim}-D tensor", f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(op, arg, f"dtype {names}", str(t.dtype).removeprefix("torch."))
    if shape is not None:
        got = t.shape
        ok = len(got) == len(shape)
        if ok:
            for s, g in zip(shape, got, strict=True):
                if s is not None and s != g:
                    ok = False
                    break
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            fail(op, arg, f"shape {want}", f"{list(got)}")


def check_varlen(op: str, cu_seqlens_q: Any, seq_lens: Any, num_tokens: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens_q`` / ``seq_lens`` describe a varlen batch of
    ``num_tokens`` query tokens: integer 1-D ``[B + 1]`` / ``[B]`` (always checked) and, under
    :func:`value_checks` only, ``cu_seqlens_q`` rising from 0 to ``num_tokens`` with every context
    at least as long as its query tokens (those read the tensors' values).
    """
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=[cu_seqlens_q.shape[0] - 1])
    if value_checks():
        check_varlen_values(op, cu_seqlens_q.tolist(), seq_lens.tolist(), num_tokens)


def check_varlen_values(op: str, starts: Sequence[int], lens: Sequence[int], num_tokens: int) -> None:
    """The value half of :func:`check_varlen` on host copies (lists or numpy arrays): a caller that
    holds the batch on the host (the model's per-step metadata) checks it here for free."""
    starts, lens = [int(v) for v in starts], [int(v) for v in lens]
    if not starts or starts[-1] != num_tokens:
        got = starts[-1] if starts else "an empty tensor"
        fail(op, "cu_seqlens_q", f"last entry == number of query tokens ({num_tokens})", got)
    if starts[0] != 0:
        fail(op, "cu_seqlens_q", "first entry 0", starts[0])
    for b, (t0, t1, L) in enumerate(zip(starts[:-1], starts[1:], lens, strict=True)):
        if t1 < t0:
            fail(op, "cu_seqlens_q", "non-decreasing entries", starts)
        if L < t1 - t0:
            fail(op, "seq_lens", f"seq_lens[{b}] >= its query count {t1 - t0}", L)


def token_positions(
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position) of every query token of a varlen batch, both int64 ``[T]``.

    Pass ``num_tokens`` (``T``, the query tensor's first dim): without it the output size is read
    from ``cu_seqlens_q`` on the device, a host sync.
    """
    # int32 or int64 in; arithmetic with the int64 arange promotes, so no .long() copies are needed.
    # A token's sequence is the number of sequence ends at or before it (empty sequences included).
    if num_tokens is None:  # the output size comes from the device (a host read)
        num_tokens = int(cu_seqlens_q[-1])
    t = torch.arange(num_tokens, device=cu_seqlens_q.device)
    seq_idx = torch.searchsorted(cu_seqlens_q[1:], t.to(cu_seqlens_q.dtype), right=True)
    offset = seq_lens - cu_seqlens_q.diff() - cu_seqlens_q[:-1]  # position = token index + offset of its sequence
    pos = t + offset.index_select(0, seq_idx)
    return seq_idx, pos


def positions_to_slots(
    block_table: torch.Tensor, seq_idx: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Map positions (any shape, aligned with ``seq_idx`` on dim 0) to flat cache slots (int64).
    Negative positions map to the slot of position 0 of their sequence; callers mask them."""
    p = positions.long().clamp(min=0)
    # index_select + gather rather than block_table[rows, cols]: same values, a fraction of the
    # Python cost of advanced indexing. The table keeps its dtype; the add below is in int64.
    cols = p // block_size
    cols = cols.unsqueeze(1) if p.dim() == 1 else cols.flatten(1)  # [rows, n], also for 0 rows
    blocks = block_table.index_select(0, seq_idx).gather(1, cols).view(p.shape)
    return (p % block_size).add_(blocks, alpha=block_size)


def sequence_key_slots(block_table: torch.Tensor, num_seqs: int, max_seqlen_k: int, block_size: int) -> torch.Tensor:
    """int64 ``[num_seqs, max_seqlen_k]``: the cache slot of positions ``0 .. max_seqlen_k - 1`` of every
    sequence (what the indexer gathers keys by; ``AttentionMetadata.key_slots``)."""
    keys = torch.arange(max_seqlen_k, device=block_table.device).expand(num_seqs, max_seqlen_k)
    return positions_to_slots(block_table, torch.arange(num_seqs, device=block_table.device), keys, block_size)


@functools.lru_cache(maxsize=256)
def fp32_scalar(value: float) -> torch.Tensor:
    """``value`` as a 0-d fp32 CPU tensor. ``t * 0.5`` wraps the Python float as a float64 tensor and casts
    it for every call (an allocation and a copy op); a 0-d fp32 tensor combines with a float tensor of
    any dtype or device directly, with the same result (0-d tensors never change the result dtype)."""
    with torch.inference_mode(False):  # a normal tensor, usable where autograd saves it
        return torch.tensor(value, dtype=torch.float32)


def chunk_rows(n_rows: int, per_row_elems: int, budget: int = 1 << 25) -> int:
    """Rows per chunk so that one chunk's temporary stays near ``budget`` elements."""
    return max(1, min(n_rows, budget // max(1, per_row_elems)))


def groups_covering_rows(group_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Group counts (int64) summing to exactly ``num_rows``: the padding rows past ``sum(group_sizes)``
    (which ``grouped_gemm``'s contract allows, output unspecified) join the last group. For vendor
    kernels that require the counts to cover every row; device arithmetic only, nothing read back."""
    sizes = group_sizes.long().clone()
    if sizes.numel():
        sizes[-1] += num_rows - sizes.sum()
    return sizes


@dataclass(frozen=True)
class AttentionMetadata:
    """Tables of one step's varlen batch that every layer's attention ops would otherwise rebuild,
    built once per step by :func:`attention_metadata` (vLLM's attention metadata builders).

    ``rope``, ``kv_cache_write``, ``lightning_indexer`` and ``sparse_mla_attention`` take it as the
    optional keyword argument ``meta``. Every implementation must accept it and may use any field
    or none: results never depend on it (without it an op derives the same tables itself). The
    tensors are built on the device from the step's inputs, nothing read back, so a captured step
    rebuilds them on every replay; the host fields are what the caller knows about the step.
    """

    num_tokens: int  # host: T, the query rows of the step
    block_size: int  # host: the paged caches' block size the slots address
    max_seqlen_k: int  # host: the key_slots width (the ops' max_seqlen_k)
    has_padding: bool  # host: slot_mapping may hold -1 rows (a padded, captured decode batch)
    seq_idx: torch.Tensor  # int64 [T]: the sequence of every query token
    first_query_pos: torch.Tensor  # int64 [B]: position of each sequence's first query token
    key_slots: torch.Tensor  # int64 [B, max_seqlen_k]: cache slot of positions 0 .. max_seqlen_k - 1
    cos_sin_cache: torch.Tensor | None = None  # the rope cache the rows below come from
    # cos_sin_cache[positions] expanded to pairs, fp32 [T, 1, D]: cos_i at 2i and 2i+1 (rope_cos);
    # -sin_i at 2i, +sin_i at 2i+1 (rope_sin). GPT-J rope is then x * cos + pair_swap(x) * sin.
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    # hook specs 2.0: the backend's own per-step tables (``AttentionLayout.step_tables``), e.g. Ascend's
    # int32 actual sequence lengths; None when the backend has none or the caller built no tables.
    backend: Any = None


def attention_metadata(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_size: int,
    max_seqlen_k: int,
    has_padding: bool = True,
    cos_sin_cache: torch.Tensor | None = None,
) -> AttentionMetadata:
    """The :class:`AttentionMetadata` of a varlen batch (layout of :mod:`hwlayer.ops`): ``positions``
    int ``[T]`` (each query token's position), ``max_seqlen_k`` a host upper bound of the contexts,
    ``has_padding=False`` only when no ``slot_mapping`` entry is ``-1``; with ``cos_sin_cache`` it
    also gathers the rope rows. Device arithmetic only (about 25 torch calls, once per step)."""
    op = "attention_metadata"
    check_tensor(op, "positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=[cu_seqlens_q.shape[0] - 1])
    T, B = positions.shape[0], seq_lens.shape[0]  # values are the ops' to check (HWLAYER_CHECK)
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, T)
    first = seq_lens.long() - cu_seqlens_q.diff()
    key_slots = sequence_key_slots(block_table, B, max_seqlen_k, block_size)
    cos = sin = None
    if cos_sin_cache is not None:
        check_tensor(op, "cos_sin_cache", cos_sin_cache, ndim=2)
        half = cos_sin_cache.shape[1] // 2
        rows = cos_sin_cache.index_select(0, positions).float().unsqueeze(1)  # [T, 1, D]
        cos = rows[..., :half].repeat_interleave(2, dim=-1)
        sin = rows[..., half:]
        sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return AttentionMetadata(T, block_size, max_seqlen_k, has_padding, seq_idx, first, key_slots,
                             cos_sin_cache, cos, sin)


def with_backend_tables(meta: AttentionMetadata, layout: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor) -> AttentionMetadata:
    """``meta`` with ``layout.step_tables(...)`` (an :class:`~hwlayer.ops.cache.AttentionLayout`) as its
    ``backend`` field: once per step, before any layer."""
    import dataclasses

    tables = layout.step_tables(meta, cu_seqlens_q, seq_lens, block_table)
    return meta if tables is None else dataclasses.replace(meta, backend=tables)


def check_meta(op: str, meta: Any, num_tokens: int) -> None:
    """Raise ``ValueError`` unless ``meta`` is an :class:`AttentionMetadata` of ``num_tokens`` query rows."""
    if not isinstance(meta, AttentionMetadata):
        fail(op, "meta", "an AttentionMetadata or None", type(meta).__name__)
    if meta.num_tokens != num_tokens:
        fail(op, "meta", f"the tables of this batch ({num_tokens} tokens)", f"tables of {meta.num_tokens} tokens")


def meta_supported(meta: Any, rows: Any) -> bool | str:
    """For the ``supports`` predicate of an adapter that ignores ``meta``: ``True`` when ``meta`` is None
    or an :class:`AttentionMetadata` of ``rows.shape[0]`` tokens, else why not, so a malformed ``meta``
    reaches the generic op, which names the problem."""
    if meta is None:
        return True
    if not isinstance(meta, AttentionMetadata) or not isinstance(rows, torch.Tensor) or rows.dim() == 0:
        return "meta is not an AttentionMetadata"
    return True if meta.num_tokens == rows.shape[0] else "meta built for another batch"
