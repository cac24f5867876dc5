"""PEERLM in an Avalanche strategy: grow-and-freeze per text domain, Avalanche metrics."""

import math
import warnings

import pytest
import torch
from tiny_lm import TINY

from peer_ll.cli.lm_train import perplexity
from peer_ll.models import PEERLM, LMConfig
from peer_ll.strategies.lm import AvalancheLM, LMDomainGrowth, peer_lm_strategy


@pytest.fixture(scope="module")
def stream():
    from peer_ll.data.text import text_domain_stream

    return text_domain_stream(
        ("python-stdlib", "pydoc-topics"), block_size=32, max_bytes_per_domain=20_000
    )


def test_grow_and_freeze_in_an_avalanche_strategy(stream):
    from avalanche.evaluation.metrics import loss_metrics
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(0)
    lm = PEERLM(LMConfig(**TINY))
    evaluator = EvaluationPlugin(loss_metrics(experience=True), loggers=[])
    strategy = peer_lm_strategy(
        lm,
        grow_keys=4,
        lr=1e-2,
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        evaluator=evaluator,
    )
    A, B = (stream.get_split(n, "test") for n in stream.domain_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.train(stream.train_stream[0])
        a_before, b_before = perplexity(lm, A, domain=0), perplexity(lm, B, domain=0)
        strategy.train(stream.train_stream[1])
        metrics = strategy.eval(stream.test_stream)
    assert lm.owners == [0, 1]
    assert perplexity(lm, A, domain=0) == a_before  # everything A uses stayed frozen
    assert perplexity(lm, B, domain=1) < b_before  # B learned through its own route
    for j, blocks in enumerate((A, B)):
        loss = metrics[f"Loss_Exp/eval_phase/test_stream/Task00{j}/Exp00{j}"]
        assert math.exp(loss) == pytest.approx(perplexity(lm, blocks, domain="infer"), rel=1e-4)


def test_wrapper_and_plugin_check_their_arguments():
    lm = PEERLM(LMConfig(**TINY))
    model = AvalancheLM(lm)
    x = torch.randint(0, 256, (2, 10))
    assert model(x, torch.zeros(2, dtype=torch.long)).shape == (2, 258, 10)
    with pytest.raises(ValueError, match=r"task_labels must be among the model's domains \[0\]"):
        model(x, torch.ones(2, dtype=torch.long))
    model.eval()
    torch.testing.assert_close(model(x, 7), lm(x, owners="infer")[0].transpose(1, 2))
    task = AvalancheLM(lm, eval_domain="task").eval()
    torch.testing.assert_close(task(x, 0), lm(x, owners=0)[0].transpose(1, 2))
    with pytest.raises(TypeError, match="lm must be a PEERLM, got Linear"):
        AvalancheLM(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eval_domain must be one of"):
        AvalancheLM(lm, eval_domain="oracle")
    with pytest.raises(ValueError, match="grow_keys must be an int >= 1, got 0"):
        LMDomainGrowth(0)
