"""Greedy picks: `argmax_rows` (numpy on CPU) must pick what torch.argmax picks, ties and NaN
included, or stateful and stateless greedy replies could part on a tie."""

import math

import pytest
import torch

from pensieve.sampling import SamplingParams, argmax_rows, sample_token


@pytest.mark.parametrize("rows", [1, 3, 24])
def test_argmax_rows_matches_torch_on_random_logits(rows: int) -> None:
    logits = torch.randn(rows, 49152, generator=torch.Generator().manual_seed(rows))
    assert argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist()


def test_argmax_rows_ties_nan_and_infinities_as_torch() -> None:
    nan, inf = math.nan, math.inf
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0],  # equal maxima: the first
            [nan, 1.0, nan, 2.0],  # a NaN counts as the largest: the first NaN
            [-inf, -inf, -inf, -inf],
            [0.0, inf, 5.0, inf],
            [-0.0, 0.0, -1.0, -2.0],
        ]
    )
    assert argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist() == [1, 0, 0, 1, 0]


def test_argmax_rows_of_one_row_and_of_a_row_selection() -> None:
    with torch.inference_mode():  # the executor's logits are inference tensors
        logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
        assert argmax_rows(logits[3]) == int(torch.argmax(logits[3]))
        chosen = logits[[0, 2, 5]]
        assert argmax_rows(chosen) == torch.argmax(chosen, dim=-1).tolist()
        assert argmax_rows(logits.double()) == torch.argmax(logits, dim=-1).tolist()
        assert argmax_rows(logits.bfloat16()) == torch.argmax(logits.bfloat16(), -1).tolist()


def test_greedy_sample_token_is_the_argmax() -> None:
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    assert sample_token(logits, SamplingParams(temperature=0.0)) == int(torch.argmax(logits))
