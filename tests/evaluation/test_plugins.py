"""Plugin metrics on a tiny PEER model: values match direct computation, loggers see them."""

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from peer_ll.evaluation import metrics as M
from peer_ll.evaluation.plugins import (
    PEERRoutingMetrics,
    PlasticityHealth,
    parse_metric_name,
    peer_metrics,
)
from peer_ll.experts import PEER, expert_usage, unevenness
from peer_ll.optim import make_optimizer

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stream():
    from peer_ll.data import make_stream

    return make_stream(
        "digits", kind="class", n_experiences=3, max_train_per_exp=60, max_test_per_exp=24
    )


def _model(act=nn.GELU):
    from peer_ll.strategies import GrowthPolicy, attach_growth

    model = nn.Sequential(nn.Linear(64, 16), act(), PEER(16, **SMALL), nn.Linear(16, 10))
    attach_growth(model, GrowthPolicy(max_experts=48))
    return model


def _train(model, stream, metrics, loggers=()):
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(*metrics, loggers=list(loggers))
        strategy = Naive(
            model=model, optimizer=make_optimizer(model, lr=1e-2), criterion=nn.CrossEntropyLoss(),
            train_mb_size=16, train_epochs=1, eval_mb_size=16, evaluator=evaluator,
        )  # fmt: skip
        for exp in stream.train_stream:
            strategy.train(exp)
        return strategy.eval(stream.test_stream)


def _inputs(exp):
    data = exp.dataset
    return torch.stack([data[i][0] for i in range(len(data))])


def test_routing_metrics_match_direct_computation(stream):
    model = _model()
    results = _train(model, stream, [PEERRoutingMetrics()])
    layer = model[2]
    assert layer.owners.unique().tolist() == [0, 1, 2]  # it grew: three owners to share
    model.eval()
    for j, exp in enumerate(stream.test_stream):
        suffix = f"eval_phase/test_stream/Task000/Exp{j:03d}"
        layer.reset_routing_stats()
        with torch.no_grad():
            h = model[1](model[0](_inputs(exp)))
            layer(h)
        mass = layer.expert_mass.clone()
        assert results[f"PEER_Usage/2/{suffix}"] == pytest.approx(expert_usage(mass))
        assert results[f"PEER_Unevenness/2/{suffix}"] == pytest.approx(unevenness(mass))
        shares = M.routing_share(mass, layer.owners)
        for owner, share in shares.items():
            got = results[f"PEER_RoutingShare/2/Owner{owner:03d}/{suffix}"]
            assert got == pytest.approx(share, abs=1e-6)
        conf = layer.retrieval_confidence(h)
        assert results[f"PEER_Margin/2/{suffix}"] == pytest.approx(
            float(conf["margin"].nanmean()), rel=1e-5
        )
        entropy = results[f"PEER_GateEntropy/2/{suffix}"]
        assert entropy == pytest.approx(float(conf["gate_entropy"].mean()), rel=1e-5)
        assert 0.0 < entropy <= math.log(SMALL["topk"]) + 1e-6


def test_evaluation_leaves_routing_stats_untouched(stream):
    model = _model()
    layer = model[2]
    with torch.no_grad():
        layer(torch.randn(5, 16))
    before = layer.router_mass.clone()
    layer.track_routing = False
    metric = PEERRoutingMetrics(confidence=False)
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = Naive(
            model=model, optimizer=make_optimizer(model), criterion=nn.CrossEntropyLoss(),
            eval_mb_size=16, evaluator=EvaluationPlugin(metric, loggers=[]),
        )  # fmt: skip
        results = strategy.eval(stream.test_stream[:2])
    assert torch.equal(layer.router_mass, before)
    assert layer.track_routing is False
    usage = results["PEER_Usage/2/eval_phase/test_stream/Task000/Exp001"]
    assert 0.0 < usage <= 1.0  # it tracked during evaluation all the same
    assert not any("PEER_Margin" in name for name in results)
    assert set(metric.result()) == {n for n in results if n.endswith("Exp001")}


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_plasticity_health_matches_direct_computation(stream, act):
    model = _model(act)
    if act is nn.ReLU:  # make unit 0 dead: its pre-activation is -1 for every input
        with torch.no_grad():
            model[0].weight[0].zero_()
            model[0].bias[0] = -1.0
    results = _train(model, stream, [PlasticityHealth(max_samples=20)])
    model.eval()
    for j, exp in enumerate(stream.test_stream):
        with torch.no_grad():
            features = model[1](model[0](_inputs(exp)[:20]))
        suffix = f"1/eval_phase/test_stream/Task000/Exp{j:03d}"
        dead = results[f"Plasticity_DeadUnits/{suffix}"]
        assert dead == pytest.approx(M.dead_unit_fraction(features))
        assert results[f"Plasticity_EffectiveRank/{suffix}"] == pytest.approx(
            M.effective_rank(features), rel=1e-5
        )
        if act is nn.ReLU:
            assert dead >= 1 / 16
            assert model[0].weight.grad is None or not model[0].weight[0].any()


def test_metrics_reach_avalanche_loggers(stream):
    from avalanche.logging import TextLogger

    out = io.StringIO()
    _train(_model(), stream, peer_metrics(), loggers=[TextLogger(out)])
    text = out.getvalue()
    for name in ("PEER_Usage/2", "PEER_RoutingShare/2/Owner002", "Plasticity_EffectiveRank/1"):
        assert f"{name}/eval_phase/test_stream/Task000/Exp002" in text


def test_plasticity_health_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="module must be given"):
        PlasticityHealth().features_module(model)
    with pytest.raises(ValueError, match="module must name a submodule.*'nope'"):
        PlasticityHealth("nope").features_module(model)
    assert PlasticityHealth("0").features_module(model)[0] == "0"
    with pytest.raises(ValueError, match="max_samples must be an int >= 1, got 0"):
        PlasticityHealth(max_samples=0)
    with pytest.raises(TypeError, match="max_samples must be an int >= 1, got float 2.5"):
        PlasticityHealth(max_samples=2.5)
    with pytest.raises(TypeError, match="confidence must be a bool"):
        PEERRoutingMetrics(confidence=1)
    assert [type(m) for m in peer_metrics(plasticity=False)] == [PEERRoutingMetrics]


def test_parse_metric_name():
    name = "PEER_RoutingShare/blocks.0.peer/Owner003/eval_phase/test_stream/Task000/Exp002"
    parts = parse_metric_name(name)
    assert parts == dict(
        metric="PEER_RoutingShare", module="blocks.0.peer", owner=3, phase="eval",
        stream="test", task=0, exp=2,
    )  # fmt: skip
    acc = parse_metric_name("Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp004")
    assert (acc["metric"], acc["module"], acc["task"], acc["exp"]) == ("Top1_Acc_Exp", None, 1, 4)
    assert parse_metric_name("StreamForgetting/eval_phase/test_stream")["exp"] is None
    assert parse_metric_name("not a metric") is None
    assert parse_metric_name("A/x/train_phase/train_stream/Exp000")["exp"] == 0


def test_accuracy_matrix_matches_avalanche(stream):
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from peer_ll.evaluation.matrix_plugin import AccuracyMatrix

    model = _model()
    joint = [0.9, 0.8, 0.7]
    matrix = AccuracyMatrix(joint=joint)
    test = stream.test_stream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(
            matrix, accuracy_metrics(experience=True), forgetting_metrics(stream=True),
            bwt_metrics(stream=True), loggers=[],
        )  # fmt: skip
        strategy = Naive(
            model=model, optimizer=make_optimizer(model, lr=1e-2), criterion=nn.CrossEntropyLoss(),
            train_mb_size=16, train_epochs=2, eval_mb_size=16, evaluator=evaluator, eval_every=1,
        )  # fmt: skip
        acc = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"
        values = strategy.eval(test)
        initial = [values[acc.format(j)] for j in range(3)]
        rows = []
        for exp in stream.train_stream:
            strategy.train(exp, eval_streams=[test])  # periodic evaluations: ignored
            values = strategy.eval(test)
            rows.append([values[acc.format(j)] for j in range(3)])
    R = np.array(rows)
    np.testing.assert_allclose(matrix.matrix, R)
    np.testing.assert_allclose(matrix.initial, initial)
    s = "eval_phase/test_stream"
    assert values[f"CL_AvgAccuracy/{s}"] == pytest.approx(M.average_accuracy(R))
    assert values[f"CL_Forgetting/{s}"] == pytest.approx(M.forgetting(R, kind="max"))
    assert values[f"CL_LearningAccuracy/{s}"] == pytest.approx(M.learning_accuracy(R))
    assert values[f"CL_FWT/{s}"] == pytest.approx(M.fwt(R, initial))
    assert values[f"CL_Intransigence/{s}"] == pytest.approx(M.intransigence(R, joint))
    # Avalanche's own stream metrics are the "first" kind of forgetting, and BWT
    assert values[f"StreamForgetting/{s}"] == pytest.approx(M.forgetting(R, kind="first"))
    assert values[f"CL_BWT/{s}"] == pytest.approx(values[f"StreamBWT/{s}"])
    assert M.forgetting(R, kind="first") > 0  # Naive forgot something: the checks could fail
    assert set(matrix.result()) == {n for n in values if n.startswith("CL_")}


def test_routing_metrics_need_peer_layers(stream):
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.CrossEntropyLoss(), eval_mb_size=16,
            evaluator=EvaluationPlugin(PEERRoutingMetrics(), loggers=[]),
        )  # fmt: skip
        with pytest.raises(ValueError, match="PEER layers"):
            strategy.eval(stream.test_stream[:1])
