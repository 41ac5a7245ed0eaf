"""StepMetadata.build: a step's rows become the kernels' tensors, and bad rows are refused."""

import pytest
import torch

from pensieve.messages import SequenceRows
from pensieve.paged import StepMetadata
from pensieve.sampling import SamplingParams

BLOCK = 4


def _rows(request_id: int, first: int, count: int, table: list[int], sample: bool = True):
    positions = list(range(first, first + count))
    return SequenceRows(request_id, [7] * count, positions, table, first + count, sample,
                        SamplingParams())  # fmt: skip


def test_slots_positions_and_sampled_rows_of_a_mixed_step():
    rows = [
        _rows(1, 5, 1, [9, 3]),  # a decode row at position 5: block 3, offset 1
        _rows(2, 2, 5, [6, 8], sample=False),  # a prefill chunk that does not finish its prompt
        _rows(3, 0, 3, [2]),  # a whole short prompt
    ]
    meta = StepMetadata.build(rows, BLOCK, torch.device("cpu"))
    assert meta.slot_mapping.tolist() == [13, 26, 27, 32, 33, 34, 8, 9, 10]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.positions.tolist() == [5, 2, 3, 4, 5, 6, 0, 1, 2]
    assert meta.block_tables.tolist() == [[9, 3], [6, 8], [2, -1]]
    assert meta.query_start.tolist() == [0, 1, 6, 9]
    assert meta.context_lens.tolist() == [6, 7, 3]
    assert meta.sample_rows.tolist() == [0, 8]
    assert meta.host == ([0, 1, 6, 9], [5, 2, 3, 4, 5, 6, 0, 1, 2], [6, 7, 3])
    assert not meta.samples_every_row


def test_a_decode_batch_samples_every_row():
    rows = [_rows(1, 5, 1, [9, 3]), _rows(2, 2, 1, [6])]
    assert StepMetadata.build(rows, BLOCK, torch.device("cpu")).samples_every_row
    one_waits = [_rows(1, 5, 1, [9, 3]), _rows(2, 2, 1, [6], sample=False)]
    assert not StepMetadata.build(one_waits, BLOCK, torch.device("cpu")).samples_every_row


def test_an_empty_step_builds():
    meta = StepMetadata.build([], BLOCK, torch.device("cpu"))
    assert meta.slot_mapping.numel() == 0 and meta.block_tables.shape == (0, 1)


def test_a_position_past_the_table_or_off_device_is_refused():
    with pytest.raises(ValueError, match="past its sequence's block table"):
        StepMetadata.build([_rows(1, 8, 1, [0, 1])], BLOCK, torch.device("cpu"))
    with pytest.raises(ValueError, match="request 4: position 5 is not on device"):
        StepMetadata.build([_rows(4, 5, 1, [0, -1])], BLOCK, torch.device("cpu"))
