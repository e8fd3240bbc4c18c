"""Cached read-only device tensors: rows come back without a torch op, and stay valid as the cache grows."""

import torch

from mate import constants

CPU = torch.device("cpu")


def test_rows_are_reused_and_outlive_growth():
    first = constants.iota(5, CPU)
    assert constants.iota(5, CPU) is first  # no slicing op on a repeat
    grown = constants.iota(3000, CPU)  # more than the cached tensor holds: it grows
    assert grown.tolist() == list(range(3000))
    assert constants.iota(5, CPU) is first and first.tolist() == list(range(5))
    assert constants.zeros(3, CPU).tolist() == [0, 0, 0]


def test_unread_placeholders_have_one_element_of_the_asked_rank():
    for dtype, dims in ((torch.float32, 1), (torch.float32, 2), (torch.int32, 2)):
        placeholder = constants.unread(dtype, dims, CPU)
        assert placeholder.dtype == dtype and placeholder.shape == (1,) * dims
        assert constants.unread(dtype, dims, CPU) is placeholder
