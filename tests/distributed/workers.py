"""What each rank runs in the 2-process tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer, migrate_state
from peer_ll.strategies.distributed import (
    all_reduce_expert_grads,
    ranks_equal,
    save_checkpoint,
    sync_expert_grads_before_step,
    wrap_ddp,
)

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer")


def layer_and_batch(capacity: int = 32):
    torch.manual_seed(0)
    layer = PEER(16, capacity=capacity, **SMALL)
    layer.grow(4, owner=1)
    layer.freeze(0)
    x = torch.randn(12, 16)
    return layer, x


def grads_of_halves(rank: int, out: str, sparse: bool | None) -> None:
    """Each rank backpropagates its half of the batch; saves the averaged gradients."""
    layer, x = layer_and_batch()
    model = wrap_ddp(layer)
    half = x.shape[0] // 2
    model(x[rank * half : (rank + 1) * half]).square().mean().backward()
    all_reduce_expert_grads(model, sparse=sparse)
    grads = {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
        for n, p in layer.named_parameters()
        if p.grad is not None
    }
    torch.save(grads, f"{out}/grads{rank}.pt")


def train_through_growth(rank: int, out: str) -> None:
    """Train, grow within capacity, grow past it (re-wrap, migrate), train; check ranks."""
    layer, _ = layer_and_batch(capacity=48)
    optimizer = make_optimizer(layer, lr=1e-2)
    sync_expert_grads_before_step(optimizer, layer)
    torch.manual_seed(100 + rank)  # every rank draws its own data and growth values
    frozen_before = layer.down.detach()[:16].clone()
    model = wrap_ddp(layer)
    counts = []
    for owner in (2, 3):
        for _ in range(3):
            model(torch.randn(6, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert ranks_equal(layer, optimizer), f"ranks differ before growth of owner {owner}"
        layer.grow(4, owner=owner)  # 48 rows: owner 2 fits, owner 3 reallocates
        layer.freeze([o for o in range(owner)])
        migrate_state(optimizer, layer)
        model = wrap_ddp(model)
        counts.append(layer.capacity)
    for _ in range(3):
        model(torch.randn(6, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert ranks_equal(layer, optimizer), "ranks differ after growth past capacity"
    assert torch.equal(layer.down.detach()[:16], frozen_before), "frozen rows changed"
    save_checkpoint(model, f"{out}/dcp")
    torch.save({"capacities": counts, "state": layer.state_dict()}, f"{out}/state{rank}.pt")


def avalanche_run(rank: int, out: str) -> None:
    """peer_grow on a digits class stream under Avalanche's DistributedHelper."""
    import warnings

    from avalanche.distributed import DistributedHelper

    from peer_ll.strategies import GrowthPolicy, peer_classifier, peer_grow
    from peer_ll.strategies.distributed import DistributedPEER

    warnings.simplefilter("ignore")
    stream = digits_stream()
    DistributedHelper.set_random_seeds(0)
    model = peer_classifier(64, 3, hidden=16, blocks=1, peer=SMALL, growth=GrowthPolicy(num_keys=4))
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    evaluation = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    from avalanche.core import SupervisedPlugin

    class CountEval(SupervisedPlugin):
        seen = 0

        def after_eval_iteration(self, strategy, **kwargs):
            self.seen += len(strategy.mb_x)

    count = CountEval()
    strategy = peer_grow(
        model,
        plugins=[DistributedPEER(), count],
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        device="cpu",
        evaluator=evaluation,
    )
    sizes, accuracy = [], []
    for experience in stream.train_stream[:2]:
        strategy.train(experience, num_workers=0)
        assert ranks_equal(strategy.model, strategy.optimizer), "ranks differ"
        layer = strategy.model.blocks[0].peer
        sizes.append((layer.num_experts, layer.capacity, layer.owners.unique().tolist()))
        values = strategy.eval(stream.test_stream[:2])
        accuracy.append(sorted((k, v) for k, v in values.items() if k.startswith("Top1_Acc_Exp")))
    test_samples = 2 * sum(len(e.dataset) for e in stream.test_stream[:2])  # 2 evaluations
    torch.save(
        {
            "sizes": sizes,
            "accuracy": accuracy,
            "world": dist.get_world_size(),
            "eval_samples": count.seen,
            "test_samples": test_samples,
        },
        f"{out}/aval{rank}.pt",
    )


def everything(rank: int, out: str) -> None:
    """Every scenario in one pair of processes (starting them costs most of the time)."""
    grads_of_halves(rank, out, True)
    grads_of_halves(rank, out + "/dense", False)
    train_through_growth(rank, out)
    avalanche_run(rank, out)


def digits_stream():
    """3 experiences of 3 digit classes (scikit-learn's digits), ~90 samples each."""
    from avalanche.benchmarks import nc_benchmark
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x, y = x[y < 9], y[y < 9]
    return nc_benchmark(
        TensorDataset(x[:270], y[:270]),
        TensorDataset(x[270:405], y[270:405]),
        3,
        task_labels=False,
        seed=0,
    )
