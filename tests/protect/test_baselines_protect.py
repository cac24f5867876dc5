"""Owner inference alone as a classifier, the per-owner MLP ablation, task labels as owners."""

import pytest
import torch

from peer_ll.experts import PEER, PerOwner
from peer_ll.protect import InputOwnerStats, peer_protect, protect_classifier, protect_plugin
from peer_ll.protect.mlp_ablation import (
    owner_mlp_classifier,
    peer_active_parameters,
)
from peer_ll.protect.stats_classifier import InputStatsClassifier, input_stats_classifier

COMMON = dict(train_mb_size=32, eval_mb_size=64, evaluator=None)


def _test_xy(stream, exp):
    data = stream.test_stream[exp].dataset
    xs, ys = zip(*((data[i][0], data[i][1]) for i in range(len(data))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def test_stats_classifier_uses_the_owner_inference_gaussians():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(4, 6, generator=gen) * 4
    y = torch.arange(4).repeat_interleave(50)
    x = means[y] + torch.randn(200, 6, generator=gen)
    clf = InputStatsClassifier(4, rank=3)
    clf.fit(0, x[y < 2], y[y < 2])
    clf.fit(1, x[y >= 2], y[y >= 2])
    assert clf.owners == [0, 1]
    assert (clf(x).argmax(1) == y).float().mean() > 0.97
    # the owner's posterior is the one InputOwnerStats(per_class=True) computes
    stats = InputOwnerStats(3, per_class=True)
    stats.fit(None, 0, x[y < 2], y[y < 2])
    stats.fit(None, 1, x[y >= 2], y[y >= 2])
    _, ll = stats.log_likelihood(x)
    keys, group_ll = clf.stats.log_likelihood(x)
    counts = torch.tensor([clf.groups[k][2] for k in keys], dtype=torch.float64)
    for owner in (0, 1):
        mine = torch.tensor([clf.groups[k][0] == owner for k in keys])
        expect = torch.logsumexp(group_ll[:, mine] + (counts[mine] / counts[mine].sum()).log(), 1)
        torch.testing.assert_close(expect, ll[:, owner])
    # owners restrict the classes: owner 1 never predicts classes 0, 1
    assert set(clf(x, owners=1).argmax(1).tolist()) <= {2, 3}
    assert clf(x, owners=torch.zeros(200, dtype=torch.long))[:, 2:].max() <= -1e3
    clf.fit(1, x[y == 3], y[y == 3])  # refit replaces the owner's Gaussians
    assert sorted(c for o, c, _ in clf.groups.values() if o == 1) == [3]


def test_stats_classifier_rejects_bad_input_and_changes_nothing():
    clf = InputStatsClassifier(3)
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    clf.fit(0, x, y)
    before = dict(clf.groups)
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\), got \[0, 5\]"):
        clf.fit(1, x, torch.tensor([0, 5] * 5))
    with pytest.raises(ValueError, match="y must be a tensor of shape"):
        clf.fit(1, x, y[:3])
    with pytest.raises(ValueError, match="x must have 4 values per sample, got 5"):
        clf.fit(1, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="num_classes"):
        InputStatsClassifier(0)
    assert clf.groups == before and clf.owners == [0]
    assert torch.equal(InputStatsClassifier(3)(x), torch.zeros(10, 3))  # nothing fitted


@pytest.mark.parametrize("task_labels", [False, True])
def test_stats_classifier_strategy_learns_digits_without_forgetting(
    task_labels, class_stream, task_stream
):
    stream = task_stream if task_labels else class_stream
    classes = 3 if task_labels else 9
    strategy = input_stats_classifier(64, classes, task_labels=task_labels, evaluator=None)
    for exp in stream.train_stream:
        strategy.train(exp)
    assert strategy.model.owners == [0, 1, 2]
    for exp, owner in ((0, 0), (2, 2)):
        x, y = _test_xy(stream, exp)
        owners = owner if task_labels else None
        acc = (strategy.model(x, owners=owners).argmax(1) == y).float().mean()
        assert acc > (0.9 if task_labels else 0.8), (exp, acc)
    with pytest.raises(ValueError, match="train_epochs must not be given"):
        input_stats_classifier(64, 9, train_epochs=2)


def test_mlp_ablation_matches_active_parameters_and_keeps_old_owners(small_peer, class_stream):
    peer_model = protect_classifier(64, 9, experiences=3, hidden=16, owner_encoder=True,
                                    peer=dict(small_peer, num_keys=4))  # fmt: skip
    layer = peer_model.blocks[0].peer
    model = owner_mlp_classifier(64, 9, experiences=3, hidden=16, owner_encoder=True,
                                 peer=dict(small_peer, num_keys=4))  # fmt: skip
    assert not any(isinstance(m, PEER) for m in model.modules())
    block = model.blocks[0]
    assert isinstance(block.peer, PerOwner) and isinstance(block.norm, torch.nn.LayerNorm)
    mlp_params = sum(p.numel() for p in block.peer.copies["0"].parameters())
    assert abs(mlp_params - peer_active_parameters(layer)) <= 16 + 16 + 1  # one unit's worth
    strategy = peer_protect(model, inference="input", **COMMON)
    x0, _ = _test_xy(class_stream, 0)
    strategy.train(class_stream.train_stream[0])
    model.eval()
    with torch.no_grad():
        old = model(x0, owners=0)
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert block.peer.owners == [0, 1, 2] and model.encoder[1].owners == [0, 1, 2]
    assert not model.norm.weight.requires_grad  # the trunk froze after the first owner
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x0, owners=0), old)
        assert not torch.equal(model(x0, owners=2), old)
    strategy.eval(class_stream.test_stream)
    assert sum(protect_plugin(strategy).inference_accuracy.values()) / 3 > 0.8


def test_task_labels_pick_the_owner_on_task_streams(small_peer, task_stream, class_stream):
    model = protect_classifier(64, 3, experiences=3, hidden=16, owner_encoder=True,
                               peer=dict(small_peer, num_keys=4))  # fmt: skip
    # an owner encoder needs owners before PEER: fine when task labels give them
    strategy = peer_protect(model, task_labels=True, **COMMON)
    plugin = protect_plugin(strategy)
    for exp in task_stream.train_stream:
        strategy.train(exp)
    assert plugin.task_labels is True and plugin.task_owner == {0: 0, 1: 1, 2: 2}
    seen = []
    model_forward = strategy.model.forward

    def spy(x, owners=None):
        seen.append(strategy.model.owner)
        return model_forward(x, owners)

    strategy.model.forward = spy
    strategy.eval(task_stream.test_stream)
    assert seen and set(seen) == {0, 1, 2} and strategy.model.owner is None
    # auto: the stream decides
    auto = peer_protect(protect_classifier(64, 9, experiences=3, hidden=16,
                                           peer=dict(small_peer, num_keys=4)),
                        inference="input", **COMMON)  # fmt: skip
    auto.train(class_stream.train_stream[0])
    assert protect_plugin(auto).task_labels is False
    with pytest.raises(TypeError, match="task_labels"):
        peer_protect(protect_classifier(64, 9, experiences=3, hidden=16), task_labels="yes")
