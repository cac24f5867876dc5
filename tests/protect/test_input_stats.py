"""InputOwnerStats: exact PPCA statistics, owner scores from inputs, state."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from peer_ll.protect import InputOwnerStats


def _covariance(V, lam, s2):
    D = V.shape[1]
    return s2 * torch.eye(D, dtype=torch.float64) + V.T @ torch.diag(lam - s2) @ V


def test_ppca_statistics_are_exact():
    X = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    stats = InputOwnerStats(rank=2, per_class=False)
    stats.fit(None, 0, X)
    ((logw, mean, V, lam, s2),) = stats.groups[0]
    cov = (X - X.mean(0)).T @ (X - X.mean(0)) / len(X)  # maximum likelihood
    eig = torch.linalg.eigvalsh(cov).flip(0)
    assert logw == 0.0
    torch.testing.assert_close(mean, X.mean(0))
    torch.testing.assert_close(lam, eig[:2])
    torch.testing.assert_close(s2, eig[2:].mean())
    torch.testing.assert_close(V @ V.T, torch.eye(2, dtype=torch.float64))
    y = torch.randn(5, 6, dtype=torch.float64)
    want = MultivariateNormal(mean, _covariance(V, lam, s2)).log_prob(y)
    owners, got = stats.log_likelihood(y)
    assert owners == [0]
    torch.testing.assert_close(got[:, 0], want)


def test_per_class_statistics_mix_by_class_frequency():
    X = torch.randn(30, 4, dtype=torch.float64)
    labels = torch.tensor([3] * 10 + [7] * 20)
    X[10:] += 5.0
    stats = InputOwnerStats(rank=1)
    stats.fit(None, 2, X, labels)
    groups = stats.groups[2]
    assert [round(math.exp(g[0]), 6) for g in groups] == [round(1 / 3, 6), round(2 / 3, 6)]
    y = torch.randn(3, 4, dtype=torch.float64)
    parts = [g[0] + MultivariateNormal(g[1], _covariance(*g[2:])).log_prob(y) for g in groups]
    torch.testing.assert_close(
        stats.log_likelihood(y)[1][:, 0], torch.logsumexp(torch.stack(parts), 0)
    )


def test_well_separated_owners_are_inferred_right():
    centres = {
        0: torch.zeros(3, 4),
        1: torch.full((3, 4), 3.0),
        4: torch.linspace(-3, 3, 12).view(3, 4),
    }
    stats = InputOwnerStats(rank=3)
    for owner, c in centres.items():
        stats.fit(None, owner, c + 0.5 * torch.randn(80, 3, 4), torch.randint(0, 2, (80,)))
    x = torch.cat([c + 0.5 * torch.randn(20, 3, 4) for c in centres.values()])
    truth = torch.tensor([0] * 20 + [1] * 20 + [4] * 20)
    assert stats.owners == [0, 1, 4]
    owners, logp = stats.scores(None, x)
    assert owners == [0, 1, 4]
    assert torch.equal(torch.tensor(owners)[logp.argmax(1)], truth)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(60, dtype=torch.float64))
    _, ll = stats.log_likelihood(x, owners=[1, 4])
    assert ll.shape == (60, 2)  # candidates only


def test_bad_input_is_refused_and_changes_nothing():
    stats = InputOwnerStats(rank=2)
    stats.fit(None, 0, torch.randn(10, 5))
    before = stats.get_extra_state()
    with pytest.raises(ValueError, match="x must have 5 values per sample"):
        stats.fit(None, 1, torch.randn(10, 6))
    with pytest.raises(ValueError, match=r"labels must be a tensor of shape \(10,\)"):
        stats.fit(None, 1, torch.randn(10, 5), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="owner"):
        stats.fit(None, -1, torch.randn(10, 5))
    with pytest.raises(ValueError, match="owners must include owners with statistics"):
        stats.log_likelihood(torch.randn(2, 5), owners=[3])
    with pytest.raises(ValueError, match="rank"):
        InputOwnerStats(rank=-1)
    assert stats.owners == [0] and stats.get_extra_state()["dim"] == before["dim"]


def test_state_dict_round_trip():
    stats = InputOwnerStats(rank=2, min_var=1e-3)
    stats.fit(None, 0, torch.randn(20, 5), torch.randint(0, 3, (20,)))
    stats.fit(None, 1, torch.randn(20, 5) + 2)
    fresh = InputOwnerStats()
    fresh.load_state_dict(stats.state_dict())
    x = torch.randn(7, 5)
    assert fresh.owners == [0, 1] and fresh.rank == 2 and fresh.min_var == 1e-3
    assert torch.equal(fresh.log_likelihood(x)[1], stats.log_likelihood(x)[1])


def test_components_split_each_group_by_k_means():
    centres = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    x = torch.cat([c + 0.3 * torch.randn(20, 3) for c in centres]).double()
    stats = InputOwnerStats(rank=1, components=3)
    stats.fit(None, 0, x, torch.zeros(60, dtype=torch.long))  # one class, three clusters
    groups = stats.groups[0]
    means = torch.stack([g[1] for g in groups])
    assert len(groups) == 3 and [round(math.exp(g[0]), 6) for g in groups] == [0.333333] * 3
    for c in centres.double():  # the cluster means are the blob means, in some order
        assert torch.cdist(c[None], means).min() < 0.5
    # the mixture scores points under their own blob's Gaussian, and is deterministic
    again = InputOwnerStats(rank=1, components=3)
    again.fit(None, 0, x, torch.zeros(60, dtype=torch.long))
    y = torch.randn(4, 3).double()
    assert torch.equal(stats.log_likelihood(y)[1], again.log_likelihood(y)[1])
    parts = [g[0] + MultivariateNormal(g[1], _covariance(*g[2:])).log_prob(y) for g in groups]
    torch.testing.assert_close(
        stats.log_likelihood(y)[1][:, 0], torch.logsumexp(torch.stack(parts), 0)
    )
    few = InputOwnerStats(rank=1, components=5)
    few.fit(None, 1, x[:3])  # more components than samples: at most one per sample
    assert 1 <= len(few.groups[1]) <= 3
    with pytest.raises(ValueError, match="components"):
        InputOwnerStats(components=0)
    fresh = InputOwnerStats()
    fresh.load_state_dict(stats.state_dict())
    assert fresh.components == 3 and torch.equal(
        fresh.log_likelihood(y)[1], stats.log_likelihood(y)[1]
    )
