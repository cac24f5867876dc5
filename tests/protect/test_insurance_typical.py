"""Insurance mode "typical": the posterior proposes owners, their routes' features decide."""

import pytest
import torch
from test_routed import clusters, fitted, two_owner_model

from peer_ll.protect import OwnerRouted
from peer_ll.protect.insurance import (
    RouteTypicality,
    insured_forward,
    owner_posterior,
    route_features,
)


def _setup():
    torch.manual_seed(0)
    model = two_owner_model()
    evidence = RouteTypicality()
    for owner, x in clusters(60).items():
        evidence.fit(model, owner, x, torch.randint(0, 3, (60,)))
    return model, OwnerRouted(model, fitted(model)).eval(), evidence


def test_scores_are_standardised_on_the_owner_data_and_low_off_it():
    model, _, evidence = _setup()
    torch.manual_seed(1)
    x = clusters(60)
    _, own = route_features(model, x[0], 0)
    _, other = route_features(model, x[1], 0)
    assert evidence.owners == [0, 1]
    assert float(evidence(0, own).mean()) > -1.0
    assert float(evidence(0, other).max()) < float(evidence(0, own).median()) - 3.0
    fit_x, fit_y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    evidence.fit(model, 0, fit_x, fit_y)  # a refit replaces the owner's statistics
    _, f = route_features(model, fit_x, 0)
    scores = evidence(0, f).double()
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-5)
    assert evidence.owners == [0, 1]


def test_paying_inputs_take_the_most_typical_of_their_top_routes():
    model, routed, evidence = _setup()
    torch.manual_seed(2)
    x = torch.cat([clusters(10)[0], clusters(10)[1], torch.randn(5, 8)])
    out, report = insured_forward(routed, x, threshold=1.01, top=2, mode="typical",
                                  evidence=evidence)  # fmt: skip
    assert report.paid.all() and report.routes_per_input == 2.0
    logits = [route_features(model, x, o) for o in (0, 1)]
    scores = torch.stack([evidence(o, f) for o, (_, f) in enumerate(logits)])  # (2, B)
    want = torch.stack([z.log_softmax(-1) for z, _ in logits])[scores.argmax(0), range(len(x))]
    torch.testing.assert_close(out, want)
    assert scores[:, :10].argmax(0).tolist() == [0] * 10  # the clusters pick their owner
    assert scores[:, 10:20].argmax(0).tolist() == [1] * 10


def test_sure_inputs_keep_their_one_route():
    model, routed, evidence = _setup()
    x = torch.cat([clusters(4)[0], clusters(4)[1]])
    ids, post = owner_posterior(routed, x)
    plain, _ = insured_forward(routed, x, threshold=0.0)
    out, report = insured_forward(routed, x, threshold=0.0, mode="typical", evidence=evidence)
    assert not report.paid.any()
    torch.testing.assert_close(out, plain)


def test_bad_input_raises_and_changes_nothing():
    model, routed, evidence = _setup()
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="evidence"):
        insured_forward(routed, x, mode="typical")
    with pytest.raises(ValueError, match="owner must be one of"):
        evidence(5, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="same N"):
        evidence.fit(model, 2, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="layer"):
        route_features(model, x, 0, layer="nope")
    with pytest.raises(ValueError, match="shrink"):
        RouteTypicality(shrink=2.0)
    assert evidence.owners == [0, 1]


def test_plugin_fits_each_owner_after_its_experience(small_peer, class_stream):
    from peer_ll.protect import peer_protect, protect_classifier
    from peer_ll.protect.insurance import FitRouteTypicality

    model = protect_classifier(64, 9, experiences=3, hidden=16, peer=dict(small_peer, num_keys=4))
    evidence = RouteTypicality()
    strategy = peer_protect(model, train_mb_size=32, eval_mb_size=64, evaluator=None,
                            train_epochs=2, plugins=[FitRouteTypicality(evidence)])  # fmt: skip
    for exp in class_stream.train_stream:
        strategy.train(exp)
    assert evidence.owners == [0, 1, 2]
    routed = strategy.model.eval()
    for owner, exp in enumerate(class_stream.train_stream):
        data = exp.dataset.eval()
        x = torch.stack([data[i][0] for i in range(len(data))])
        _, f = route_features(routed.model, x, owner)
        scores = evidence(owner, f).double()  # the fit data: standardised exactly
        assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(TypeError, match="evidence"):
        FitRouteTypicality("not evidence")
