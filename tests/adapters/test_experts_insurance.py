"""Insurance on an HF model with PEER experts: every route only while the domain is unsure."""

import math

import pytest
import torch
from hf_tiny import VOCAB, tiny_gpt2

from peer_ll.adapters import ExpertsConfig, add_experts

SMALL = ExpertsConfig(heads=2, topk=2, dim_key=8)


def two_domains():
    torch.manual_seed(0)
    model = add_experts(tiny_gpt2(), SMALL, num_keys=3, owner=1)
    add_experts(model, num_keys=3, owner=2)
    for branch in model.branches().values():  # distinct, non-zero experts for each domain
        with torch.no_grad():
            branch.experts.up.normal_(0.0, 0.5)
    return model.eval()


def test_insurance_at_full_confidence_is_the_full_mixture():
    model = two_domains()
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, owners="infer").logits
        insured, routes = model.insured_mixture(ids, confidence=1.0, probe=4)
    sure = model.domain_posterior(ids).max(0).values >= 1.0  # (B, T): where it would commit
    keep = ~sure.any(1)
    assert keep.any()  # some sequence never reaches a posterior of 1
    torch.testing.assert_close(insured[keep], full[keep])
    assert torch.all(routes[keep] == len(model.owners))


def test_insurance_at_zero_confidence_commits_to_the_first_top_domain():
    model = two_domains()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        insured, routes = model.insured_mixture(ids, confidence=0.0, probe=2)
        top = model.domain_posterior(ids)[:, :, 0].argmax(0)  # (B,) the top domain at t=0
        full = model(ids, owners="infer").logits
        for b in range(2):
            owner = model.owners[int(top[b])]
            routed = model(ids[b : b + 1], owners=owner).logits.float().log_softmax(-1)
            torch.testing.assert_close(insured[b, 1:], routed[0, 1:])
            torch.testing.assert_close(insured[b, 0], full[b, 0])
    # O routes for the first position, one for the 8 others
    assert torch.allclose(routes, torch.full((2,), (len(model.owners) + 8) / 9))
    out = model(ids, owners="infer", confidence=0.0)
    torch.testing.assert_close(out.logits, insured)


def test_confidence_is_checked():
    model = two_domains()
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="confidence must be"):
        model.insured_mixture(ids, confidence=1.5)
    with pytest.raises(ValueError, match='confidence must be None unless owners="infer"'):
        model(ids, owners=1, confidence=0.5)


def test_a_sure_prior_runs_its_top_route_alone():
    model = two_domains()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    picks = [1, 2]  # the prior is certain: sequence b belongs to owner picks[b]

    def prior(x):  # (B, T) -> (O, B, T) log-posterior, in model.owners' order
        log_post = torch.full((len(model.owners), *x.shape), -math.inf)
        for b, owner in enumerate(picks):
            log_post[model.owners.index(owner), b] = 0.0
        return log_post

    with torch.no_grad():
        insured, routes = model.insured_mixture(ids, confidence=0.5, prior=prior)
        for b, owner in enumerate(picks):
            routed = model(ids[b : b + 1], owners=owner).logits.float().log_softmax(-1)
            torch.testing.assert_close(insured[b], routed[0])
    assert routes.tolist() == [1.0, 1.0]
