"""InputOwnerStats: exact PPCA statistics, owner inference from inputs, routing, state."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from peer_ll.experts import PEER, InputOwnerStats


def _covariance(V, lam, s2):
    D = V.shape[1]
    return s2 * torch.eye(D, dtype=torch.float64) + V.T @ torch.diag(lam - s2) @ V


def test_ppca_statistics_are_exact():
    X = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    stats = InputOwnerStats(rank=2, per_class=False)
    stats.fit(0, X)
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
    stats.fit(2, X, labels)
    groups = stats.groups[2]
    assert [round(math.exp(g[0]), 6) for g in groups] == [round(1 / 3, 6), round(2 / 3, 6)]
    y = torch.randn(3, 4, dtype=torch.float64)
    parts = [g[0] + MultivariateNormal(g[1], _covariance(*g[2:])).log_prob(y) for g in groups]
    torch.testing.assert_close(stats.log_likelihood(y)[1][:, 0], torch.logsumexp(
        torch.stack(parts), 0))


def test_well_separated_owners_are_inferred_right():
    centres = {0: torch.zeros(3, 4), 1: torch.full((3, 4), 3.0),
               4: torch.linspace(-3, 3, 12).view(3, 4)}
    stats = InputOwnerStats(rank=3)
    for owner, c in centres.items():
        stats.fit(owner, c + 0.5 * torch.randn(80, 3, 4), torch.randint(0, 2, (80,)))
    x = torch.cat([c + 0.5 * torch.randn(20, 3, 4) for c in centres.values()])
    truth = torch.tensor([0] * 20 + [1] * 20 + [4] * 20)
    assert stats.owners == [0, 1, 4]
    assert torch.equal(stats.infer(x), truth)
    assert set(stats.infer(x, owners=[1, 4]).tolist()) <= {1, 4}  # candidates only


def test_bad_input_is_refused_and_changes_nothing():
    stats = InputOwnerStats(rank=2)
    stats.fit(0, torch.randn(10, 5))
    before = stats.get_extra_state()
    with pytest.raises(ValueError, match="x: expected 5 values per sample"):
        stats.fit(1, torch.randn(10, 6))
    with pytest.raises(ValueError, match=r"labels: expected a tensor of shape \(10,\)"):
        stats.fit(1, torch.randn(10, 5), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="owner"):
        stats.fit(-1, torch.randn(10, 5))
    with pytest.raises(ValueError, match="owners: expected owners with statistics"):
        stats.log_likelihood(torch.randn(2, 5), owners=[3])
    with pytest.raises(ValueError, match="rank"):
        InputOwnerStats(rank=-1)
    assert stats.owners == [0] and stats.get_extra_state()["dim"] == before["dim"]


def test_state_dict_round_trip():
    stats = InputOwnerStats(rank=2, min_var=1e-3)
    stats.fit(0, torch.randn(20, 5), torch.randint(0, 3, (20,)))
    stats.fit(1, torch.randn(20, 5) + 2)
    fresh = InputOwnerStats()
    fresh.load_state_dict(stats.state_dict())
    x = torch.randn(7, 5)
    assert fresh.owners == [0, 1] and fresh.rank == 2 and fresh.min_var == 1e-3
    assert torch.equal(fresh.log_likelihood(x)[1], stats.log_likelihood(x)[1])


def test_attach_routes_each_sample_to_its_inferred_owner():
    layer = PEER(8, num_keys=2, heads=1, topk=2, dim_key=4)
    layer.grow(2, owner=1)
    model = torch.nn.Sequential(layer).eval()
    stats = InputOwnerStats(rank=1, per_class=False)
    stats.fit(0, torch.randn(30, 8) - 4)
    stats.fit(1, torch.randn(30, 8) + 4)
    x = torch.cat([torch.randn(3, 8) - 4, torch.randn(3, 8) + 4])
    handle = stats.attach(model)
    out = model(x)
    assert handle.last_owners.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.cat([layer(x[:3], owners=0), layer(x[3:], owners=1)])
    torch.testing.assert_close(out, expected)
    handle.remove()
    assert layer.eval_owners is None
    torch.testing.assert_close(model(x), layer(x, owners="all"))


def _two_owner_model():
    """A PEER layer over two owners and a linear head: logits (N, 3)."""
    layer = PEER(8, num_keys=2, heads=1, topk=2, dim_key=4)
    layer.grow(2, owner=1)
    model = torch.nn.Sequential(layer, torch.nn.Linear(8, 3)).eval()
    stats = InputOwnerStats(rank=1, per_class=False)
    stats.fit(0, torch.randn(30, 8) - 1)
    stats.fit(1, torch.randn(30, 8) + 1)
    return layer, model, stats


def test_soft_attach_mixes_class_probabilities_by_the_input_posterior():
    layer, model, stats = _two_owner_model()
    x = 0.3 * torch.randn(6, 8)  # between the owners: both posteriors matter
    head = model[1]
    probs = [head(layer(x, owners=o)).softmax(-1) for o in (0, 1)]
    owners, ll = stats.log_likelihood(x)
    for temperature in (1.0, 40.0):
        w = (ll / temperature).softmax(1).float()
        want = (w[:, :1] * probs[owners.index(0)] + w[:, 1:] * probs[owners.index(1)]).log()
        handle = stats.attach(model, soft=True, top=2, temperature=temperature)
        got = model(x)
        assert torch.equal(handle.last_owners, ll.argmax(1))
        torch.testing.assert_close(got, want)
        handle.remove()
    assert layer.eval_owners is None and not model._forward_hooks


def test_soft_attach_with_one_owner_is_the_hard_routing():
    layer, model, stats = _two_owner_model()
    x = torch.randn(5, 8)
    hard = stats.attach(model)
    want = model(x).log_softmax(-1)
    hard.remove()
    soft = stats.attach(model, soft=True, top=1)
    torch.testing.assert_close(model(x), want)
    soft.remove()


def test_soft_attach_checks_its_options_and_the_output():
    layer, model, stats = _two_owner_model()
    with pytest.raises(ValueError, match="top"):
        stats.attach(model, soft=True, top=0)
    with pytest.raises(ValueError, match="temperature: expected a float > 0, got 0"):
        stats.attach(model, soft=True, temperature=0)
    seq = torch.nn.Sequential(layer, torch.nn.Unflatten(1, (2, 4))).eval()  # (N, 2, 4)
    handle = stats.attach(seq, soft=True)
    with pytest.raises(TypeError, match=r"soft owner mixing expects logits \(N, C\)"):
        seq(torch.randn(2, 8))
    handle.remove()
    assert layer.eval_owners is None


def test_components_split_each_group_by_k_means():
    centres = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    x = torch.cat([c + 0.3 * torch.randn(20, 3) for c in centres]).double()
    stats = InputOwnerStats(rank=1, components=3)
    stats.fit(0, x, torch.zeros(60, dtype=torch.long))  # one class, three clusters
    groups = stats.groups[0]
    means = torch.stack([g[1] for g in groups])
    assert len(groups) == 3 and [round(math.exp(g[0]), 6) for g in groups] == [0.333333] * 3
    for c in centres.double():  # the cluster means are the blob means, in some order
        assert torch.cdist(c[None], means).min() < 0.5
    # the mixture scores points under their own blob's Gaussian, and is deterministic
    again = InputOwnerStats(rank=1, components=3)
    again.fit(0, x, torch.zeros(60, dtype=torch.long))
    y = torch.randn(4, 3).double()
    assert torch.equal(stats.log_likelihood(y)[1], again.log_likelihood(y)[1])
    parts = [g[0] + MultivariateNormal(g[1], _covariance(*g[2:])).log_prob(y) for g in groups]
    torch.testing.assert_close(stats.log_likelihood(y)[1][:, 0],
                               torch.logsumexp(torch.stack(parts), 0))
    few = InputOwnerStats(rank=1, components=5)
    few.fit(1, x[:3])  # more components than samples: at most one per sample
    assert 1 <= len(few.groups[1]) <= 3
    with pytest.raises(ValueError, match="components"):
        InputOwnerStats(components=0)
    fresh = InputOwnerStats()
    fresh.load_state_dict(stats.state_dict())
    assert fresh.components == 3 and torch.equal(fresh.log_likelihood(y)[1],
                                                 stats.log_likelihood(y)[1])
