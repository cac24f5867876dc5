"""A NaN token does not poison an owner's statistics: it is skipped, counted, warned once."""

import warnings

import pytest
import torch

from peer_ll.protect.input_stats import InputOwnerStats
from peer_ll.protect.query_stats import QueryOwnerStats


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_nan_queries_are_skipped_and_owners_stay_apart(covariance):
    stats = QueryOwnerStats(2, 4, covariance=covariance)
    q0, q1 = torch.randn(50, 2, 4) - 3, torch.randn(50, 2, 4) + 3
    stats.update(0, q0)
    poisoned = q1.clone()
    poisoned[7, 1, 2] = float("nan")
    poisoned[9, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="skipped 2 of 50 samples of owner 1"):
        stats.update(1, poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        stats.update(1, poisoned[:10])
    assert stats.nonfinite_skipped == 4
    assert stats.count.tolist() == [50, 48 + 8]
    assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.m2).all()
    clean = QueryOwnerStats(2, 4, covariance=covariance)
    clean.update(
        1,
        torch.cat(
            [
                q1[[i for i in range(50) if i not in (7, 9)]],
                q1[[i for i in range(10) if i not in (7, 9)]],
            ]
        ),
    )
    assert torch.allclose(stats.mean[1], clean.mean[0])
    ll = stats.log_likelihood(torch.cat([q0[:5], q1[:5]]), [0, 1])
    assert ll.argmax(1).tolist() == [0] * 5 + [1] * 5  # owner 1's inputs still go to owner 1


def test_all_nan_batch_adds_nothing():
    stats = QueryOwnerStats(1, 2)
    with pytest.warns(UserWarning):
        stats.update(3, torch.full((4, 1, 2), float("nan")))
    assert stats.owners == [] and stats.nonfinite_skipped == 4


def test_input_stats_skip_nonfinite_samples():
    stats = InputOwnerStats(rank=2, per_class=True)
    x, y = torch.randn(40, 6), torch.arange(40) % 2
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.warns(UserWarning, match="skipped 1 of 40"):
        stats.fit(None, 0, bad, y)
    assert stats.nonfinite_skipped == 1
    for group in stats.groups[0]:
        assert all(torch.isfinite(torch.as_tensor(t)).all() for t in group)
    with pytest.raises(ValueError, match="x must hold at least one finite sample"):
        stats.fit(None, 1, torch.full((3, 6), float("nan")))
    assert stats.owners == [0]


def test_nan_input_does_not_poison_the_router_mass():
    from peer_ll.experts import PEER

    layer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer").eval()
    x = torch.randn(6, 8)
    x[2, 3] = float("nan")
    layer(x)
    assert torch.isfinite(layer.router_mass).all()
    assert int(layer.stats.nonfinite) == 2 * 4  # token 2's gates: H × K
    assert abs(float(layer.router_mass.sum()) - 5 * 2) < 1e-4  # 5 clean tokens × H heads
    layer.reset_routing_stats()
    assert int(layer.stats.nonfinite) == 0
