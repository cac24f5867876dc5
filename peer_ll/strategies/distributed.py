"""Data-parallel training of growing PEER pools with torch.distributed and Avalanche.

``DistributedDataParallel`` all-reduces dense gradients in buckets and supports sparse
ones only for ``nn.Embedding(sparse=True)``; a PEER layer's row-sparse (COO) table
gradients make its reducer fail (``Cannot access storage of SparseTensorImpl``). So:

- :func:`wrap_ddp` wraps a model in DDP with every PEER expert table (``down``, ``up``,
  ``sub_keys``) excluded from DDP's buckets, and broadcasts those tables from rank 0
  (DDP broadcasts everything else itself);
- :func:`all_reduce_expert_grads` averages the tables' gradients across ranks, after
  ``backward`` and before ``optimizer.step()``, in one fixed order on every rank:
  sparse all-reduce where the backend has it (gloo), otherwise (NCCL) the gradient is
  made dense, all-reduced, and cut back to the rows some rank touched, so
  :class:`peer_ll.optim.SparseAdamW` stays lazy (its result equals the sparse path);
- :func:`sync_expert_grads_before_step` runs it as an optimizer step pre-hook, for
  plain training loops;
- :class:`DistributedPEER`, an Avalanche plugin, (re)wraps the strategy's model
  after each experience's adaptation (growth, freezing, parameters replaced past
  capacity all show up in the new wrapper) and all-reduces the tables after every
  backward. Run the script under ``torchrun`` after
  ``avalanche.distributed.DistributedHelper.init_distributed``.

Every rank grows at the same moment (growth depends only on the experience), and the
new rows are made equal by the broadcast from rank 0 at the re-wrap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_bool, check_type
from peer_ll.experts.pool import TABLES
from peer_ll.experts.sharded import is_column_shard, shard_peer_layers
from peer_ll.strategies.distributed_checkpoint import (  # noqa: F401 (re-exported)
    load_checkpoint,
    save_checkpoint,
    unwrap,
)

#: Backends whose ``all_reduce`` takes sparse COO tensors.
SPARSE_BACKENDS = ("gloo",)


def expert_table_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every PEER layer's tables, sorted."""
    return sorted(
        f"{name + '.' if name else ''}pool.{table}"
        for name, m in model.named_modules()
        if isinstance(m, PEER)  # a model without PEER layers has none (a plain DDP model)
        for table in TABLES
    )


def expert_tables(model: nn.Module) -> list[nn.Parameter]:
    """Every PEER expert table of ``model`` (unwrapped), in :func:`expert_table_names` order."""
    model = unwrap(model)
    params = dict(model.named_parameters())
    return [params[name] for name in expert_table_names(model)]


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """Wrap ``model`` in DDP, leaving its PEER expert tables to :func:`all_reduce_expert_grads`.

    An already wrapped model is unwrapped first, so this is also the re-wrap after a
    growth: the new wrapper sees replaced Parameters and changed ``requires_grad``.
    Collective: every rank must call it at the same point.

    Args:
        model: a module holding PEER layers, or a DDP wrapper of one.
        **ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. ``device_ids``).

    Returns:
        The wrapper; its parameters and buffers equal rank 0's on every rank.
    """
    check_type("model", model, nn.Module)
    if not dist.is_initialized():
        raise ValueError(
            "torch.distributed must be initialized to wrap a model, got "
            "no process group (call init_process_group or use torchrun)"
        )
    model = unwrap(model)
    names = expert_table_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    with torch.no_grad():
        for table in expert_tables(model):
            if not is_column_shard(table):  # a column block differs per rank by design
                dist.broadcast(table.data, src=0)
    return DistributedDataParallel(model, **ddp_kwargs)


def all_reduce_expert_grads(model: nn.Module, *, group=None, sparse: bool | None = None) -> None:
    """Average the PEER expert tables' gradients over the ranks of ``group``, in place.

    Collective: every rank calls it after ``backward`` (a table without a gradient
    on a rank takes part with a zero one). Sparse gradients stay sparse: all-reduced
    as COO on gloo; on other backends densified, all-reduced, and restricted to the
    rows any rank touched (traffic O(capacity) per table, see the README).

    Args:
        model: the model (or its DDP wrapper).
        group: the process group (default: the world).
        sparse: all-reduce COO tensors (True) or dense ones (False); default: sparse
            where the backend supports it (:data:`SPARSE_BACKENDS`).
    """
    world = dist.get_world_size(group)
    if world == 1:
        return
    sparse_backend = dist.get_backend(group) in SPARSE_BACKENDS if sparse is None else sparse
    layers = {n: m for n, m in unwrap(model).named_modules() if isinstance(m, PEER)}
    modes = {
        id(getattr(layer.pool, t)): layer.sparse_grad for layer in layers.values() for t in TABLES
    }
    for table in expert_tables(model):
        if is_column_shard(table):  # a sharded layer's blocks hold the exact gradient
            continue
        grad = table.grad
        if grad is None:  # nothing retrieved here: join with zeros of the layer's layout
            grad = _empty_sparse(table) if modes[id(table)] else torch.zeros_like(table)
        if not grad.is_sparse:
            dist.all_reduce(grad, group=group)
            table.grad = grad.div_(world)
        elif sparse_backend:
            grad = grad.coalesce()
            dist.all_reduce(grad, group=group)
            table.grad = grad.coalesce() / world
        else:
            table.grad = _dense_all_reduce(grad.coalesce(), world, group)


def _empty_sparse(table: torch.Tensor) -> torch.Tensor:
    rows = torch.zeros(1, 0, dtype=torch.long, device=table.device)
    values = table.new_zeros((0, *table.shape[1:]))
    return torch.sparse_coo_tensor(rows, values, table.shape).coalesce()


def _dense_all_reduce(grad: torch.Tensor, world: int, group) -> torch.Tensor:
    """NCCL path: dense sum of a COO gradient, cut back to the rows any rank touched."""
    touched = torch.zeros(grad.shape[0], dtype=torch.int32, device=grad.device)
    touched[grad.indices()[0]] = 1
    dense = grad.to_dense()
    dist.all_reduce(dense, group=group)
    dist.all_reduce(touched, group=group)
    rows = touched.nonzero().flatten()
    return torch.sparse_coo_tensor(
        rows[None], dense[rows] / world, grad.shape, is_coalesced=True, check_invariants=False
    )


def sync_expert_grads_before_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, *, group=None
):
    """Make ``optimizer.step()`` first average ``model``'s expert-table gradients.

    For plain loops with :func:`wrap_ddp`. The model is read at every step, so growth
    and re-wrapping need no new hook.

    Returns:
        The hook's handle (``handle.remove()`` undoes it).
    """
    check_type("optimizer", optimizer, torch.optim.Optimizer)
    check_type("model", model, nn.Module)
    return optimizer.register_step_pre_hook(lambda *_: all_reduce_expert_grads(model, group=group))


class DistributedPEER(SupervisedPlugin, supports_distributed=True):
    """Avalanche plugin: DDP for PEER models whose pools grow per experience.

    In ``before_training_exp`` (after the adaptation that grows pools and after the
    optimizer update) it wraps ``strategy.model`` anew with :func:`wrap_ddp`; after
    every backward it all-reduces the expert tables; after training it leaves the
    bare model in ``strategy.model`` for evaluation and checkpoints. Under a single
    process it does nothing.

    Avalanche's data loaders split evaluation data across ranks too, and its metrics
    are not gathered, so each rank would report the accuracy of its own share. With
    ``full_eval`` (default) every rank evaluates the whole experience instead, and
    all ranks report the same accuracy matrix.

    With ``shard_experts``, the model's PEER layers are split by columns over the ranks
    (:func:`peer_ll.experts.sharded.shard_peer_layers`) when training starts, before the
    first optimizer reset: each rank then holds 1/W of every expert table. It needs
    ``full_eval`` (the sharded layers' collectives need the same batches on every rank)
    and D, E divisible by W; ``ranks_equal`` does not apply to the column blocks.

    Args:
        full_eval: evaluate every sample on every rank.
        shard_experts: shard the PEER layers' tables by columns.
        **ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. ``device_ids``).
    """

    def __init__(
        self, *, full_eval: bool = True, shard_experts: bool = False, **ddp_kwargs
    ) -> None:
        super().__init__()
        self.full_eval = check_bool("full_eval", full_eval)
        self.shard_experts = check_bool("shard_experts", shard_experts)
        if shard_experts and not full_eval:
            raise ValueError(
                "full_eval must be True with shard_experts=True (every rank must run the "
                "same evaluation batches), got False"
            )
        self.ddp_kwargs = ddp_kwargs

    @staticmethod
    def _active() -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def before_training(self, strategy, **kwargs) -> None:
        if self.shard_experts and self._active():
            shard_peer_layers(unwrap(strategy.model))

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self._active():
            strategy.model = wrap_ddp(strategy.model, **self.ddp_kwargs)

    def after_backward(self, strategy, **kwargs) -> None:
        if self._active():
            all_reduce_expert_grads(strategy.model)

    def after_training_exp(self, strategy, **kwargs) -> None:
        strategy.model = unwrap(strategy.model)

    def before_eval_exp(self, strategy, **kwargs) -> None:
        if self.full_eval and self._active():  # the loader was built just before this
            data = strategy.adapted_dataset
            strategy.dataloader = DataLoader(
                data, batch_size=strategy.eval_mb_size, collate_fn=getattr(data, "collate_fn", None)
            )


def ranks_equal(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether parameters, buffers (and optimizer state) are bit-identical on every rank.

    Collective: each tensor is broadcast from rank 0 and compared exactly (a check for
    tests and debugging; it sends the whole model once).
    """
    model = unwrap(model)
    state = sorted(model.state_dict().items())
    tensors = [t for _, t in state if isinstance(t, torch.Tensor)]
    extras = [v for _, v in state if not isinstance(v, torch.Tensor)]  # e.g. growth state
    if optimizer is not None:
        for p in model.parameters():  # model order: the same on every rank
            state = optimizer.state.get(p, {})
            tensors += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    same = True
    for tensor in tensors:
        mine = tensor.detach()
        mine = mine.to(torch.uint8) if mine.dtype == torch.bool else mine.clone()
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        same &= torch.equal(mine, theirs)
    if extras:
        theirs = [extras]
        dist.broadcast_object_list(theirs, src=0)
        same &= theirs[0] == extras
    flag = torch.tensor([int(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
