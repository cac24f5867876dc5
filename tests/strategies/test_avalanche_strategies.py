"""Nine Avalanche strategies, built directly, on a PEERClassifier whose pool grows."""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from peer_ll.optim import make_optimizer
from peer_ll.strategies import DenseExpertGrads, GrowthPolicy, peer_classifier, peer_grow

STRATEGIES = {
    "Naive": {},
    "EWC": dict(ewc_lambda=1.0),
    "LwF": dict(alpha=1.0, temperature=2.0),
    "Replay": dict(mem_size=30),
    "GEM": dict(patterns_per_exp=10),
    "AGEM": dict(patterns_per_exp=10, sample_size=10),
    "SynapticIntelligence": dict(si_lambda=1.0),
    "Cumulative": {},
    "JointTraining": {},
}
# GEM and A-GEM reshape p.grad, which row-sparse gradients do not support.
NEEDS_DENSE = {"GEM", "AGEM"}


class FrozenRowsCheck(SupervisedPlugin):
    """Records, per experience, whether rows frozen at its start are bit-identical at its end."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.identical, self.trained, self._before = layers, [], [], []

    def before_training_exp(self, strategy, **kwargs):
        self._before = [
            (layer.expert_frozen.clone(), layer.key_frozen.clone(),
             layer.down.detach().clone(), layer.up.detach().clone(),
             layer.sub_keys.detach().clone())
            for layer in self.layers
        ]  # fmt: skip

    def after_training_exp(self, strategy, **kwargs):
        for layer, (rows, keys, down, up, sub_keys) in zip(self.layers, self._before, strict=True):
            self.identical.append(
                torch.equal(layer.down[rows], down[rows])
                and torch.equal(layer.up[rows], up[rows])
                and torch.equal(layer.sub_keys[keys], sub_keys[keys])
            )
            live = ~rows[: layer.num_experts]
            n = layer.num_experts
            self.trained.append(not torch.equal(layer.up[:n][live], up[:n][live]))


def _model(small_peer, **kwargs):
    return peer_classifier(
        64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48), **kwargs
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_grows_freezes_and_keeps_frozen_rows(name, small_peer, class_stream):
    import avalanche.training as training

    model = _model(small_peer)
    check = FrozenRowsCheck(model.peer_layers)
    plugins = [check] + ([DenseExpertGrads()] if name in NEEDS_DENSE else [])
    strategy = getattr(training, name)(
        model=model,
        optimizer=make_optimizer(model, lr=1e-2),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32,
        eval_mb_size=64,
        evaluator=None,
        plugins=plugins,
        **STRATEGIES[name],
    )
    if name == "JointTraining":
        strategy.train(class_stream.train_stream)
    else:
        for exp in class_stream.train_stream:
            strategy.train(exp)
    layer = model.peer_layers[0]
    assert layer.segment_owner.tolist() == [0, 1, 2]  # "always": one segment per experience
    assert layer.num_experts == 48
    # "previous": older owners that trained; JointTraining grows every segment before it
    # trains any, so none of them has trained when the next growth comes.
    frozen = 0 if name == "JointTraining" else 32
    assert layer.frozen.tolist() == [True] * frozen + [False] * (48 - frozen)
    assert check.identical and all(check.identical)
    assert any(check.trained)  # something did train, so the check above could fail
    assert layer.sparse_grad  # DenseExpertGrads (GEM, A-GEM) restores the setting


@pytest.mark.parametrize(
    "head, stream, when, segments",
    [
        ("incremental", "class_stream", "always", 3),
        ("multihead", "task_stream", "new_tasks", 3),
        ("fixed", "domain_stream", "new_classes", 1),
        ("fixed", "domain_stream", "always", 2),
    ],
)
def test_heads_serve_their_streams(head, stream, when, segments, small_peer, request):
    bench = request.getfixturevalue(stream)
    classes = 3 if head == "multihead" else (4 if head == "fixed" else 10)
    model = peer_classifier(
        64, classes, hidden=16, peer=small_peer, head=head, growth=GrowthPolicy(when=when)
    )
    strategy = peer_grow(model, train_mb_size=32, eval_mb_size=64, evaluator=None)
    for exp in bench.train_stream:
        strategy.train(exp)
    assert model.peer_layers[0].num_segments == segments
    x = torch.stack([bench.test_stream[0].dataset[i][0] for i in range(8)])
    if head == "multihead":
        assert set(model.head.classifiers) == {"0", "1", "2"}
        assert model(x, torch.zeros(8, dtype=torch.long)).shape == (8, 3)
    else:
        assert model.eval()(x).shape == (8, classes)
