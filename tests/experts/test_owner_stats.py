"""Per-owner query statistics: exact merges, which forwards record them, state_dict."""

import math

import numpy as np
import pytest
import torch

from peer_ll.experts import PEER, OwnerQueryStats, recording_query_stats


def small_layer(**kw) -> PEER:
    args = dict(num_keys=4, heads=2, topk=3, dim_key=8, query_norm=None)
    args.update(kw)
    return PEER(16, **args)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_batched_merges_equal_numpy_on_all_queries(covariance):
    stats = OwnerQueryStats(3, 5, covariance=covariance)
    batches = [torch.randn(n, 3, 5) * 2 + 1 for n in (7, 1, 13, 4)]
    for b in batches:
        stats.update(4, b)
    stats.update(2, torch.randn(3, 3, 5))
    every = torch.cat(batches).double().numpy()  # (25, 3, 5)
    assert stats.owners == [4, 2]
    assert stats.count_of(4) == 25 and stats.count_of(9) == 0
    # float64 merges of 25 values: agreement to ~1e-15 relative; 1e-12 leaves room.
    np.testing.assert_allclose(stats.mean_of(4).numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance_of(4).numpy(), every.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(
        stats.variance_of(4, unbiased=False).numpy(), every.var(0, ddof=0), rtol=1e-12
    )
    cov = np.stack([np.cov(every[:, h].T) for h in range(3)])
    got = stats.covariance_of(4).numpy()
    if covariance == "diag":
        cov = np.stack([np.diag(np.diag(c)) for c in cov])
    np.testing.assert_allclose(got, cov, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_likelihood_matches_a_direct_gaussian_density(covariance):
    stats = OwnerQueryStats(2, 3, covariance=covariance)
    stats.update(0, torch.randn(40, 2, 3))
    stats.update(1, torch.randn(30, 2, 3) * 0.5 + 2)
    q = torch.randn(6, 2, 3)
    got = stats.log_likelihood(q, [0, 1], min_var=1e-3)
    want = np.zeros((6, 2))
    for j, owner in enumerate((0, 1)):
        mu = stats.mean_of(owner).numpy()
        cov = stats.covariance_of(owner).numpy() + 1e-3 * np.eye(3)
        for h in range(2):
            diff = q[:, h].double().numpy() - mu[h]
            maha = np.einsum("ti,ij,tj->t", diff, np.linalg.inv(cov[h]), diff)
            want[:, j] += -0.5 * (maha + np.linalg.slogdet(cov[h])[1] + 3 * math.log(2 * math.pi))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_samples_follow_the_owner_statistics(covariance):
    stats = OwnerQueryStats(2, 4, covariance=covariance)
    stats.update(0, torch.randn(500, 2, 4) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 3)
    draws = stats.sample(0, 20000, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (20000, 2, 4) and draws.dtype == torch.float32
    draws = draws.double()
    # standard error of a mean over 20000 draws with std <= 2 is 0.014: 0.06 is > 4 sigma.
    assert torch.allclose(draws.mean(0), stats.mean_of(0), atol=0.06)
    assert torch.allclose(draws.var(0), stats.variance_of(0), rtol=0.05)


def test_training_forwards_record_the_newest_unfrozen_owner_only():
    layer = small_layer()
    x = torch.randn(9, 16)
    layer.eval()
    layer(x)
    assert layer.query_stats.owners == []  # eval forwards never record
    layer.train()
    layer(x)
    assert layer.query_stats.count_of(0) == 9
    torch.testing.assert_close(layer.query_stats.mean_of(0),
                               layer.query(x).double().mean(0), rtol=1e-6, atol=1e-6)
    layer.grow(2, owner=1)
    layer.freeze(0)
    layer(x[:4])
    assert layer.query_stats.count_of(0) == 9 and layer.query_stats.count_of(1) == 4
    layer.freeze(1)  # the newest owner is frozen: nobody trains
    layer(x)
    assert layer.query_stats.count_of(1) == 4
    layer.training_owner = 0  # explicit owner, even when frozen
    layer(x)
    assert layer.query_stats.count_of(0) == 18
    layer.training_owner = None
    layer(x)
    assert layer.query_stats.count_of(0) == 18


def test_per_input_owners_record_only_the_training_owners_inputs():
    layer = small_layer()
    layer.grow(2, owner=1)
    x = torch.randn(6, 16)
    owners = torch.tensor([0, 1, 1, 0, 1, 1])
    layer(x, owners=owners)  # training mode; the newest owner, 1, trains
    assert layer.query_stats.owners == [1]
    assert layer.query_stats.count_of(1) == 4
    torch.testing.assert_close(layer.query_stats.mean_of(1),
                               layer.query(x[owners == 1]).double().mean(0))


def test_recording_context_records_eval_forwards_and_restores():
    layer = small_layer()
    layer.train()
    layer(torch.randn(5, 16))
    layer.eval()
    x = torch.randn(7, 16)
    with torch.no_grad(), recording_query_stats(layer, 0, reset=True):
        layer(x)
    assert layer.query_stats.count_of(0) == 7
    torch.testing.assert_close(layer.query_stats.mean_of(0), layer.query(x).double().mean(0))
    assert layer.recording_owner is None
    layer(x)
    assert layer.query_stats.count_of(0) == 7


def test_state_dict_round_trip_grows_the_statistics_of_a_fresh_layer():
    layer = small_layer(query_stats="full")
    for owner in (1, 2):
        layer.grow(2, owner=owner)
        layer.training_owner = owner
        layer(torch.randn(5, 16))
    layer.training_owner = 0
    layer(torch.randn(5, 16))
    fresh = small_layer(query_stats="full")
    fresh.load_state_dict(layer.state_dict())
    for name in ("owner_ids", "count", "mean", "m2"):
        assert torch.equal(getattr(fresh.query_stats, name), getattr(layer.query_stats, name))
    assert fresh.query_stats.owners == [1, 2, 0]
    diag = small_layer(query_stats="diag")
    with pytest.raises(ValueError, match="m2 must have shape"):
        diag.load_state_dict(layer.state_dict())


def test_statistics_stay_float64_when_the_layer_is_cast():
    layer = small_layer()
    layer(torch.randn(5, 16))
    before = layer.query_stats.mean.clone()
    layer.half()
    assert layer.query_stats.mean.dtype == torch.float64
    assert torch.equal(layer.query_stats.mean, before)
    assert layer.to_query.weight.dtype == torch.float16


def test_bad_arguments_raise_clear_errors():
    stats = OwnerQueryStats(2, 4)
    with pytest.raises(ValueError, match="queries must have shape"):
        stats.update(0, torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="owner must be one of"):
        stats.mean_of(3)
    with pytest.raises(ValueError, match="covariance must be one of"):
        OwnerQueryStats(2, 4, covariance="lowrank")
    with pytest.raises(ValueError, match="query_stats must be one of"):
        small_layer(query_stats="yes")
    stats.update(0, torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="too few"):
        stats.variance_of(0)
