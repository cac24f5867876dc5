"""QueryOwnerStats: exact merges, likelihoods, fitting on a model, scores, state_dict."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.protect import QueryOwnerStats


class Tiny(nn.Module):
    """An owner-aware model: a Linear encoder, then one PEER layer."""

    takes_owners = True

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 16)
        self.layer = PEER(16, num_keys=4, heads=2, topk=3, dim_key=8, query_norm="batch")

    def forward(self, x, owners=None):
        return self.layer(self.encoder(x), owners=owners)


def small_model() -> Tiny:
    return Tiny()


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_batched_merges_equal_numpy_on_all_queries(covariance):
    stats = QueryOwnerStats(3, 5, covariance=covariance)
    batches = [torch.randn(n, 3, 5) * 2 + 1 for n in (7, 1, 13, 4)]
    for b in batches:
        stats.update(4, b)
    stats.update(2, torch.randn(3, 3, 5))
    every = torch.cat(batches).double().numpy()  # (25, 3, 5)
    assert stats.owners == [4, 2]
    assert stats.count_of(4) == 25 and stats.count_of(9) == 0
    # float64 merges of 25 values: agreement to ~1e-15 relative; 1e-12 leaves room.
    np.testing.assert_allclose(stats.mean[0].numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        stats.covariance_of(4).diagonal(dim1=-2, dim2=-1).numpy(), every.var(0, ddof=1), rtol=1e-12
    )
    np.testing.assert_allclose(
        stats.covariance_of(4, unbiased=False).diagonal(dim1=-2, dim2=-1).numpy(),
        every.var(0, ddof=0),
        rtol=1e-12,
    )
    cov = np.stack([np.cov(every[:, h].T) for h in range(3)])
    got = stats.covariance_of(4).numpy()
    if covariance == "diag":
        cov = np.stack([np.diag(np.diag(c)) for c in cov])
    np.testing.assert_allclose(got, cov, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_likelihood_matches_a_direct_gaussian_density(covariance):
    stats = QueryOwnerStats(2, 3, covariance=covariance)
    stats.update(0, torch.randn(40, 2, 3))
    stats.update(1, torch.randn(30, 2, 3) * 0.5 + 2)
    q = torch.randn(6, 2, 3)
    got = stats.log_likelihood(q, [0, 1], min_var=1e-3)
    want = np.zeros((6, 2))
    for j, owner in enumerate((0, 1)):
        mu = stats.mean[stats.row(owner)].numpy()
        cov = stats.covariance_of(owner).numpy() + 1e-3 * np.eye(3)
        for h in range(2):
            diff = q[:, h].double().numpy() - mu[h]
            maha = np.einsum("ti,ij,tj->t", diff, np.linalg.inv(cov[h]), diff)
            want[:, j] += -0.5 * (maha + np.linalg.slogdet(cov[h])[1] + 3 * math.log(2 * math.pi))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_fit_collects_the_queries_of_the_first_peer_layer_afresh():
    model = small_model()
    layer = model.layer
    stats = QueryOwnerStats.for_model(model)
    model.eval()
    x = torch.randn(9, 6)
    stats.fit(model, 0, x)
    assert stats.count_of(0) == 9
    want = layer.query(model.encoder(x)).double()
    torch.testing.assert_close(
        stats.covariance_of(0).diagonal(dim1=-2, dim2=-1), want.var(0), rtol=1e-6, atol=1e-6
    )
    stats.fit(model, 0, x[:4])  # a refit replaces the owner's statistics
    assert stats.count_of(0) == 4
    assert layer.expert_mass is not None  # the layer keeps its routing mass ...
    assert float(layer.expert_mass.sum()) == 0.0  # ... and the collection routed nothing


def test_scores_are_the_posterior_of_the_query_likelihood():
    model = small_model().eval()
    stats = QueryOwnerStats.for_model(model, min_var=1e-3)
    with pytest.raises(ValueError, match="owners with statistics must exist"):
        stats.scores(model, torch.randn(3, 6))
    a, b = torch.randn(40, 6) - 2, torch.randn(40, 6) + 2
    stats.fit(model, 0, a)
    stats.fit(model, 3, b)
    x = torch.cat([a[:5], b[:5]])
    owners, logp = stats.scores(model, x)
    assert owners == [0, 3] and logp.shape == (10, 2)
    q = model.layer.query(model.encoder(x))
    want = stats.log_likelihood(q, [0, 3], min_var=1e-3).log_softmax(1)
    torch.testing.assert_close(logp, want)
    assert torch.equal(logp.argmax(1), torch.tensor([0] * 5 + [1] * 5))


def test_state_dict_round_trip_resizes_the_statistics():
    stats = QueryOwnerStats(2, 8, covariance="full")
    for owner in (1, 2, 0):
        stats.update(owner, torch.randn(5, 2, 8))
    fresh = QueryOwnerStats(2, 8, covariance="full")
    fresh.load_state_dict(stats.state_dict())
    for name in ("owner_ids", "count", "mean", "m2"):
        assert torch.equal(getattr(fresh, name), getattr(stats, name))
    assert fresh.owners == [1, 2, 0]
    with pytest.raises(ValueError, match="m2 must have shape"):
        QueryOwnerStats(2, 8, covariance="diag").load_state_dict(stats.state_dict())


def test_statistics_stay_float64_when_cast():
    stats = QueryOwnerStats(2, 8)
    stats.update(0, torch.randn(5, 2, 8))
    before = stats.mean.clone()
    stats.half()
    assert stats.mean.dtype == torch.float64 and torch.equal(stats.mean, before)


def test_bad_arguments_raise_clear_errors():
    stats = QueryOwnerStats(2, 4)
    with pytest.raises(ValueError, match="queries must have shape"):
        stats.update(0, torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="owner must be one of"):
        stats.covariance_of(3)
    with pytest.raises(ValueError, match="covariance must be one of"):
        QueryOwnerStats(2, 4, covariance="lowrank")
    with pytest.raises(ValueError, match="layer must be one of"):
        QueryOwnerStats.for_model(small_model(), layer="nope")
    stats.update(0, torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="owner 0 must have more than 1 queries, got 1"):
        stats.covariance_of(0)
