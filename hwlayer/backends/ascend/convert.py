"""Pure conversions between hwlayer's op conventions and the torch_npu ops' conventions.

Plain torch, no torch_npu: every function here is unit-tested on CPU against its documented
meaning (tests/test_backends_ascend.py). The adapters in ``adapters.py`` call them right before
handing tensors to the NPU op.

Conventions on the torch_npu side (torch-npu 2.14 op docs, Ascend/op-plugin docs @517f2e7d0f20,
vllm-ascend usage):

* ``TND`` layout: tokens of all sequences concatenated, ``actual_seq_lengths_query`` holding the
  *cumulative* token count at the end of each sequence (int32 ``[B]``, no leading zero).
* ``PA_BSND`` paged caches: ``[num_blocks, block_size, N_kv, D]``; ``actual_seq_lengths_kv`` holds
  each sequence's own (non-cumulative) context length.
* ``npu_grouped_matmul``: ``group_list_type=0`` wants cumulative row ends, ``1`` per-group counts
  (whose list may not have length 1); weights are ``[E, K, N]`` (``y = x @ w``), where ours are
  nn.Linear ``[E, N, K]``; the doc lists "weight transposed" as supported, so a transposed view
  serves without a copy.
* ``npu_sparse_flash_attention``: each ``sparse_indices`` row must list its valid entries first and
  its invalid (``-1``) entries last.
* ``npu_rotary_mul(x, r1, r2, mode)``: ``out = r1 * x + r2 * rotate(x)`` with full-width ``r1`` (cos)
  and ``r2`` (sin); ``rotate`` is ``cat(-x2, x1)`` for ``"half"`` and ``(-x[2i+1], x[2i])`` pairs for
  ``"interleave"``.
"""

from __future__ import annotations

import torch


def counts_to_cumulative(group_sizes: torch.Tensor) -> torch.Tensor:
    """Per-expert row counts -> cumulative row ends, int64 (``group_list_type=0``).
    ``[3, 0, 2] -> [3, 3, 5]``."""
    return group_sizes.long().cumsum(0)


def cumulative_to_counts(group_list: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`counts_to_cumulative`: ``[3, 3, 5] -> [3, 0, 2]``, int64."""
    ends = group_list.long()
    return torch.diff(ends, prepend=ends.new_zeros(1))


def tnd_actual_seq_lengths(cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """Our ``cu_seqlens_q`` (``[B + 1]``, leading 0) -> TND ``actual_seq_lengths_query``: the
    cumulative token count at each sequence's end, int32 ``[B]``. ``[0, 3, 4] -> [3, 4]``."""
    return cu_seqlens_q[1:].to(torch.int32)


def kv_actual_seq_lengths(seq_lens: torch.Tensor) -> torch.Tensor:
    """Our ``seq_lens`` (context length per sequence, new tokens included) -> the paged
    ``actual_seq_lengths_kv`` / ``actual_seq_lengths_key``, which is the same per-sequence length
    (not cumulative), int32."""
    return seq_lens.to(torch.int32)


def to_pa_bsnd(cache: torch.Tensor) -> torch.Tensor:
    """Our paged cache ``[num_blocks, block_size, D]`` -> ``PA_BSND`` ``[num_blocks, block_size, 1, D]``
    (one KV head), a view of the same memory."""
    return cache.unsqueeze(2)


def split_query(q: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed query ``[T, H, v_dim + rope]`` -> ``(q_nope [T, H, v_dim], q_rope [T, H, rope])``, contiguous."""
    return q[..., :v_dim].contiguous(), q[..., v_dim:].contiguous()


def valid_first(indices: torch.Tensor) -> torch.Tensor:
    """Reorder each row so valid (``>= 0``) positions come first and ``-1`` entries last, keeping the
    valid ones' relative order. Attention over a set of positions does not depend on their order."""
    invalid = (indices < 0).to(torch.int8)
    order = torch.argsort(invalid, dim=-1, stable=True)
    return indices.gather(-1, order)


def rope_cos_sin(
    cos_sin_cache: torch.Tensor, positions: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our cache rows ``[cos(p f_i) for i < D/2, sin(p f_i) ...]`` -> full-width ``(r1, r2)`` fp32
    ``[T, D]`` for ``npu_rotary_mul``: each frequency repeated for both members of its pair, i.e.
    ``cos_i, cos_i`` adjacent (``"interleave"``) or the half repeated (``"half"``)."""
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, :half], cs[:, half:]
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rotary_mode(interleaved: bool) -> str:
    """Our ``interleaved`` flag -> ``npu_rotary_mul``'s ``rotary_mode``."""
    return "interleave" if interleaved else "half"


def nt_weights_as_kn_view(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear-layout expert weights ``[E, N, K]`` (contiguous) -> ``npu_grouped_matmul``'s
    ``[E, K, N]`` as a transposed view of the same memory (no copy)."""
    return w.transpose(1, 2)


def indexer_output_to_positions(out: torch.Tensor | tuple, topk: int) -> torch.Tensor:
    """``npu_lightning_indexer``'s result (a tensor, or ``(indices, values)`` in releases with
    ``return_value``), TND shape ``[T, 1, sparse_count]`` -> our int32 ``[T, topk]`` positions,
    ``-1`` padded."""
    indices = out[0] if isinstance(out, tuple) else out
    indices = indices.reshape(indices.shape[0], -1)[:, :topk].to(torch.int32)
    return torch.where(indices >= 0, indices, torch.full_like(indices, -1))
