"""Strategy factories: an Avalanche template plus plugins, for models with PEER layers.

Each factory makes the model's PEER layers grow (:func:`attach_growth`), builds the
template with a new plugin list (the caller's plugins are never mutated), and adds:

- :class:`CarryOptimizerState`, so moments survive growth past capacity;
- :class:`DenseExpertGrads` when :func:`needs_dense_grads` finds a plugin that reads
  gradients as dense tensors (GEM, A-GEM, ...) or an optimizer that rejects sparse
  ones (pass ``dense_grads=`` to decide yourself).

The optimizer defaults to :func:`peer_ll.optim.make_optimizer` (lazy Adam on the
expert rows a step retrieved, AdamW elsewhere, frozen rows never touched).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from peer_ll.experts.checks import check_type
from peer_ll.optim import make_optimizer
from peer_ll.strategies.carry_state import CarryOptimizerState
from peer_ll.strategies.dense_grads import DenseExpertGrads, needs_dense_grads
from peer_ll.strategies.growth import GrowthPolicy, attach_growth, check_growth, growth_modules
from peer_ll.strategies.sparse_finetuning import SparseExpertFinetuning


def peer_grow(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    policy: GrowthPolicy | None = None,
    plugins: Iterable[object] = (),
    template: type = SupervisedTemplate,
    dense_grads: bool | None = None,
    **template_kwargs,
):
    """Fine-tuning with PEER pools that grow and freeze per experience.

    Args:
        model: a model with PEER layers (e.g. :class:`peer_ll.models.PEERClassifier`).
        optimizer: default ``peer_ll.optim.make_optimizer(model)``.
        criterion: default ``torch.nn.CrossEntropyLoss()``.
        policy: growth policy; default: keep the one the model already has (a
            model built by :func:`peer_classifier` has one), else ``GrowthPolicy()``.
        plugins: extra Avalanche plugins (a new list is built from them).
        template: the Avalanche template or strategy class to build, e.g.
            ``SupervisedTemplate`` (naive fine-tuning), ``avalanche.training.Replay``
            or ``Cumulative``; its own arguments go in ``template_kwargs``.
        dense_grads: force dense (True) or sparse (False) expert gradients;
            default: decided by :func:`needs_dense_grads`.
        **template_kwargs: passed to ``template`` (``train_mb_size``,
            ``train_epochs``, ``eval_mb_size``, ``device``, ``evaluator``, ...).

    Returns:
        The strategy, an instance of ``template``.
    """
    if isinstance(plugins, nn.Module | str) or not isinstance(plugins, Iterable):
        raise TypeError(f"plugins must be an iterable of plugins, got {type(plugins).__name__}")
    check_type("model", model, nn.Module)
    plugins = tuple(plugins)
    if policy is not None or not growth_modules(model):
        attach_growth(model, policy, optimizer=optimizer)
    check_growth(model)
    optimizer = make_optimizer(model) if optimizer is None else optimizer
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    strategy = template(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        plugins=[CarryOptimizerState(), *plugins],
        **template_kwargs,
    )
    dense = needs_dense_grads(strategy.plugins, optimizer) if dense_grads is None else dense_grads
    if dense:
        strategy.plugins.insert(0, DenseExpertGrads())
    return strategy


def peer_sparse_finetuning(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    top_t: int,
    train_others: bool = True,
    plugins: Iterable[object] = (),
    **kwargs,
):
    """:func:`peer_grow` plus :class:`SparseExpertFinetuning` (top-t rows by TF-IDF).

    Args:
        top_t: expert rows per layer that one step may update.
        train_others: let the rest of the model train as usual.
        plugins, **kwargs: as for :func:`peer_grow`.
    """
    sparse = SparseExpertFinetuning(top_t, train_others=train_others)
    return peer_grow(model, optimizer, criterion, plugins=(*plugins, sparse), **kwargs)
