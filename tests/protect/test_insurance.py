"""Retrieval insurance: extra routes only for inputs whose owner posterior is uncertain."""

import pytest
import torch
from test_routed import clusters, fitted, two_owner_model

from peer_ll.experts import OwnerMix, mix_owners
from peer_ll.protect import OwnerRouted
from peer_ll.protect.insurance import insured_forward, owner_posterior


def _routed():
    model = two_owner_model()
    return model, OwnerRouted(model, fitted(model)).eval()


def test_sure_inputs_take_one_route_and_unsure_ones_mix_the_top_owners():
    model, routed = _routed()
    sure = torch.cat([clusters(3)[0], clusters(3)[1]])  # far from the boundary
    unsure = torch.randn(4, 8) * 0.1  # between the two clusters
    x = torch.cat([sure, unsure])
    ids, post = owner_posterior(routed, x, temperature=20.0)
    conf = post.max(1).values
    threshold = float((conf[:6].min() + conf[6:].max()) / 2)
    assert conf[:6].min() > conf[6:].max()  # the split below is decided by confidence
    out, report = insured_forward(routed, x, threshold=threshold, top=2, temperature=20.0)
    assert report.paid.tolist() == [False] * 6 + [True] * 4
    assert report.share == pytest.approx(0.4) and report.routes_per_input == pytest.approx(1.4)
    with torch.no_grad():
        hard = model(sure, owners=ids[post[:6].argmax(1)]).log_softmax(-1)
        w, pick = post[6:].topk(2, dim=1)
        mixed = mix_owners(
            lambda o: model(unsure, owners=o).softmax(-1),
            OwnerMix(ids[pick], w / w.sum(1, keepdim=True)),
        ).log()
    torch.testing.assert_close(out[:6], hard)
    torch.testing.assert_close(out[6:], mixed)


def test_threshold_zero_is_the_plain_argmax_route():
    model, routed = _routed()
    x = torch.randn(5, 8)
    out, report = insured_forward(routed, x, threshold=0.0)
    assert not report.paid.any() and report.routes_per_input == 1.0
    with torch.no_grad():
        torch.testing.assert_close(out, routed(x).log_softmax(-1))


def test_arguments_are_checked():
    model, routed = _routed()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="threshold"):
        insured_forward(routed, x, threshold=-0.1)
    with pytest.raises(ValueError, match="top"):
        insured_forward(routed, x, top=0)
    with pytest.raises(TypeError, match="routed"):
        insured_forward(model, x)
    with pytest.raises(ValueError, match="fitted owner scorer"):
        insured_forward(OwnerRouted(model).eval(), x)


def test_wide_mode_mixes_the_top_route_with_every_expert():
    model, routed = _routed()
    x = torch.randn(6, 8) * 0.1
    ids, post = owner_posterior(routed, x, temperature=20.0)
    conf, best = post.max(1)
    out, report = insured_forward(routed, x, threshold=1.01, mode="wide", temperature=20.0)
    assert report.paid.all() and report.routes_per_input == 2.0
    with torch.no_grad():
        want = (conf[:, None] * model(x, owners=ids[best]).softmax(-1)
                + (1 - conf[:, None]) * model(x, owners=None).softmax(-1)).log()  # fmt: skip
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="mode"):
        insured_forward(routed, x, mode="deep")
