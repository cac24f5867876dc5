"""RouterDistillation on a benchmark without task labels: a clear error before training."""

import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import AvalancheDataset
from torch.utils.data import TensorDataset

from peer_ll.optim import make_optimizer
from peer_ll.protect import peer_router_distillation
from peer_ll.strategies import GrowthPolicy, peer_classifier


def _unlabelled(n: int, first_class: int) -> AvalancheDataset:
    x, y = torch.randn(n, 8), torch.randint(first_class, first_class + 2, (n,))
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    return AvalancheDataset([data])


def test_router_distillation_without_task_labels_raises_before_training():
    bench = benchmark_from_datasets(train=[_unlabelled(20, 0), _unlabelled(20, 2)],
                                    test=[_unlabelled(10, 0), _unlabelled(10, 2)])  # fmt: skip
    model = peer_classifier(8, 4, hidden=8, peer={"num_keys": 4}, head="fixed",
                            growth=GrowthPolicy(max_experts=64))  # fmt: skip
    strategy = peer_router_distillation(model, make_optimizer(model, lr=1e-3),
                                        torch.nn.CrossEntropyLoss(), train_mb_size=10)  # fmt: skip
    before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
    }  # growth state: a dict
    with pytest.raises(ValueError, match="RouterDistillation needs task labels: the samples "
                                         "of experience 0 have none"):  # fmt: skip
        strategy.train(bench.train_stream[0])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(
        torch.equal(before[k], after[k])
        if isinstance(after[k], torch.Tensor)
        else before[k] == after[k]
        for k in before
    )
