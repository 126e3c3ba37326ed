"""hwlayer.ops.layout: the one home of the varlen / paged layout rules.

The generic ops, the Triton tier's ``supports`` predicates and the model's per-step context all
check a varlen batch with :func:`check_varlen`, so the same bad batch gets the same one-line
message everywhere; positions and slots come from :func:`token_positions` /
:func:`positions_to_slots`, checked here against values worked out by hand.
"""

import pytest
import torch

from hwlayer import ops
from hwlayer.backends.triton import adapters
from hwlayer.ops.layout import check_varlen, positions_to_slots, token_positions


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("cu, seq_lens, T, message", [
    (i32(0, 2), i32(5), 3, "op: argument 'cu_seqlens_q' expected last entry == number of query tokens (3), got 2"),
    (i32(1, 3), i32(5), 3, "op: argument 'cu_seqlens_q' expected first entry 0, got 1"),
    (i32(0, 3, 2, 3), i32(5, 5, 5), 3, "op: argument 'cu_seqlens_q' expected non-decreasing entries, got [0, 3, 2, 3]"),
    (i32(0, 1, 4), i32(5, 2), 4, "op: argument 'seq_lens' expected seq_lens[1] >= its query count 3, got 2"),
    (i32(0, 4), i32(5, 5), 4, "op: argument 'seq_lens' expected shape [1], got [2]"),
    (torch.tensor([0.0, 4.0]), i32(5), 4, "op: argument 'cu_seqlens_q' expected dtype int32/int64, got float32"),
    ([0, 4], i32(5), 4, "op: argument 'cu_seqlens_q' expected a torch.Tensor, got list"),
])
def test_check_varlen_rejects_with_one_line(cu, seq_lens, T, message):
    with pytest.raises(ValueError) as err:
        check_varlen("op", cu, seq_lens, T)
    assert str(err.value) == message


def test_check_varlen_reads_values_only_under_hwlayer_check(monkeypatch):
    """Without HWLAYER_CHECK a forward must not read device data: only shapes and dtypes are checked."""
    bad = (i32(0, 3), i32(2), 3)  # a context shorter than its query tokens
    monkeypatch.setenv("HWLAYER_CHECK", "0")
    assert check_varlen("op", *bad) is None
    with pytest.raises(ValueError, match="expected shape"):
        check_varlen("op", i32(0, 3), i32(5, 5), 3)
    monkeypatch.setenv("HWLAYER_CHECK", "1")
    with pytest.raises(ValueError, match="seq_lens"):
        check_varlen("op", *bad)


def _attention_args(cu: torch.Tensor, seq_lens: torch.Tensor) -> tuple:
    T = int(cu[-1])
    return (torch.randn(T, 2, 8), torch.randn(4, 4, 8), torch.zeros(T, 2, dtype=torch.int32),
            torch.zeros(len(seq_lens), 4, dtype=torch.int32), cu, seq_lens, 0.5, 6)


def test_generic_op_and_triton_supports_give_the_same_reason():
    """A context shorter than its query tokens: the generic op raises, the Triton tier declines,
    both with check_varlen's message (the Triton predicate never reaches a kernel)."""
    args = _attention_args(i32(0, 3), i32(2))
    message = "sparse_mla_attention: argument 'seq_lens' expected seq_lens[0] >= its query count 3, got 2"
    with pytest.raises(ValueError) as err:
        ops.sparse_mla_attention(*args)
    assert str(err.value) == message
    assert adapters.sparse_mla_attention_supports(*args) == message
    indexer_args = (torch.randn(3, 2, 8), torch.rand(3, 2), torch.randn(4, 4, 8), torch.zeros(1, 4, dtype=torch.int32),
                    i32(0, 3), i32(2), 4, 0.5)
    with pytest.raises(ValueError, match=r"^lightning_indexer: argument 'seq_lens' expected seq_lens\[0\] >= its"):
        ops.lightning_indexer(*indexer_args)
    assert adapters.lightning_indexer_supports(*indexer_args).startswith("lightning_indexer: argument 'seq_lens'")


def test_token_positions_and_slots_by_hand():
    # Sequence 0: 2 new tokens of a 5-token context (positions 3, 4); sequence 1: 1 new token of 1 (position 0).
    seq_idx, pos = token_positions(i32(0, 2, 3), i32(5, 1))
    assert seq_idx.tolist() == [0, 0, 1] and pos.tolist() == [3, 4, 0]
    # block_size 4: sequence 0 lives in blocks [2, 0], sequence 1 in block [3].
    table = i32(2, 0, 3, 3).view(2, 2)
    assert positions_to_slots(table, seq_idx, pos, 4).tolist() == [2 * 4 + 3, 0 * 4 + 0, 3 * 4 + 0]
    # 2-D positions (per-token index lists, -1 = none) map row-wise; -1 maps to the slot of position 0
    # of the token's sequence (a valid slot the caller masks).
    idx = torch.tensor([[0, 4], [1, -1], [0, -1]])
    assert positions_to_slots(table, seq_idx, idx, 4).tolist() == [[8, 0], [9, 8], [12, 12]]


@pytest.fixture(scope="module")
def tiny_model():
    from model import load_model
    from model.tiny import ensure_default_model

    return load_model(ensure_default_model(), backend="cpu")


def test_model_context_uses_the_layout(tiny_model):
    from model import Batch

    cache = tiny_model.new_cache(4, 4)
    table = i32(2, 0, 3, 1).view(2, 2)
    ctx = tiny_model.context(Batch(torch.tensor([5, 6, 7]), i32(0, 2, 3), i32(5, 1), table), cache)
    assert ctx.positions.tolist() == [3, 4, 0]
    assert ctx.slot_mapping.tolist() == [11, 0, 12]


@pytest.mark.parametrize("cu, seq_lens, message", [
    (i32(1, 2), i32(5), "Batch: argument 'cu_seqlens_q' expected first entry 0, got 1"),
    (i32(0, 2), i32(1), "Batch: argument 'seq_lens' expected seq_lens[0] >= its query count 2, got 1"),
    (i32(0, 0, 2), i32(3, 3), "Batch: expected >= 1 new token per sequence, got cu_seqlens_q=[0, 0, 2]"),
])
def test_model_context_rejects_bad_batch_with_one_line(tiny_model, cu, seq_lens, message):
    from model import Batch

    B = seq_lens.shape[0]
    batch = Batch(torch.tensor([5, 6]), cu, seq_lens, torch.zeros(B, 2, dtype=torch.int32))
    with pytest.raises(ValueError) as err:
        tiny_model.context(batch, tiny_model.new_cache(4, 4))
    assert str(err.value) == message
