"""What each rank runs in the 2-process sharded-table tests (importable by spawned processes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from peer_ll.experts import PEER
from peer_ll.experts.sharded import shard_columns
from peer_ll.experts.sharded_ops import TRAFFIC
from peer_ll.optim import make_optimizer, migrate_state
from peer_ll.strategies.distributed import (
    all_reduce_expert_grads,
    load_checkpoint,
    save_checkpoint,
    wrap_ddp,
)

SMALL = dict(dim_out=12, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer")
SPLIT = (5, 7)  # tokens of rank 0 and rank 1: uneven on purpose


def layer_and_batch(capacity: int = 32):
    torch.manual_seed(0)
    layer = PEER(16, capacity=capacity, **SMALL)
    layer.grow(4, owner=1)
    layer.freeze(0)
    return layer, torch.randn(sum(SPLIT), 16)


def chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.split(list(SPLIT))


def reference_loss(layer, x: torch.Tensor) -> torch.Tensor:
    """What DDP optimises: the mean over ranks of each rank's mean loss."""
    return sum(layer(c).square().mean() for c in chunks(x)) / len(SPLIT)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return (grad.to_dense() if grad.is_sparse else grad).clone()


def forward_backward(rank: int, out: str) -> None:
    """One sharded forward and backward under DDP; saves outputs, gradients and traffic."""
    layer, x = layer_and_batch()
    sharded = shard_columns(layer)
    model = wrap_ddp(sharded)
    TRAFFIC.clear()
    y = model(chunks(x)[rank])
    y.square().mean().backward()
    all_reduce_expert_grads(model)
    grads = {n: _dense(p.grad) for n, p in sharded.named_parameters() if p.grad is not None}
    torch.save(
        {
            "y": y.detach(),
            "grads": grads,
            "columns": [(c.start, c.stop) for c in map(sharded.pool.columns, ("down", "up"))],
            "traffic": dict(TRAFFIC),
            "sizes": (tuple(sharded.down.shape), tuple(sharded.up.shape)),
        },
        f"{out}/fb{rank}.pt",
    )


def edge_cases(rank: int, out: str) -> None:
    """Owners, a rank without tokens, BatchNorm queries; saves outputs and gradients."""
    layer, x = layer_and_batch()
    sharded = shard_columns(layer)
    mine = chunks(x)[rank]
    owned = sharded(mine, owners=1).detach()
    per_input = sharded(mine, owners=torch.arange(len(mine)) % 2).detach()
    alone = sharded(mine if rank else mine[:0])  # rank 0 brings no tokens
    alone.square().sum().backward()
    torch.manual_seed(0)
    batch = shard_columns(PEER(16, **{**SMALL, "query_norm": "batch"}))
    normed = batch(mine).detach()
    group = dist.new_group([0, 1])  # an explicit group; a copy shares it
    copied = copy.deepcopy(shard_columns(layer_and_batch()[0], group=group))
    in_group = copied(mine).detach()
    torch.save(
        {
            "owned": owned,
            "per_input": per_input,
            "alone": alone.detach(),
            "alone_grad": sharded.up.grad.to_dense(),
            "normed": normed,
            "in_group": in_group,
        },
        f"{out}/edge{rank}.pt",
    )


def _step(model, optimizer, x, rank):
    model(chunks(x)[rank]).square().mean().backward()
    all_reduce_expert_grads(model)
    optimizer.step()
    optimizer.zero_grad()


def _ref_step(ref, optimizer, x):
    reference_loss(ref, x).backward()
    optimizer.step()
    optimizer.zero_grad()


def train_through_growth(rank: int, out: str) -> None:
    """Train, grow within and past capacity, train, beside an unsharded copy; save both."""
    layer, _ = layer_and_batch(capacity=48)
    ref = copy.deepcopy(layer)
    sharded = shard_columns(layer)
    model = wrap_ddp(sharded)
    opt, ref_opt = make_optimizer(sharded, lr=1e-2), make_optimizer(ref, lr=1e-2)
    frozen_before = sharded.down.detach()[:16].clone(), sharded.up.detach()[:16].clone()
    data = torch.Generator().manual_seed(7)  # the same global batches on every rank
    first = {}
    for owner in (2, 3):
        for _ in range(3):
            x = torch.randn(sum(SPLIT), 16, generator=data)
            before = sharded.down.detach().clone()
            with torch.no_grad():
                _, ids = ref.retrieve(x)  # before the step changes the query network
            _step(model, opt, x, rank)
            _ref_step(ref, ref_opt, x)
            if not first:  # rows one step may touch: those retrieved for any rank's tokens
                first["retrieved"] = ids.unique()
                first["changed"] = (sharded.down.detach() != before).any(1).nonzero().flatten()
                moment = opt.state[sharded.pool.down]["exp_avg"]
                first["moment_shape"] = tuple(moment.shape)
                first["moment_rows"] = moment.to_dense().ne(0).any(1).nonzero().flatten()
        for grown in (sharded, ref):
            torch.manual_seed(owner)  # the sharded layer keeps rank 0's draws
            grown.grow(4, owner=owner)  # 48 rows: owner 2 fits, owner 3 reallocates
            grown.freeze(list(range(owner)))
        migrate_state(opt, sharded)
        migrate_state(ref_opt, ref)
        model = wrap_ddp(model)
    for _ in range(3):
        x = torch.randn(sum(SPLIT), 16, generator=data)
        _step(model, opt, x, rank)
        _ref_step(ref, ref_opt, x)
    whole = sharded.unshard()
    save_checkpoint(model, f"{out}/dcp2")
    frozen_after = sharded.down.detach()[:16].clone(), sharded.up.detach()[:16].clone()
    torch.save(
        {
            "whole": whole.state_dict(),
            "ref": ref.state_dict(),
            "frozen": (frozen_before, frozen_after),
            "first": first,
            "capacity": sharded.capacity,
        },
        f"{out}/train{rank}.pt",
    )


def load_checkpoints(rank: int, out: str) -> None:
    """Checkpoints saved by one process and by 2 ranks load into a layer sharded over 2."""
    for name in ("dcp1", "dcp2"):
        layer, _ = layer_and_batch()  # 2 segments; the checkpoints hold more
        sharded = shard_columns(layer)
        load_checkpoint(sharded, f"{out}/{name}")
        torch.save(sharded.unshard().state_dict(), f"{out}/{name}-loaded{rank}.pt")
    try:
        shard_columns(PEER(15, **SMALL))
    except ValueError as error:
        torch.save(str(error), f"{out}/error{rank}.pt")


def avalanche_runs(rank: int, out: str) -> None:
    """peer_grow on a digits class stream under DistributedPEER, with and without sharding."""
    import warnings

    from avalanche.distributed import DistributedHelper
    from workers import SMALL as DDP_SMALL
    from workers import digits_stream

    from peer_ll.strategies import GrowthPolicy, peer_classifier, peer_grow
    from peer_ll.strategies.distributed import DistributedPEER

    warnings.simplefilter("ignore")
    stream = digits_stream()
    runs, probe = {}, torch.rand(20, 64, generator=torch.Generator().manual_seed(3))
    for shard in (False, True):
        DistributedHelper.set_random_seeds(0)
        model = peer_classifier(
            64, 3, hidden=16, blocks=1, peer=DDP_SMALL, growth=GrowthPolicy(num_keys=4)
        )
        strategy = peer_grow(
            model,
            plugins=[DistributedPEER(shard_experts=shard)],
            train_mb_size=16,
            train_epochs=1,
            eval_mb_size=64,
            device="cpu",
            evaluator=None,
        )
        for experience in stream.train_stream[:2]:
            strategy.train(experience, num_workers=0)
        layer = strategy.model.blocks[0].peer
        runs[shard] = {
            "type": type(layer).__name__,
            "down": tuple(layer.down.shape),
            "owners": layer.segment_owner.tolist(),
            "state": (layer.unshard() if shard else layer).state_dict(),
            "logits": strategy.model.eval()(probe).detach(),
        }
    torch.save(runs, f"{out}/aval{rank}.pt")


def everything(rank: int, out: str) -> None:
    """All scenarios in one spawn: starting processes is the slow part."""
    forward_backward(rank, out)
    edge_cases(rank, out)
    train_through_growth(rank, out)
    load_checkpoints(rank, out)
    avalanche_runs(rank, out)
    dist.barrier()
