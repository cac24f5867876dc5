"""The StreamingLDA baseline: Avalanche's statistics, a minibatch at a time, and it learns."""

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import StreamingLDA
from avalanche.training.plugins import EvaluationPlugin

from peer_ll.data import make_stream
from peer_ll.strategies.baselines import BatchStreamingLDA, TaskStreamingLDA, streaming_lda

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified:UserWarning")


def _evaluator():
    return EvaluationPlugin(accuracy_metrics(stream=True, experience=True), loggers=[])


def _avalanche_lda(in_features, n_classes, **kwargs):
    return StreamingLDA(
        slda_model=torch.nn.Flatten(), criterion=torch.nn.CrossEntropyLoss(),
        input_size=in_features, num_classes=n_classes, **kwargs,
    )  # fmt: skip


def _stream_accuracy(results):
    return [v for k, v in results.items() if k.startswith("Top1_Acc_Stream/eval_phase")]


def test_fit_batch_matches_avalanche_sample_by_sample():
    """The same statistics as Avalanche's per-sample fit, run in float64 as the reference."""
    ref = _avalanche_lda(6, 4, evaluator=None)
    ref.muK, ref.cK, ref.Sigma = ref.muK.double(), ref.cK.double(), ref.Sigma.double()
    ours = streaming_lda(6, 4, evaluator=None)
    for size in (1, 9, 17):  # the first batch has one sample; class 3 never appears
        x, y = torch.randn(size, 6) * 3 + 1, torch.randint(0, 3, (size,))
        for xi, yi in zip(x, y, strict=True):
            ref.fit(xi[None].double(), yi[None])
        ours.fit_batch(x, y)
    assert ours.num_updates == ref.num_updates == 27
    assert torch.equal(ours.cK, ref.cK.float())
    # fp32 against fp64 over 27 updates: errors of a few float32 ulps
    for name in ("muK", "Sigma"):
        want, got = getattr(ref, name), getattr(ours, name).double()
        assert (got - want).norm() / want.norm() < 1e-6, name
    assert ours.muK[3].abs().sum() == 0 and ours.Sigma.abs().sum() > 0


def test_learns_digits_class_incremental_like_avalanche():
    bench = make_stream("digits", kind="class", n_experiences=5, seed=0)
    ours = streaming_lda(64, bench.n_classes, evaluator=_evaluator(), train_mb_size=64)
    ref = _avalanche_lda(64, bench.n_classes, evaluator=_evaluator(), train_mb_size=64)
    for exp in bench.train_stream:
        ours.train(exp)
        ref.train(exp)
    acc = _stream_accuracy(ours.eval(bench.test_stream))[0]
    assert acc > 0.9  # chance: 0.1; no network, no replay
    assert abs(acc - _stream_accuracy(ref.eval(bench.test_stream))[0]) < 0.01
    assert isinstance(ours, StreamingLDA) and type(ours) is BatchStreamingLDA
    first = [v for k, v in ours.evaluator.get_last_metrics().items() if k.endswith("Exp000")]
    assert first[0] > 0.85  # the first experience is not forgotten


def test_task_incremental_uses_the_task_label():
    bench = make_stream("digits", kind="task", n_experiences=5, seed=0)
    tasks = streaming_lda(64, 2, n_tasks=5, evaluator=_evaluator())
    shared = streaming_lda(64, 2, evaluator=_evaluator())  # class means shared across tasks
    for exp in bench.train_stream:
        tasks.train(exp)
        shared.train(exp)
    assert isinstance(tasks, TaskStreamingLDA) and tasks.muK.shape == (10, 64)
    with_task = _stream_accuracy(tasks.eval(bench.test_stream))[0]
    per_exp = [v for k, v in tasks.evaluator.get_last_metrics().items() if "/Exp" in k]
    without = _stream_accuracy(shared.eval(bench.test_stream))[0]
    assert len(per_exp) == 5 and min(per_exp) > 0.95  # chance: 0.5 per task
    assert with_task > without + 0.05


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="train_epochs must not be given: .*got train_epochs=3"):
        streaming_lda(4, 2, train_epochs=3)
    with pytest.raises(ValueError, match="n_classes must be an int >= 1, got 0"):
        streaming_lda(4, 0)
    with pytest.raises(TypeError, match="n_tasks must be an int >= 1, got float 2.0"):
        streaming_lda(4, 2, n_tasks=2.0)
    with pytest.raises(ValueError, match=r"shrinkage must be in \[0, 1\], got 2"):
        streaming_lda(4, 2, shrinkage=2)
    bench = make_stream("digits", kind="task", n_experiences=5, max_train_per_exp=10)
    strategy = streaming_lda(64, 2, n_tasks=3, evaluator=None)
    strategy.train(bench.train_stream[0])
    with pytest.raises(ValueError, match="task labels must be < n_tasks = 3, got 3"):
        strategy.train(bench.train_stream[3])
