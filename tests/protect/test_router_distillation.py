"""RouterDistillation (LwF on routing) and QueryDistillation."""

from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin

from peer_ll.experts import PEER
from peer_ll.protect import QueryDistillation, RouterDistillation, routing_kl
from peer_ll.strategies import GrowthPolicy, peer_classifier, peer_grow


def _pair(small_peer):
    student = PEER(8, **small_peer, query_norm="layer")
    teacher = PEER(8, **small_peer, query_norm="layer")
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def test_routing_kl_is_zero_for_equal_models_and_positive_otherwise(small_peer):
    student, teacher = _pair(small_peer)
    x = torch.randn(10, 8)
    q = student.query(x)  # (10, H, d)
    _, ids = student.retrieve(x)
    assert routing_kl(student, q, teacher, q.detach(), ids, ids).abs() < 1e-6
    q_moved = (q.detach() + 0.5 * torch.randn_like(q)).requires_grad_()
    _, moved_ids = student.retrieve(x * 3.0)
    loss = routing_kl(student, q_moved, teacher, q.detach(), ids, moved_ids, temperature=2.0)
    assert loss > 1e-3
    loss.backward()
    assert q_moved.grad.abs().sum() > 0


def test_routing_kl_matches_a_direct_computation(small_peer):
    # 8 sub-keys per side: a union of up to 8 candidates per row (the CPU score kernel
    # fails on rows of more ids than sub-key rows).
    student, teacher = _pair(small_peer | dict(num_keys=8))
    x = torch.randn(6, 8)
    q_t = student.query(x).detach()
    q_s = q_t * 1.5
    _, ids_t = student.retrieve(x)
    _, ids_s = student.retrieve(-x)
    union = [
        sorted(set(a) | set(b))
        for a, b in zip(ids_t.flatten(0, 1).tolist(), ids_s.flatten(0, 1).tolist(), strict=True)
    ]
    expected = []
    for row, cands in enumerate(union):
        t, h = divmod(row, q_t.shape[1])
        ids = torch.tensor(cands)[None, None]  # (1, 1, C)
        p = teacher._scores(q_t[t : t + 1, h : h + 1], ids).log_softmax(-1)
        r = student._scores(q_s[t : t + 1, h : h + 1], ids).log_softmax(-1)
        expected.append((p.exp() * (p - r)).sum())
    got = routing_kl(student, q_s, teacher, q_t, ids_t, ids_s)
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


class LossTrace(SupervisedPlugin):
    def __init__(self, distill):
        super().__init__()
        self.distill, self.losses = distill, []

    def before_training_exp(self, strategy, **kwargs):
        self.losses.append([])

    def after_backward(self, strategy, **kwargs):
        self.losses[-1].append(self.distill.last_loss)
        self.distill.last_loss = float("nan")


@pytest.mark.parametrize(
    "make",
    [RouterDistillation, QueryDistillation, lambda a: RouterDistillation(a, query_alpha=1.0)],
    ids=["router", "query", "router+query"],
)
def test_distillation_starts_at_zero_and_pulls_after_the_first_experience(
    make, small_peer, class_stream
):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    distill = make(1.0)
    trace = LossTrace(distill)
    strategy = peer_grow(
        model, plugins=[distill, trace], train_mb_size=32, train_epochs=2, evaluator=None
    )
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    first, second = trace.losses
    assert all(v != v for v in first)  # NaN: no teacher, no loss on the first experience
    assert second[0] == pytest.approx(0.0, abs=1e-6)  # the teacher is the start of this one
    assert max(second[1:]) > 1e-4
    assert distill.teacher is None  # dropped after the experience


def test_replay_buffer_batches(class_stream):
    data = class_stream.train_stream[0].dataset
    distill = RouterDistillation(buffer=SimpleNamespace(buffer=data), replay_mb_size=5)
    x, task = distill._replay_batch()
    assert x.shape == (5, 64) and task.shape == (5,)
    assert RouterDistillation()._replay_batch() is None


def test_distillation_with_a_buffer_trains(small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    old = class_stream.train_stream[0].dataset
    distill = RouterDistillation(buffer=old, replay_mb_size=8)
    trace = LossTrace(distill)
    strategy = peer_grow(model, plugins=[distill, trace], train_mb_size=32, evaluator=None)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    assert all(v == v for v in trace.losses[1])  # a loss on every step of the second
    assert model.peer_layers[0].num_segments == 2


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=-1.0), dict(temperature=0.0), dict(query_alpha=-1.0), dict(replay_mb_size=0)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RouterDistillation(**kwargs)
