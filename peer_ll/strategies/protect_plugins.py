"""Routing protection plugins: owner routing in training and evaluation, key margins.

Once every old parameter of a growing PEER pool is frozen, an old input changes
output only through routing. :class:`OwnerRouting` makes the whole old function
frozen and keeps each input on its own owner's experts without task labels:

- training: experience t trains only what owner t owns: its PEER segment (grown by
  the growth policy, earlier owners frozen), its query adapters, its
  :class:`~peer_ll.models.owner_head.OwnerHead` head. After the first experience
  the rest of the model (the *trunk*: encoder, norms, PEER query networks) is
  frozen. Training forwards retrieve only from owner t's experts, so owner t learns
  the function that owner-restricted retrieval will give it at test time;
- after each experience: one eval-mode pass over its training data re-collects
  owner t's query statistics from the final, frozen query network;
- evaluation: owner inference picks each input's owner (likelihood, margin, soft,
  a replay gate, or the oracle experience id), and the plugin records how often
  the inferred owner is the input's experience: :attr:`OwnerRouting.inference_accuracy`.

:class:`KeyMarginProtection` adds ``weight · Σ_layers key_margin_loss`` on
pseudo-queries of the old owners, so new sub-keys stay below the old scores: it
protects unrestricted retrieval and the key-match ("margin") owner inference.
Owners are experience ids (``current_experience``).
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import nn
from torch.utils.data import DataLoader

from peer_ll.experts import OwnerInference, key_margin_loss, recording_query_stats
from peer_ll.experts import peer_layers as named_peer_layers
from peer_ll.experts.owner_inference import METHODS
from peer_ll.experts.owner_input import InputOwnerStats
from peer_ll.models.owner_copies import OwnerCopies
from peer_ll.models.owner_head import OwnerHead

INFERENCES = (*METHODS, "input", "oracle", "all")


def owner_heads(model: nn.Module) -> list[OwnerHead | OwnerCopies]:
    """The per-owner modules of ``model`` (:class:`OwnerHead`, ``OwnerLinear``,
    :class:`OwnerCopies`), in module order."""
    return [m for m in model.modules() if isinstance(m, OwnerHead | OwnerCopies)]


def _trunk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the per-owner parts (PEER tables and adapters, owner heads)."""
    owned = set()
    for layer in named_peer_layers(model).values():
        owned |= {id(layer.down), id(layer.up), id(layer.sub_keys)}
        owned |= {id(p) for p in layer.query_adapters.parameters()}
    for head in owner_heads(model):
        owned |= {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if id(p) not in owned]


def experience_loader(strategy, dataset=None) -> DataLoader:
    """Eval-mode loader over ``dataset`` (default: the current experience's)."""
    data = strategy.experience.dataset if dataset is None else dataset
    data = data.eval() if hasattr(data, "eval") else data
    return DataLoader(data, batch_size=strategy.eval_mb_size, shuffle=False)


class OwnerRouting(SupervisedPlugin):
    """Owner-restricted training, frozen trunk, clean statistics and owner inference.

    Args:
        inference: how evaluation picks owners: "likelihood", "margin", "soft" (see
            :class:`~peer_ll.experts.OwnerInference`), an ``OwnerInference``,
            "input" (each owner's inputs modelled by low-rank Gaussians, see
            :class:`~peer_ll.experts.owner_input.InputOwnerStats`; options ``rank``,
            ``per_class``, ``components``, ``min_var``, and ``soft``, ``top``,
            ``temperature`` of
            :meth:`~peer_ll.experts.owner_input.InputOwnerStats.attach`), "oracle"
            (the evaluated experience's id: task known, an upper bound) or "all" (no
            restriction: every owner is searched).
        freeze_trunk: from the second experience on, freeze every parameter that no
            owner owns (and hold trunk BatchNorm statistics still).
        restrict_training: training forwards retrieve only from the training owner.
        clean_stats: re-collect the training owner's query statistics after its
            experience, in eval mode.
        **inference_options: options of :class:`~peer_ll.experts.OwnerInference`.

    Attributes:
        training_owner: the owner training now (None between experiences).
        owners_trained: owners whose experience has finished training.
        inference_accuracy: ``{experience: {layer name: fraction}}`` of the latest
            evaluation: how often the top inferred owner was the input's experience.
    """

    def __init__(
        self,
        inference: str | OwnerInference = "likelihood",
        *,
        freeze_trunk: bool = True,
        restrict_training: bool = True,
        clean_stats: bool = True,
        **inference_options,
    ) -> None:
        super().__init__()
        input_stats, input_routing = None, {}
        if isinstance(inference, OwnerInference):
            if inference_options:
                raise TypeError(
                    f"inference_options go with a method name, got an "
                    f"OwnerInference and {inference_options}"
                )
        elif inference not in INFERENCES:
            raise ValueError(
                f"inference must be one of {INFERENCES} or an OwnerInference, got {inference!r}"
            )
        elif inference in METHODS:
            inference = OwnerInference(inference, **inference_options)
        elif inference == "input":
            routing = {k: inference_options.pop(k) for k in ("soft", "top", "temperature")
                       if k in inference_options}
            input_routing = InputOwnerStats.routing_options(**routing)
            input_stats = InputOwnerStats(**inference_options)
        elif inference_options:
            raise TypeError(f"inference={inference!r} takes no options, got {inference_options}")
        self.input_stats, self.input_routing_options = input_stats, input_routing
        self._input_routing = None
        self.inference = inference
        self._candidates = getattr(inference, "candidates", None)  # the caller's, if any
        self.freeze_trunk, self.restrict_training = bool(freeze_trunk), bool(restrict_training)
        self.clean_stats = bool(clean_stats)
        self.training_owner: int | None = None
        self.owners_trained: list[int] = []
        self.inference_accuracy: dict[int, dict[str, float]] = {}
        self._hooks: list = []
        self._saved: dict = {}
        self._counts: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- training
    def before_training(self, strategy, **kwargs) -> None:
        self._remove_hooks()
        if not self.restrict_training:
            return
        layers = named_peer_layers(strategy.model).values()
        watched = set(map(id, layers))

        def restrict(layer, args, kwargs):
            # Hooks travel with copy.deepcopy: act on the watched layers only.
            if (
                layer.training
                and self.training_owner is not None
                and id(layer) in watched
                and len(args) < 2
                and kwargs.get("owners") is None
            ):
                return args, {**kwargs, "owners": self.training_owner}
            return None

        self._hooks = [
            layer.register_forward_pre_hook(restrict, with_kwargs=True) for layer in layers
        ]

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Before the model adaptation and the optimizer update: new heads get optimised.
        owner = int(strategy.experience.current_experience)
        classes = getattr(strategy.experience, "classes_in_this_experience", None)
        for head in owner_heads(strategy.model):
            head.add_owner(owner, classes=classes)
            head.training_owner = owner
            head.freeze([o for o in head.owners if o != owner])
            head.freeze([owner], frozen=False)

    def before_training_exp(self, strategy, **kwargs) -> None:
        owner = int(strategy.experience.current_experience)
        layers = named_peer_layers(strategy.model)
        missing = [name for name, layer in layers.items() if owner not in layer.owners.tolist()]
        if missing:
            raise ValueError(
                f"experience {owner} must own experts in every PEER layer (grow with "
                f"GrowthPolicy(when='always')), got none in layers {missing}"
            )
        self.training_owner = owner
        older = any(set(layer.owners.tolist()) - {owner} for layer in layers.values())
        if self.freeze_trunk and older:
            for p in _trunk_parameters(strategy.model):
                p.requires_grad_(False)
            for layer in layers.values():
                layer.freeze([], keys=False, query=True)

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if self.freeze_trunk and any(
            p.requires_grad is False for p in _trunk_parameters(strategy.model)
        ):
            for m in strategy.model.modules():  # frozen trunk: running statistics stay still
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        owner, model = self.training_owner, strategy.model
        self.training_owner = None
        for head in owner_heads(model):
            head.training_owner = None
        if owner is None:
            return
        if self.clean_stats:
            self._collect_stats(strategy, owner)
        if self.input_stats is not None:
            xs, ys = zip(*((x, y) for x, y, *_ in experience_loader(strategy)), strict=True)
            self.input_stats.fit(owner, torch.cat(xs), torch.cat(ys))
        if owner not in self.owners_trained:
            self.owners_trained.append(owner)

    def after_training(self, strategy, **kwargs) -> None:
        self._remove_hooks()

    def _collect_stats(self, strategy, owner: int) -> None:
        model = strategy.model
        layers = named_peer_layers(model).values()
        if all(layer.query_stats is None for layer in layers):
            return
        modes = {m: m.training for m in model.modules()}
        saved = [(layer, layer.eval_owners, layer.track_routing) for layer in layers]
        try:
            model.eval()
            for layer in layers:
                layer.eval_owners, layer.track_routing = owner, False
            with recording_query_stats(model, owner, reset=True):
                for x, _, *task in experience_loader(strategy):
                    t = task[0].to(strategy.device) if task else None
                    avalanche_forward(model, x.to(strategy.device), t)
        finally:
            for m, mode in modes.items():
                m.train(mode)
            for layer, eval_owners, track in saved:
                layer.eval_owners, layer.track_routing = eval_owners, track

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --------------------------------------------------------------- evaluation
    def before_eval(self, strategy, **kwargs) -> None:
        layers = named_peer_layers(strategy.model)
        self._saved = {
            name: (layer.owner_inference, layer.eval_owners) for name, layer in layers.items()
        }
        self.inference_accuracy = {}
        if isinstance(self.inference, OwnerInference) and self.owners_trained:
            trained = self.owners_trained
            if self._candidates is not None:
                trained = [o for o in trained if o in self._candidates]
            self.inference.candidates = list(trained)
            for layer in layers.values():
                layer.owner_inference, layer.eval_owners = self.inference, "infer"
        if self.input_stats is not None and self.owners_trained:
            self._input_routing = self.input_stats.attach(
                strategy.model, self.owners_trained, **self.input_routing_options
            )

    def before_eval_exp(self, strategy, **kwargs) -> None:
        exp = int(strategy.experience.current_experience)
        layers = named_peer_layers(strategy.model)
        self._counts = {name: [0, 0] for name in layers}
        if self._input_routing is not None:
            self._counts = {"input": [0, 0]}
        if self.inference == "oracle":
            for layer in layers.values():
                layer.eval_owners = exp if exp in layer.owners.tolist() else None

    def after_eval_forward(self, strategy, **kwargs) -> None:
        exp = int(strategy.experience.current_experience)
        if self._input_routing is not None and self._input_routing.last_owners is not None:
            got = self._input_routing.last_owners
            self._counts["input"][0] += int((got == exp).sum())
            self._counts["input"][1] += got.numel()
            self._input_routing.last_owners = None
            return
        for name, layer in named_peer_layers(strategy.model).items():
            got = layer.last_inferred_owners
            if got is not None and name in self._counts:
                self._counts[name][0] += int((got == exp).sum())
                self._counts[name][1] += got.numel()
            layer.last_inferred_owners = None  # never read a stale batch's owners

    def after_eval_exp(self, strategy, **kwargs) -> None:
        exp = int(strategy.experience.current_experience)
        done = {name: right / total for name, (right, total) in self._counts.items() if total}
        if done:
            self.inference_accuracy[exp] = done

    def after_eval(self, strategy, **kwargs) -> None:
        if self._input_routing is not None:
            self._input_routing.remove()
            self._input_routing = None
        for name, layer in named_peer_layers(strategy.model).items():
            if name in self._saved:
                layer.owner_inference, layer.eval_owners = self._saved[name]
        self._saved = {}


class KeyMarginProtection(SupervisedPlugin):
    """Adds ``weight · Σ_layers key_margin_loss(layer, new_owner=t)`` to every step's loss.

    Args:
        weight: λ, the weight of the summed loss.
        margin: how far below the old threshold new scores must stay.
        rank: the old threshold is the rank-th best old score (default: topk).
        num_samples: pseudo-queries drawn per old owner and step.
        min_var: added to the sampled variances.

    Attributes:
        last_loss: the latest unweighted loss (NaN before the first).
    """

    def __init__(
        self,
        weight: float = 1.0,
        *,
        margin: float = 0.0,
        rank: int | None = None,
        num_samples: int = 64,
        min_var: float = 0.0,
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.weight, self.margin, self.rank = float(weight), float(margin), rank
        self.num_samples, self.min_var = num_samples, float(min_var)
        self.last_loss = float("nan")

    def before_backward(self, strategy, **kwargs) -> None:
        if not self.weight:
            return
        owner = int(strategy.experience.current_experience)
        total = None
        for layer in named_peer_layers(strategy.model).values():
            if layer.query_stats is None or owner not in layer.owners.tolist():
                continue
            loss = key_margin_loss(
                layer,
                new_owner=owner,
                num_samples=self.num_samples,
                margin=self.margin,
                rank=self.rank,
                min_var=self.min_var,
            )
            total = loss if total is None else total + loss
        if total is not None:
            self.last_loss = float(total.detach())
            strategy.loss += self.weight * total
