"""PEERLM owners="infer" with insurance: every route only while the posterior is unsure."""

import pytest
import torch
from tiny_lm import grown_tiny_lm


def test_unreachable_confidence_is_the_full_mixture():
    model = grown_tiny_lm()
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        out, routes = model.insured_mixture(idx, 1.0, probe=4)
        full = model(idx, owners="infer")[0]
    posterior = model.domain_posterior(idx)
    assert (posterior.max(0).values < 1.0).all()  # so nothing commits
    torch.testing.assert_close(out, full)
    assert routes.tolist() == [2.0, 2.0, 2.0]


def test_a_committed_sequence_takes_the_top_route_after_its_commit_point():
    model = grown_tiny_lm()
    idx = torch.randint(0, 256, (4, 24))
    with torch.no_grad():
        post = model.domain_posterior(idx)  # (O, B, T)
        top = post.max(0).values
        confidence = float(top[:, 1:].median())
        out, routes = model.insured_mixture(idx, confidence, probe=2)
        full = model(idx, owners="infer")[0]
        logits, _ = model(idx, owners="infer", confidence=confidence)
    torch.testing.assert_close(logits, out)
    for b in range(4):
        sure = (top[b] >= confidence).nonzero()
        if len(sure) == 0:
            torch.testing.assert_close(out[b], full[b])
            assert routes[b] == 2.0
            continue
        t = int(sure[0])
        d = model.owners[int(post[:, b, t].argmax())]
        torch.testing.assert_close(out[b, : t + 1], full[b, : t + 1])
        with torch.no_grad():
            own = model(idx[b : b + 1], owners=d)[0][0].log_softmax(-1)
        torch.testing.assert_close(out[b, t + 1 :], own[t + 1 :])
        assert routes[b] == pytest.approx((2 * (t + 1) + (24 - t - 1)) / 24)
    assert routes.mean() < 2.0  # some sequence committed


def test_confidence_is_checked():
    model = grown_tiny_lm()
    with pytest.raises(ValueError, match="confidence must be a float in"):
        model.insured_mixture(torch.zeros(1, 4, dtype=torch.long), 1.5)
