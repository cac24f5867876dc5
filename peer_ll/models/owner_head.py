"""A per-owner classification head, picked per input by the owner PEER routing used.

Grow-and-freeze with owner-restricted retrieval keeps an old owner's PEER output
bit-identical, but a head shared by every owner still drifts (or, frozen, stops the
new owner from learning). :class:`OwnerHead` gives each owner (task or experience
id) its own linear head, so the old function stays intact end to end while a new
owner trains its own head: the plasticity a domain-incremental stream needs.

Which head an input goes through:

- an explicit ``owners`` argument (an int, or an int tensor of the input's leading
  shape);
- in training mode, ``training_owner`` (default: the newest owner);
- in eval mode, the owners the ``follow`` PEER layer routed to in the same forward:
  its ``last_inferred_owners`` under owner inference (the top owner if it mixes
  owners softly), its ``eval_owners`` if they name owners, else the newest owner.

Each owner also has a class mask (its experience's classes): logits of other classes
are set to :data:`MASKED_LOGIT`, so a class-incremental stream predicts among the
classes of the inferred owner. Nothing here imports Avalanche.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_int, check_owner

#: Logit of a class outside an owner's class set (finite, so mixing and losses stay finite).
MASKED_LOGIT = -1.0e4

INITS = ("copy", "fresh")


class OwnerHead(nn.Module):
    """One ``Linear(in_features, num_classes)`` per owner; (..., D) -> (..., C) logits.

    Args:
        in_features: input size D.
        num_classes: outputs C of every head.
        owner: owner of the first head.
        init: a new owner's head starts as a "copy" of the newest head, or "fresh".
        follow: the PEER layer whose routing picks the head in eval mode (usually
            the model's last PEER layer); kept as a plain attribute, not a submodule.

    Buffers:
        ``owner_ids`` (O,) int64 and ``class_mask`` (O, C) bool, in order of addition.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        owner: int = 0,
        init: str = "copy",
        follow: PEER | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.heads = nn.ModuleDict()
        self.register_buffer("owner_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_mask", torch.zeros(0, num_classes, dtype=torch.bool))
        self.training_owner: int | None = None
        self.follow = follow
        self.add_owner(owner)

    @property
    def follow(self) -> PEER | None:
        """The PEER layer whose routing picks the head in eval mode."""
        return self._follow

    def __setattr__(self, name: str, value) -> None:
        if name == "follow":  # a plain attribute, not a submodule: the model owns the layer
            if value is not None and not isinstance(value, PEER):
                raise TypeError(f"follow must be a PEER layer or None, got {type(value).__name__}")
            object.__setattr__(self, "_follow", value)
            return
        super().__setattr__(name, value)

    @property
    def owners(self) -> list[int]:
        """Owners that have a head, in order of addition."""
        return self.owner_ids.tolist()

    def add_owner(self, owner: int, *, classes: Iterable[int] | None = None) -> nn.Linear:
        """Give ``owner`` a head (or update its class set if it has one).

        Args:
            owner: the owner id.
            classes: the owner's classes (default: every class).

        Returns:
            The owner's head.
        """
        owner = check_owner("owner", owner)
        mask = torch.ones(self.num_classes, dtype=torch.bool, device=self.class_mask.device)
        if classes is not None:
            wanted = sorted({int(c) for c in classes})
            bad = [c for c in wanted if not 0 <= c < self.num_classes]
            if bad or not wanted:
                raise ValueError(f"classes must be a non-empty set in [0, {self.num_classes}), "
                                 f"got {wanted}")
            mask = torch.zeros_like(mask)
            mask[wanted] = True
        if owner in self.owners:
            self.class_mask[self.owners.index(owner)] = mask
            return self.heads[str(owner)]
        head = nn.Linear(self.in_features, self.num_classes)
        if len(self.heads):
            newest = self.heads[str(self.owners[-1])]
            head = head.to(device=newest.weight.device, dtype=newest.weight.dtype)
            if self.init == "copy":
                head.load_state_dict(newest.state_dict())
        self.heads[str(owner)] = head
        self.owner_ids = torch.cat([self.owner_ids, self.owner_ids.new_tensor([owner])])
        self.class_mask = torch.cat([self.class_mask, mask[None]])
        return head

    def freeze(self, owners: Iterable[int] | None = None, *, frozen: bool = True) -> None:
        """Stop (or, with ``frozen=False``, restart) training the heads of ``owners``."""
        freeze_per_owner(self.heads, self.owners, owners, frozen)

    # ------------------------------------------------------------------ forward
    def current_owners(self, lead: torch.Size) -> int | torch.Tensor:
        """The owner (int) or owners (tensor of shape ``lead``) a forward uses."""
        if self.training:
            return self.owners[-1] if self.training_owner is None else self.training_owner
        layer = self.follow
        if layer is None:
            return self.owners[-1]
        chosen = layer.eval_owners
        if isinstance(chosen, str) and chosen == "infer":
            chosen = layer.last_inferred_owners
            if chosen is None or tuple(chosen.shape) != tuple(lead):
                raise ValueError(f"follow layer's last_inferred_owners must have shape "
                                 f"{tuple(lead)} from this forward, got "
                                 f"{None if chosen is None else tuple(chosen.shape)}")
        return eval_owners_or_newest(chosen, self.owners[-1])

    def forward(self, h: torch.Tensor, owners: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits: h (..., D), owners None | int | int tensor (...) -> (..., C)."""
        if h.shape[-1] != self.in_features:
            raise ValueError(f"h must have shape (..., {self.in_features}), got {tuple(h.shape)}")
        lead = h.shape[:-1]
        owners = self.current_owners(lead) if owners is None else owners
        if not isinstance(owners, torch.Tensor) or owners.dim() == 0:
            return self._apply_head(h, check_owner("owners", owners))
        if tuple(owners.shape) != tuple(lead):
            raise ValueError(f"owners must have shape {tuple(lead)}, got {tuple(owners.shape)}")
        flat_h, flat_o = h.reshape(-1, self.in_features), owners.reshape(-1)
        return apply_per_owner(flat_h, flat_o, self._apply_head).view(*lead, self.num_classes)

    def _apply_head(self, h: torch.Tensor, owner: int) -> torch.Tensor:
        if owner not in self.owners:
            raise ValueError(f"owners must be among {self.owners} (owners with a head), "
                             f"got {owner}")
        mask = self.class_mask[self.owners.index(owner)]
        return self.heads[str(owner)](h).masked_fill(~mask, MASKED_LOGIT)

    # ------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Create the heads a checkpoint holds before loading them."""
        ids = state_dict.get(prefix + "owner_ids")
        if ids is not None:
            self.owner_ids = ids.new_zeros(0).to(self.owner_ids.device)
            self.class_mask = self.class_mask.new_zeros(0, self.num_classes)
            kept = {o: self.heads[str(o)] for o in self.owners}
            self.heads = nn.ModuleDict()
            for owner in ids.tolist():
                head = kept.get(owner)
                self.heads[str(owner)] = nn.Linear(self.in_features, self.num_classes) \
                    if head is None else head
            self.owner_ids = ids.clone().to(self.owner_ids.device)
            self.class_mask = torch.ones(len(ids), self.num_classes, dtype=torch.bool,
                                         device=self.class_mask.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"owners={self.owners}, init={self.init!r}")


def apply_per_owner(x: torch.Tensor, owners: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x[owners == o], o)`` for each owner o present, back in input order.

    x (N, ...), owners (N,) ints -> (N, ...) as ``fn`` returns; a loop over owners,
    not inputs.
    """
    owners = owners.to(x.device)
    parts = {o: fn(x[owners == o], o) for o in owners.unique().tolist()}
    first = next(iter(parts.values()))
    out = first.new_empty(x.shape[0], *first.shape[1:])
    for o, y in parts.items():
        out[owners == o] = y
    return out


def freeze_per_owner(modules: nn.ModuleDict, known: list[int], owners, frozen: bool) -> None:
    """(Un)freeze ``modules[str(o)]`` for ``owners`` (None: all ``known``); checked first."""
    owners = known if owners is None else [check_owner("owners", o) for o in owners]
    missing = sorted(set(owners) - set(known))
    if missing:
        raise ValueError(f"owners must be among {known}, got {missing}")
    for owner in owners:
        modules[str(owner)].requires_grad_(not frozen)


def eval_owners_or_newest(chosen, newest: int) -> int | torch.Tensor:
    """The owner (int) or per-input owners (tensor) that ``eval_owners`` name.

    None, a string ("all") or a set of owners fall back to ``newest``.
    """
    if isinstance(chosen, torch.Tensor) and chosen.dim() > 0:
        return chosen
    if chosen is None or isinstance(chosen, str):  # every owner searched
        return newest
    if isinstance(chosen, int | torch.Tensor):
        return check_owner("owners", chosen)
    return newest  # a set of owners: the newest


def refuse_query_inference(follow: PEER | None, who: str) -> None:
    """Raise if ``follow`` infers owners from queries: ``who`` needs them before the forward."""
    if follow is not None and isinstance(follow.eval_owners, str) and (
        follow.eval_owners == "infer"
    ):
        raise ValueError(
            f"eval_owners: {who} each input's owner before the forward (input statistics, "
            "see InputOwnerStats.attach, or known owners), got 'infer' (query-based "
            "inference runs after this layer)"
        )


def with_owner_head(model: nn.Module, *, init: str = "copy") -> nn.Module:
    """Replace ``model.head`` (a ``Linear``) by an :class:`OwnerHead` that follows routing.

    The first owner's head starts with the old ``Linear``'s weights. The new head follows the
    model's last PEER layer. Call it before building the optimizer.

    Args:
        model: e.g. a ``peer_ll.models.PEERClassifier(..., head="fixed")``.
        init: as for :class:`OwnerHead`.

    Returns:
        ``model``, changed in place.
    """
    old = getattr(model, "head", None)
    if type(old) is not nn.Linear:
        raise TypeError(f"model.head must be a torch.nn.Linear (e.g. PEERClassifier(..., "
                        f"head='fixed')), got {type(old).__name__}")
    layers = [m for m in model.modules() if isinstance(m, PEER)]
    if not layers:
        raise ValueError(f"model must contain PEER layers, got {type(model).__name__} "
                         "without any")
    owner = int(layers[-1].segment_owner[0])
    head = OwnerHead(old.in_features, old.out_features, owner=owner, init=init,
                     follow=layers[-1]).to(device=old.weight.device, dtype=old.weight.dtype)
    first = head.heads[str(owner)]
    with torch.no_grad():
        first.weight.copy_(old.weight)
        first.bias.copy_(old.bias) if old.bias is not None else first.bias.zero_()
    model.head = head
    return model


class OwnerLinear(OwnerHead):
    """One ``Linear(in_features, out_features)`` per owner inside the trunk: (..., D) -> (..., E).

    An :class:`OwnerHead` without class masks, for per-owner capacity before the
    PEER layers (e.g. the encoder's first layer, :func:`with_owner_encoder`): a new
    owner's copy starts as the newest owner's and trains while every older copy is
    frozen, so an old owner's function stays bit-identical under its own route.

    The owner of each input must be known *before* the forward: in eval mode it is
    the ``follow`` layer's ``eval_owners`` (an owner, or one per input, as set by
    :meth:`peer_ll.experts.InputOwnerStats.attach` or an oracle). Query-based
    inference (``eval_owners="infer"``) decides owners after this layer has run, so
    it is refused.
    """

    def add_owner(self, owner: int, *, classes: Iterable[int] | None = None) -> nn.Linear:
        """Give ``owner`` a copy of the newest owner's layer; ``classes`` are ignored."""
        return super().add_owner(owner)

    def current_owners(self, lead: torch.Size) -> int | torch.Tensor:
        if not self.training:
            refuse_query_inference(self.follow, "an OwnerLinear needs")
        return super().current_owners(lead)


def with_owner_encoder(model: nn.Module) -> nn.Module:
    """Replace the first ``Linear`` of ``model.encoder`` by an :class:`OwnerLinear`.

    Each owner then trains its own copy of the encoder's input layer (initialised
    from the newest copy), which gives a new owner capacity where its inputs differ
    (e.g. a new pixel permutation) while old owners keep theirs frozen. It follows
    the model's first PEER layer. Use it with owners known before the forward
    (``peer_protect(inference="input")`` or "oracle"). Call it before building the
    optimizer.

    Returns:
        ``model``, changed in place.
    """
    encoder = getattr(model, "encoder", None)
    linears = [i for i, m in enumerate(encoder or []) if type(m) is nn.Linear]
    if not isinstance(encoder, nn.Sequential) or not linears:
        raise TypeError("model.encoder must be an nn.Sequential holding an nn.Linear "
                        f"(e.g. a PEERClassifier), got {type(encoder).__name__}")
    layers = [m for m in model.modules() if isinstance(m, PEER)]
    if not layers:
        raise ValueError(f"model must contain PEER layers, got {type(model).__name__} "
                         "without any")
    old = encoder[linears[0]]
    owner = int(layers[0].segment_owner[0])
    new = OwnerLinear(old.in_features, old.out_features, owner=owner, follow=layers[0]).to(
        device=old.weight.device, dtype=old.weight.dtype)
    first = new.heads[str(owner)]
    with torch.no_grad():
        first.weight.copy_(old.weight)
        first.bias.copy_(old.bias) if old.bias is not None else first.bias.zero_()
    encoder[linears[0]] = new
    return model
