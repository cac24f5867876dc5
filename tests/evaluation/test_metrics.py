"""Tests for peer_ll.evaluation.metrics: hand-computed values, signs, errors, Avalanche."""

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from peer_ll.evaluation import metrics as M

# R[i][j]: accuracy on experience j after training on experience i.
ACC = [
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],
    [0.60, 0.40, 0.95],
]
# Perplexity on the same layout (lower is better).
PPL = [
    [10.0, 50.0, 60.0],
    [9.0, 8.0, 40.0],
    [15.0, 11.0, 9.0],
]


def test_accuracy_matrix_hand_computed():
    assert M.average_accuracy(ACC) == pytest.approx((0.60 + 0.40 + 0.95) / 3)
    assert M.learning_accuracy(ACC) == pytest.approx((0.90 + 0.80 + 0.95) / 3)
    # (0.60 - 0.90, 0.40 - 0.80)
    assert M.bwt(ACC) == pytest.approx(-0.35)
    # b = accuracy at initialisation: (R[0][1] - b[1], R[1][2] - b[2]) = (0.0, 0.1)
    assert M.fwt(ACC, [0.1, 0.1, 0.2]) == pytest.approx(0.05)
    # first: (0.90 - 0.60, 0.80 - 0.40); max: (max(0.90, 0.95) - 0.60, max(0.10, 0.80) - 0.40)
    assert M.forgetting(ACC, kind="first") == pytest.approx(0.35)
    assert M.forgetting(ACC, kind="max") == pytest.approx(0.375)
    np.testing.assert_allclose(M.forgetting_per_experience(ACC, kind="max"), [0.35, 0.40])
    # a* - R[k][k] = (0.05, 0.10, 0.00)
    assert M.intransigence(ACC, [0.95, 0.90, 0.95]) == pytest.approx(0.05)
    # a matrix R_joint: its last row is used
    joint = [[0.5, 0.0, 0.0], [0.95, 0.90, 0.95]]
    assert M.intransigence(ACC, joint) == pytest.approx(0.05)


def test_perplexity_matrix_hand_computed():
    kw = {"higher_is_better": False}
    # forgetting = increase: first (15 - 10, 11 - 8); max (15 - min(10, 9), 11 - min(50, 8))
    assert M.forgetting(PPL, kind="first", **kw) == pytest.approx(4.0)
    assert M.forgetting(PPL, kind="max", **kw) == pytest.approx(4.5)
    # bwt positive = improved; here perplexity rose: (10 - 15, 8 - 11)
    assert M.bwt(PPL, **kw) == pytest.approx(-4.0)
    # fwt: (b[1] - R[0][1], b[2] - R[1][2]) = (100 - 50, 100 - 40)
    assert M.fwt(PPL, [100.0, 100.0, 100.0], **kw) == pytest.approx(55.0)
    # intransigence: (10 - 8, 8 - 7, 9 - 9)
    assert M.intransigence(PPL, [8.0, 7.0, 9.0], **kw) == pytest.approx(1.0)
    # relative increase: (5 / 10, 3 / 8)
    assert M.relative_increase(PPL) == pytest.approx(0.4375)
    # plain means do not depend on the flag
    assert M.average_accuracy(PPL, **kw) == M.average_accuracy(PPL) == pytest.approx(35 / 3)


def test_perplexity_flag_flips_signs():
    # Read as accuracies, a rise of perplexity looks like negative forgetting.
    assert M.forgetting(PPL, kind="first") == pytest.approx(-4.0)
    assert M.forgetting(PPL, kind="first", higher_is_better=False) == pytest.approx(4.0)
    assert M.bwt(PPL) == pytest.approx(4.0)
    assert M.relative_increase(ACC, higher_is_better=True) == pytest.approx(
        ((0.9 - 0.6) / 0.9 + (0.8 - 0.4) / 0.8) / 2
    )


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (4, 4), elements=st.floats(0.0, 1.0)))
def test_sign_identities(r):
    assert M.forgetting(r, kind="first") == pytest.approx(-M.bwt(r))
    assert M.forgetting(r, kind="max") >= M.forgetting(r, kind="first") - 1e-12
    for kind in ("max", "first"):
        assert M.forgetting(r, kind=kind, higher_is_better=False) == pytest.approx(
            M.forgetting(-r, kind=kind)
        )


def test_single_experience_means_over_nothing_are_zero():
    assert M.bwt([[0.7]]) == 0.0
    assert M.forgetting([[0.7]]) == 0.0
    assert M.fwt([[0.7]], [0.1]) == 0.0
    assert M.average_accuracy([[0.7]]) == pytest.approx(0.7)


def test_nan_propagates_except_in_best_so_far():
    r = np.array(ACC)
    r[0, 1] = np.nan  # experience 1 not evaluated before training on it
    assert M.forgetting(r, kind="max") == pytest.approx(0.375)
    assert math.isnan(M.fwt(r, [0.1, 0.1, 0.2]))
    r[2, 0] = np.nan
    assert math.isnan(M.forgetting(r, kind="first"))


@pytest.mark.parametrize(
    "bad, shape", [([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], r"\(2, 3\)"), ([1.0, 2.0], r"\(2,\)")]
)
def test_bad_shapes_name_argument_and_shapes(bad, shape):
    with pytest.raises(ValueError, match=r"R must be .*\(T, T\).*got shape " + shape):
        M.bwt(bad)
    with pytest.raises(ValueError, match="R must"):
        M.average_accuracy(np.zeros((0, 0)))


def test_other_argument_errors():
    with pytest.raises(ValueError, match=r"b must have shape \(3,\).*\(2,\)"):
        M.fwt(ACC, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"R_joint must have shape \(3,\)"):
        M.intransigence(ACC, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="kind must be 'max' or 'first', got 'last'"):
        M.forgetting(ACC, kind="last")
    with pytest.raises(ValueError, match="non-zero"):
        M.relative_increase([[0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="R must be a numeric array"):
        M.bwt([[0.1, 0.2], [0.3]])


def test_routing_share_accepts_tensors():
    torch = pytest.importorskip("torch")
    mass = torch.tensor([3.0, 1.0, 0.0, 4.0])
    owners = torch.tensor([0, 0, 1, 2])
    assert M.routing_share(mass, owners) == pytest.approx({0: 0.5, 1: 0.0, 2: 0.5})


def test_routing_share_errors():
    with pytest.raises(ValueError, match=r"owners must be an integer array of shape \(3,\)"):
        M.routing_share([1.0, 1.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="owners must be an integer"):
        M.routing_share([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="positive sum"):
        M.routing_share([0.0, 0.0], [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        M.routing_share([1.0, -1.0], [0, 1])


def test_dead_unit_fraction():
    f = [[0.0, 1.0, -0.1, 0.0004], [0.0, 2.0, -0.05, 0.0002]]
    assert M.dead_unit_fraction(f) == pytest.approx(2 / 4)
    assert M.dead_unit_fraction(f, atol=1e-3) == pytest.approx(3 / 4)  # GELU near zero
    assert M.dead_unit_fraction(f, threshold=1.5) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match=r"features must be .*\(n_samples, n_units\)"):
        M.dead_unit_fraction([1.0, 2.0])


def test_effective_rank():
    assert M.effective_rank(np.diag([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    # p = (0.75, 0.25): exp(-(0.75 log 0.75 + 0.25 log 0.25))
    assert M.effective_rank(np.diag([3.0, 1.0])) == pytest.approx(1.7547654628278856)
    assert M.effective_rank(np.outer([1.0, 2.0, 3.0], [1.0, -1.0])) == pytest.approx(1.0)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    assert M.effective_rank(q) == pytest.approx(6.0)
    assert M.effective_rank(np.zeros((3, 2))) == 0.0


# ---- agreement with Avalanche's own forgetting metric -----------------------


@pytest.fixture(scope="module")
def avalanche_run():
    """Trains Naive on digits in 3 experiences (4, 3, 3 classes) with a shared head.

    Class ids restart from 0 in each experience, so old experiences are partly
    forgotten rather than wiped out, and some entries of R differ in sign of change.

    Returns the (T, T) accuracy matrix and the metrics dict of the last eval.
    """
    torch = pytest.importorskip("torch")
    from avalanche.benchmarks import nc_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from sklearn.datasets import load_digits

    class Digits(torch.utils.data.TensorDataset):
        def __init__(self, x, y):
            super().__init__(x, y)
            self.targets = y.tolist()

        def __getitem__(self, i):
            return self.tensors[0][i], int(self.tensors[1][i])

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    bm = nc_benchmark(
        Digits(x[:1400], y[:1400]),
        Digits(x[1400:], y[1400:]),
        3,
        task_labels=False,
        fixed_class_order=list(range(10)),
        per_exp_classes={0: 4},
        class_ids_from_zero_in_each_exp=True,  # a shared 4-way head: partial forgetting
    )
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with warnings.catch_warnings():  # "No loggers specified": intended, we read the dicts
        warnings.simplefilter("ignore", UserWarning)
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True),
            forgetting_metrics(experience=True, stream=True),
            loggers=[],
        )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        train_mb_size=32,
        train_epochs=1,
        eval_mb_size=256,
        evaluator=evaluator,
        device="cpu",
    )
    rows, logs = [], []
    for exp in bm.train_stream:
        strategy.train(exp)
        logs.append(strategy.eval(bm.test_stream))
        accs = {
            int(m.group(1)): v
            for k, v in logs[-1].items()
            if (m := re.fullmatch(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)", k))
        }
        rows.append([accs[j] for j in range(len(accs))])
    return np.array(rows), logs


def test_first_forgetting_matches_avalanche(avalanche_run):
    R, logs = avalanche_run
    assert R.shape == (3, 3)
    # a real run: something was forgotten, otherwise the comparison is vacuous
    assert M.forgetting(R, kind="first") > 0.1
    for i, log in enumerate(logs):  # after each training experience i
        sub = R[: i + 1, : i + 1]
        stream = log["StreamForgetting/eval_phase/test_stream"]
        assert M.forgetting(sub, kind="first") == pytest.approx(stream, abs=1e-12)
        per_exp = M.forgetting_per_experience(sub, kind="first")
        for j in range(i):
            key = f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"
            assert per_exp[j] == pytest.approx(log[key], abs=1e-12)
