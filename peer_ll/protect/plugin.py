"""Routing protection as an Avalanche plugin: train one owner at a time, fit the scorer.

Once every old parameter of a growing PEER pool is frozen, an old input changes output
only through routing. :class:`OwnerRouting` drives an
:class:`~peer_ll.protect.routed.OwnerRouted` model so that the whole old function stays
frozen and each input keeps to its own owner's experts, without task labels:

- experience t trains only what owner t owns: its PEER segment (grown by the growth
  policy, earlier owners frozen) and its copy in every
  :class:`~peer_ll.experts.PerOwner` module (head, query adapters, ...).
  After the first experience the rest of the model (the *trunk*: encoder, norms, PEER
  query networks) is frozen. Training forwards go to owner t
  (``model.set_owner(t)``), so owner t learns the function that owner-restricted
  retrieval gives it at test time;
- after each experience the model's scorer is fit on the experience's inputs, in eval
  mode (with ``mem_size``, also given an experience-balanced replay of older inputs);
- evaluation routes each input to its scored owner (or, with ``oracle``, to the
  evaluated experience's id: task known, an upper bound) and records how often the
  top owner is the input's experience: :attr:`OwnerRouting.inference_accuracy`;
- on a stream with task labels (``task_labels=True``, or None and the stream holds more
  than one task label) evaluation routes each experience to the owner that trained on its
  task label, as the multi-head baselines read it, and the scorer is not fit.

Owners are experience ids (``current_experience``).
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_bool, check_int
from peer_ll.experts.per_owner import per_owner_modules
from peer_ll.protect.routed import OwnerRouted, top_owner
from peer_ll.strategies.distributed import unwrap


def experience_loader(strategy, dataset=None) -> DataLoader:
    """Eval-mode loader over ``dataset`` (default: the current experience's)."""
    data = strategy.experience.dataset if dataset is None else dataset
    data = data.eval() if hasattr(data, "eval") else data
    return DataLoader(data, batch_size=strategy.eval_mb_size, shuffle=False)


def any_peer_layers(model: nn.Module) -> dict[str, PEER]:
    """The PEER layers of ``model`` by name; empty for a model without any (an ablation)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PEER)}


def trunk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters no owner owns: outside the PEER layers and the PerOwner modules."""
    owned = {id(p) for layer in any_peer_layers(model).values() for p in layer.parameters()}
    owned |= {id(p) for m in per_owner_modules(model) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in owned]


class OwnerRouting(SupervisedPlugin):
    """One owner trains per experience on a frozen trunk; the scorer routes evaluation.

    Args:
        oracle: evaluation routes to the evaluated experience's id (task known).
        mem_size: inputs kept for the scorer's ``replay`` in all, balanced over the
            experiences seen (0: none; an :class:`~peer_ll.protect.gate.OwnerGate`
            needs some).
        task_labels: route evaluation by task label (True), never (False), or when the
            training stream holds more than one task label (None, decided on the first
            experience).

    Attributes:
        owners_trained: owners whose experience has finished training.
        inference_accuracy: ``{experience: fraction}`` of the latest evaluation: how
            often the top scored owner was the input's experience.
        replay: ``{experience: inputs (n, ...)}`` kept for the scorer.
        task_owner: ``{task label: owner}`` of the experiences trained so far.
    """

    def __init__(
        self, *, oracle: bool = False, mem_size: int = 0, task_labels: bool | None = None
    ) -> None:
        super().__init__()
        self.oracle = check_bool("oracle", oracle)
        self.mem_size = check_int("mem_size", mem_size, minimum=0)
        self.task_labels = None if task_labels is None else check_bool("task_labels", task_labels)
        self.task_owner: dict[int, int] = {}
        self.owners_trained: list[int] = []
        self.inference_accuracy: dict[int, float] = {}
        self.replay: dict[int, torch.Tensor] = {}
        self._standing: int | None = None
        self._counts = [0, 0]

    @staticmethod
    def _routed(strategy) -> OwnerRouted:
        model = unwrap(strategy.model)  # under DistributedPEER, the DDP wrapper's module
        if not isinstance(model, OwnerRouted):
            raise TypeError(f"strategy.model must be an OwnerRouted, got {type(model).__name__}")
        return model

    # ----------------------------------------------------------------- training
    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Before the model adaptation and the optimizer update: new copies get optimised.
        owner = int(strategy.experience.current_experience)
        if self.task_labels is None:
            stream = getattr(strategy.experience, "origin_stream", None)
            labels = {t for exp in stream or () for t in exp.task_labels}
            self.task_labels = len(labels) > 1
        classes = getattr(strategy.experience, "classes_in_this_experience", None)
        for module in per_owner_modules(self._routed(strategy)):
            module.add_owner(owner, classes=classes if module.num_classes else None)
            module.freeze([o for o in module.owners if o != owner])
            module.freeze([owner], frozen=False)

    def before_training_exp(self, strategy, **kwargs) -> None:
        owner = int(strategy.experience.current_experience)
        model = self._routed(strategy)
        layers = any_peer_layers(model)
        missing = [name for name, layer in layers.items() if owner not in layer.owners.tolist()]
        if missing:
            raise ValueError(
                f"experience {owner} must own experts in every PEER layer (grow "
                f"with GrowthPolicy(when='always')), got none in layers {missing}"
            )
        model.set_owner(owner)
        if any(o != owner for o in self.owners_trained):
            for p in trunk_parameters(model.model):
                p.requires_grad_(False)
            for layer in layers.values():
                layer.freeze([], keys=False, query=True)

    def before_training_epoch(self, strategy, **kwargs) -> None:
        model = self._routed(strategy).model
        if any(not p.requires_grad for p in trunk_parameters(model)):
            owned = {id(m) for p in per_owner_modules(model) for m in p.modules()}
            for m in model.modules():  # a frozen trunk's statistics stay still
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in owned:
                    m.eval()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        model = self._routed(strategy)
        owner = model.owner
        model.set_owner(None)
        if owner is None:
            return
        xs, ys = zip(*((x, y) for x, y, *_ in experience_loader(strategy)), strict=True)
        x, y = torch.cat(xs).to(strategy.device), torch.cat(ys).to(strategy.device)
        if self.task_labels:
            labels = getattr(strategy.experience, "task_labels", [owner])
            if len(labels) != 1:
                raise ValueError(
                    f"experience {owner} must hold one task label to own it, got {labels}"
                )
            self.task_owner[int(labels[0])] = owner
        elif model.scorer is not None:
            modes = {m: m.training for m in model.modules()}
            try:
                model.eval()
                model.scorer.fit(model.model, owner, x, y, replay=dict(self.replay))
            finally:
                for m, mode in modes.items():
                    m.train(mode)
        if self.mem_size:
            self._store(owner, x)
        if owner not in self.owners_trained:
            self.owners_trained.append(owner)

    def _store(self, owner: int, x: torch.Tensor) -> None:
        """Experience-balanced replay: each experience seen keeps mem_size // count inputs."""
        self.replay[owner] = x
        quota = max(1, self.mem_size // len(self.replay))
        for o, kept in self.replay.items():
            if len(kept) > quota:
                keep = torch.randperm(len(kept))[:quota] if o == owner else torch.arange(quota)
                self.replay[o] = kept[keep.to(kept.device)]

    # --------------------------------------------------------------- evaluation
    def before_eval(self, strategy, **kwargs) -> None:
        model = self._routed(strategy)
        self._standing = model.owner  # an evaluation inside training: restored after
        model.set_owner(None)
        self.inference_accuracy = {}

    def before_eval_exp(self, strategy, **kwargs) -> None:
        exp = int(strategy.experience.current_experience)
        self._counts = [0, 0]
        if self.oracle:
            self._routed(strategy).set_owner(exp if exp in self.owners_trained else None)
        elif self.task_labels:
            labels = strategy.experience.task_labels
            if len(labels) != 1:
                raise ValueError(f"experience {exp} must hold one task label, got {labels}")
            self._routed(strategy).set_owner(self.task_owner.get(int(labels[0])))

    def after_eval_forward(self, strategy, **kwargs) -> None:
        model = self._routed(strategy)
        if model.scorer is None or self.oracle or self.task_labels or not self.owners_trained:
            return
        got = top_owner(model.route(strategy.mb_x), len(strategy.mb_x))
        exp = int(strategy.experience.current_experience)
        self._counts[0] += int((got == exp).sum())
        self._counts[1] += got.numel()

    def after_eval_exp(self, strategy, **kwargs) -> None:
        if self._counts[1]:
            exp = int(strategy.experience.current_experience)
            self.inference_accuracy[exp] = self._counts[0] / self._counts[1]

    def after_eval(self, strategy, **kwargs) -> None:
        self._routed(strategy).set_owner(self._standing)
        self._standing = None


__all__ = ["OwnerRouting", "any_peer_layers", "experience_loader", "trunk_parameters"]
