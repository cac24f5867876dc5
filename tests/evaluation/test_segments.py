"""Own-segment share of a domain's retrieval."""

import numpy as np
import pytest
import torch

from peer_ll.evaluation.segments import own_segment_share, segment_share_matrix


def test_own_segment_share_by_hand():
    owners = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])  # 3 queries, k=4
    share = own_segment_share(owners, 1)
    assert share == pytest.approx({"slots": 7 / 12, "all": 1 / 3, "any": 2 / 3})


def test_segment_share_matrix_rows_sum_to_one():
    retrieved = {0: np.array([[0, 0], [0, 1]]), 1: np.array([[1, 1], [2, 1]])}
    M, domains, owners = segment_share_matrix(retrieved)
    assert domains == [0, 1] and owners == [0, 1, 2]
    np.testing.assert_allclose(M, [[0.75, 0.25, 0.0], [0.0, 0.75, 0.25]])
    np.testing.assert_allclose(M.sum(1), 1.0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="retrieved_owners must be a non-empty integer"):
        own_segment_share(np.array([[0.5, 1.0]]), 0)
    with pytest.raises(ValueError, match="retrieved must be a non-empty mapping"):
        segment_share_matrix({})
