"""A model whose forwards choose owners: the one place where owners are decided.

Owners are data (:mod:`peer_ll.experts.owners`): ``model(x, owners=...)`` restricts
every PEER layer (and every :class:`~peer_ll.experts.PerOwner` module) to
them. :class:`OwnerRouted` wraps an owner-aware model and decides the owners of a
forward that gets none:

1. its one piece of standing state, ``owner`` (set with :meth:`OwnerRouted.set_owner`,
   like PEFT's ``set_adapter``): while set, every forward uses that owner (the training
   owner, or a known task label);
2. else, in eval mode with a scorer, the scorer's most likely owner of each input, or,
   with ``soft=True``, an :class:`~peer_ll.experts.OwnerMix` of the ``top`` likeliest
   owners weighted by ``softmax(log p(owner | x) / temperature)`` renormalised over them:
   the model runs once per mixed owner and the class probabilities are mixed with
   :func:`~peer_ll.experts.mix_owners`, so the output is ``log Σ_m w_m softmax(z_m)``;
3. else None: every expert (the paper's layer).

An owner scorer is any module with ``scores(model, x) -> (owners O, (B, O)
log-probabilities)``, ``fit(model, owner, x, y, replay)`` and ``owners`` (those fitted):
:class:`~peer_ll.protect.input_stats.InputOwnerStats` (input statistics),
:class:`~peer_ll.protect.query_stats.QueryOwnerStats` (query likelihood) and
:class:`~peer_ll.protect.gate.OwnerGate` (a gate fit on replayed inputs); a task label
("oracle") needs no scorer: :meth:`set_owner` it. Nothing about a call is stored.
"""

from __future__ import annotations

import torch
from torch import nn

from peer_ll.experts import PEER, OwnerMix, call_with_owners, mix_owners, peer_layers
from peer_ll.experts.checks import check_bool, check_float, check_int, check_owner

Route = int | torch.Tensor | OwnerMix | None


CHUNK = 1024  # inputs per forward when a scorer collects a layer's queries


class _Captured(Exception):
    """Stops a forward once the watched layer's input is known."""


@torch.no_grad()
def layer_input(model: nn.Module, layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """The input ``layer`` receives when ``model`` runs on ``x``: (..., D).

    A read-only forward pre-hook notes the input and stops the forward there; the hook
    is removed before this returns. Owner-aware modules before ``layer`` get no owners
    (their newest owner), so the model's trunk before ``layer`` should be shared.
    """
    seen: list[torch.Tensor] = []

    def note(module, args):
        seen.append(args[0])
        raise _Captured

    handle = layer.register_forward_pre_hook(note)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(
            f"layer must run in model's forward, got a {type(layer).__name__} that did not"
        )
    return seen[0]


def pick_layer(model: nn.Module, name: str | None) -> PEER:
    """The PEER layer ``name`` of ``model`` (None: the first)."""
    layers = peer_layers(model)
    if name is None:
        return next(iter(layers.values()))
    if name not in layers:
        raise ValueError(f"layer must be one of {list(layers)}, got {name!r}")
    return layers[name]


class OwnerRouted(nn.Module):
    """An owner-aware model with owners decided per forward: (B, ...) -> (B, C).

    Args:
        model: an owner-aware model (``takes_owners = True``), e.g. a
            ``peer_ll.models.PEERClassifier``.
        scorer: an owner scorer (see the module docstring), or None (no inference:
            eval forwards without an owner use every expert).
        soft: mix the ``top`` likeliest owners' class probabilities (eval, with a scorer).
        top: owners mixed per input when ``soft``.
        temperature: posterior temperature of the soft mixture.

    Attributes:
        model: the wrapped model (the scorer is a submodule too: its state is saved).
        owner: the standing owner (None: decide per forward).
    """

    takes_owners = True

    def __init__(
        self,
        model: nn.Module,
        scorer: nn.Module | None = None,
        *,
        soft: bool = False,
        top: int = 2,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not getattr(model, "takes_owners", False):
            raise TypeError(
                f"model must be owner-aware (takes_owners = True), got {type(model).__name__}"
            )
        for method in ("scores", "fit"):
            if scorer is not None and not callable(getattr(scorer, method, None)):
                raise TypeError(
                    f"scorer must have a {method}() method, got {type(scorer).__name__}"
                )
        self.model, self.scorer = model, scorer
        self.soft = check_bool("soft", soft)
        self.top = check_int("top", top, minimum=1)
        self.temperature = check_float("temperature", temperature, minimum=1e-12)
        self.owner: int | None = None

    def set_owner(self, owner: int | None) -> None:
        """Route every forward to ``owner`` until it is set again (None: decide per call)."""
        self.owner = None if owner is None else check_owner("owner", owner)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> Route:
        """The owners a forward on x (B, ...) without ``owners`` uses (see the module doc)."""
        if self.owner is not None:
            return self.owner
        if self.training or self.scorer is None or not self.scorer.owners:
            return None  # every expert
        owners, logp = self.scorer.scores(self.model, x)  # (B, O)
        ids = torch.tensor(owners, device=x.device)
        if not self.soft:
            return ids[logp.argmax(dim=1).to(x.device)]
        best, pick = logp.topk(min(self.top, len(owners)), dim=1)
        weights = (best.double() / self.temperature).softmax(dim=1)
        return OwnerMix(ids[pick.to(x.device)], weights.to(x.device, torch.float32))

    def forward(self, x: torch.Tensor, owners: Route = None) -> torch.Tensor:
        """Logits (B, C); log-probabilities of the mixture when the route is an OwnerMix."""
        route = self.route(x) if owners is None else owners
        if not isinstance(route, OwnerMix):
            return call_with_owners(self.model, x, route)
        probs = mix_owners(lambda o: self.model(x, owners=o).softmax(dim=-1), route)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def extra_repr(self) -> str:
        return f"soft={self.soft}, top={self.top}, temperature={self.temperature}"


def top_owner(route: Route, size: int) -> torch.Tensor | None:
    """The (size,) top owner of each input of a route (None if the route has none)."""
    if route is None:
        return None
    if isinstance(route, OwnerMix):
        return route.ids[:, 0]
    if isinstance(route, torch.Tensor) and route.dim() > 0:
        return route
    return torch.full((size,), int(route), dtype=torch.long)


__all__ = ["OwnerRouted", "Route", "layer_input", "pick_layer", "top_owner"]
