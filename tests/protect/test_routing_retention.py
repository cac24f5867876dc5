"""Slow: routing distillation keeps more of the first experience's routing than naive.

Retention: for the first experience's test inputs, the share of each (sample, head)'s
top-k experts after the first experience that is still in its top-k after the last.
"""

import pytest
import torch

from peer_ll.optim import make_optimizer
from peer_ll.protect import RouterDistillation
from peer_ll.strategies import GrowthPolicy, peer_classifier, peer_grow


def _top_k(model, x):
    model.eval()
    ids = []
    with torch.no_grad():
        h = model.encoder(x)
        for block in model.blocks:
            ids.append(block.peer.retrieve(block.norm(h))[1])  # (B, H, K)
            h = block(h)
    model.train()
    return ids


def _retention(before, after):
    kept = [
        (a[..., :, None] == b[..., None, :]).any(-1).float().mean()
        for a, b in zip(before, after, strict=True)
    ]
    return float(sum(kept) / len(kept))


def _run(plugins, seed=0):
    from peer_ll.data import make_stream

    torch.manual_seed(seed)
    bench = make_stream("digits", kind="class", n_experiences=5, seed=seed)
    model = peer_classifier(
        64, 10, hidden=64, peer=dict(num_keys=8, heads=4, topk=8, dim_key=32),
        growth=GrowthPolicy(max_experts=5 * 64),
    )  # fmt: skip
    strategy = peer_grow(
        model, make_optimizer(model, lr=3e-3), plugins=plugins, train_mb_size=32,
        train_epochs=3, evaluator=None,
    )  # fmt: skip
    test0 = bench.test_stream[0].dataset
    x0 = torch.stack([test0[i][0] for i in range(len(test0))])
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        if i == 0:
            before = _top_k(model, x0)
    return _retention(before, _top_k(model, x0))


@pytest.mark.slow
def test_router_distillation_retains_routing():
    naive = _run([])
    router = _run([RouterDistillation(1.0, query_alpha=1.0)])
    assert router > naive + 0.2
