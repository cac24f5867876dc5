"""Insurance with a cheap domain prior: only the routes the prior cannot rule out run."""

import math

import pytest
import torch
from tiny_lm import grown_tiny_lm

from peer_ll.models.insurance import NgramDomainPrior, prior_mixture


def _prior() -> NgramDomainPrior:
    prior = NgramDomainPrior(256, order=2)
    prior.fit(torch.randint(0, 8, (50, 33)))  # domain 0: bytes 0-7
    prior.fit(torch.randint(8, 16, (50, 33)))  # domain 1: bytes 8-15
    return prior


def test_prior_posterior_is_causal_and_finds_the_domain():
    prior = _prior()
    idx = torch.cat([torch.randint(0, 8, (2, 16)), torch.randint(8, 16, (2, 16))])
    post = prior(idx).exp()  # (O, B, T)
    assert post.shape == (2, 4, 16)
    torch.testing.assert_close(post.sum(0), torch.ones(4, 16))
    assert (post[0, :2, 2:] > 0.99).all() and (post[1, 2:, 2:] > 0.99).all()
    changed = idx.clone()
    changed[:, 10:] = 0
    torch.testing.assert_close(prior(changed)[:, :, :10], prior(idx)[:, :, :10])


def test_unigram_prior_and_its_smoothing():
    prior = NgramDomainPrior(4, order=1, alpha=1.0)
    prior.fit(torch.tensor([[0, 0, 1]]))
    expected = torch.tensor([3 / 7, 2 / 7, 1 / 7, 1 / 7]).log()
    torch.testing.assert_close(prior.log_probs[0], expected)


def test_full_confidence_is_the_full_mixture_and_costs_every_route():
    model, prior = grown_tiny_lm(), _prior()
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        out, routes = model.insured_mixture(idx, 1.0, prior=prior)
        full = model(idx, owners="infer")[0]
    torch.testing.assert_close(out, full)
    assert routes.tolist() == [2.0, 2.0, 2.0]


def test_zero_confidence_runs_the_prior_top_route_alone():
    model, prior = grown_tiny_lm(), _prior()
    idx = torch.cat([torch.randint(0, 8, (2, 20)), torch.randint(8, 16, (2, 20))])
    with torch.no_grad():
        out, routes = model.insured_mixture(idx, 0.0, prior=prior)
        for b, owner in enumerate([0, 0, 1, 1]):
            single = model(idx[b : b + 1], owners=owner)[0].log_softmax(-1)[0]
            torch.testing.assert_close(out[b, 1:], single[1:])  # the prior is sure after t=0
    # Position 0 ties (no bigram yet): the tied top domains run there, one route after.
    assert all(1.0 <= r <= 1.0 + 1 / 20 + 1e-6 for r in routes.tolist())


def test_routes_run_from_the_start_up_to_their_last_active_position():
    calls = []

    def route_logits(owner, ids):
        calls.append((owner, ids.shape[0]))
        return torch.zeros(ids.shape[0], ids.shape[1], 5)

    log_prior = torch.tensor([[[0.6, 0.6, 0.99, 0.99]], [[0.4, 0.4, 0.01, 0.01]]]).log()
    idx = torch.zeros(1, 4, dtype=torch.long)
    out, routes = prior_mixture(route_logits, idx, [0, 1], log_prior, confidence=0.9)
    assert calls == [(0, 1), (1, 1)]
    assert routes.tolist() == [pytest.approx((4 + 2) / 4)]  # route 1 active at t < 2
    torch.testing.assert_close(out, torch.full((1, 4, 5), -math.log(5)))


def test_bad_input_raises_and_names_it():
    prior = NgramDomainPrior(8)
    with pytest.raises(ValueError, match="fitted domains"):
        prior(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be .* \[0, 8\)"):
        prior.fit(torch.tensor([[9, 1]]))
    assert prior.domains == 0
    with pytest.raises(ValueError, match="order"):
        NgramDomainPrior(8, order=3)
    with pytest.raises(ValueError, match=r"log_prior must have shape \(2, 1, 4\)"):
        prior_mixture(lambda o, i: None, torch.zeros(1, 4, dtype=torch.long), [0, 1],
                      torch.zeros(2, 1, 3), confidence=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="confidence"):
        prior_mixture(lambda o, i: None, torch.zeros(1, 4, dtype=torch.long), [0, 1],
                      torch.zeros(2, 1, 4), confidence=1.5)  # fmt: skip
