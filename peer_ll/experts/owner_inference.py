"""Owner inference at test time: pick the likely owner(s) of each input, restrict retrieval.

A PEER layer calls its ``owner_inference`` hook for ``layer(x, owners="infer")`` (and
in eval mode for ``owners=None`` once :func:`set_owner_inference` switched it on).
:class:`OwnerInference` scores every candidate owner per input in one of two ways:

- ``"likelihood"``: the Gaussian log-likelihood of the query under the owner's query
  statistics (:class:`~peer_ll.experts.owner_stats.OwnerQueryStats`), summed over heads;
- ``"margin"``: key-match confidence, the owner's best retrieval score (``key_score=
  "best"``) or its top-1 minus k-th score (``"gap"``) inside its own segments, averaged
  over heads;

then either restricts retrieval to the best owner (hard), or, with ``soft=True``,
runs owner-restricted retrieval for the ``top`` most likely owners and mixes their
outputs by the posterior ``softmax(score / temperature)`` renormalised over those
owners. Method ``"soft"`` is the soft likelihood version. Axis letters: ``T`` inputs,
``O`` candidate owners, ``M`` owners mixed, ``S`` segments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peer_ll.experts.checks import check_choice, check_int
from peer_ll.experts.peer import PEER
from peer_ll.kernels.product_topk import product_topk

METHODS = ("likelihood", "margin", "soft")
KEY_SCORES = ("best", "gap")


class OwnerInference:
    """Infers owners per input; use as ``layer.owner_inference``.

    Args:
        method: "likelihood", "margin" or "soft" (soft mixing by likelihood posterior).
        soft: mix the outputs of the ``top`` most likely owners (implied by "soft").
        top: owners mixed when soft (at most the number of candidates).
        temperature: posterior ``softmax(score / temperature)``.
        key_score: for "margin": "best" (top-1 score) or "gap" (top-1 minus k-th).
        min_var: variance floor of the likelihood.
        candidates: owners that may be inferred (default: every owner that holds at
            least ``topk`` experts and, for the likelihood, has query statistics).
    """

    def __init__(
        self,
        method: str = "likelihood",
        *,
        soft: bool = False,
        top: int = 2,
        temperature: float = 1.0,
        key_score: str = "best",
        min_var: float = 1e-4,
        candidates: list[int] | None = None,
    ) -> None:
        check_choice("method", method, METHODS)
        check_choice("key_score", key_score, KEY_SCORES)
        check_int("top", top, minimum=1)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.method = method
        self.score = "likelihood" if method == "soft" else method
        self.soft = soft or method == "soft"
        self.top, self.temperature, self.key_score = top, float(temperature), key_score
        self.min_var = float(min_var)
        self.candidates = None if candidates is None else [int(o) for o in candidates]

    def __repr__(self) -> str:
        return (f"OwnerInference(method={self.method!r}, soft={self.soft}, top={self.top}, "
                f"temperature={self.temperature}, key_score={self.key_score!r})")

    # ------------------------------------------------------------------- scores
    def candidate_owners(self, layer: PEER) -> list[int]:
        """Owners that may be inferred on ``layer``."""
        seg_owner = layer.segment_owner.tolist()
        sizes = (layer.segments[:, 1] * layer.segments[:, 2]).tolist()
        held: dict[int, int] = {}
        for o, n in zip(seg_owner, sizes, strict=True):
            held[o] = held.get(o, 0) + n
        owners = [o for o, n in held.items() if n >= layer.topk]
        if self.score == "likelihood":
            if layer.query_stats is None:
                raise ValueError("owner inference by likelihood needs query statistics, "
                                 "got a layer built with query_stats=None")
            owners = [o for o in owners if o in layer.query_stats.usable_owners()]
        if self.candidates is not None:
            owners = [o for o in owners if o in self.candidates]
        if not owners:
            raise ValueError(f"no owner can be inferred: owners {sorted(held)} hold "
                             f"{list(held.values())} experts (topk={layer.topk}); method "
                             f"{self.method!r} needs query statistics or enough experts")
        return sorted(owners)

    @torch.no_grad()
    def scores(self, layer: PEER, q: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Owner scores: q (T, H, d) -> (owners O, scores (T, O)); higher is likelier."""
        owners = self.candidate_owners(layer)
        if self.score == "likelihood":
            ll = layer.query_stats.log_likelihood(q, owners, min_var=self.min_var)
            return owners, ll.to(q.dtype)
        k = layer.topk
        out = []
        for owner in owners:  # one restricted search per owner, not per input
            keep = layer.segment_owner == owner
            s, _ = product_topk(layer.owner_query(q, owner), layer.sub_keys.detach(),
                                layer.segments[keep], k, backend=layer.backend)  # (T, H, k)
            conf = s[..., 0] if self.key_score == "best" else s[..., 0] - s[..., k - 1]
            out.append(conf.mean(dim=-1))
        return owners, torch.stack(out, dim=1)

    def posterior(self, layer: PEER, q: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, posterior (T, O)) over the candidate owners."""
        owners, scores = self.scores(layer, q)
        return owners, (scores.double() / self.temperature).softmax(dim=1).to(q.dtype)

    # -------------------------------------------------------------------- hooks
    def __call__(
        self, layer: PEER, x: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard restriction to the best owner: -> (segments (S, 4), mask (T, S))."""
        owners, scores = self.scores(layer, q)
        best = torch.tensor(owners, device=scores.device)[scores.argmax(dim=1)]  # (T,)
        layer.last_inferred_owners = best.view(x.shape[:-1])
        mask = best[:, None].to(layer.segment_owner.device) == layer.segment_owner[None, :]
        return layer.segments, mask

    def mixture(
        self, layer: PEER, x: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft mixing: -> (owner ids (T, M), weights (T, M) summing to 1 per input)."""
        owners, post = self.posterior(layer, q)
        m = min(self.top, len(owners))
        weights, pick = post.topk(m, dim=1)
        ids = torch.tensor(owners, device=post.device)[pick]
        layer.last_inferred_owners = ids[:, 0].view(x.shape[:-1])
        return ids, weights / weights.sum(dim=1, keepdim=True)


# --------------------------------------------------------------- model level
def peer_layers(model: nn.Module) -> dict[str, PEER]:
    """Every PEER layer inside ``model`` (itself included), by module name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PEER)}
    if not layers:
        raise ValueError(f"model must contain PEER layers, got {type(model).__name__} "
                         "without any")
    return layers


def set_owner_inference(
    model: nn.Module, method: str | OwnerInference | None, **options
) -> dict[str, PEER]:
    """Switch owner inference on (or off, with None) for every PEER layer of ``model``.

    On: ``owners="infer"`` works, and eval-mode forwards with ``owners=None`` infer.
    Training-mode forwards still search every owner unless told otherwise.

    Args:
        model: a module holding PEER layers (or a PEER layer).
        method: "likelihood", "margin", "soft", an :class:`OwnerInference`, or None.
        **options: keyword arguments of :class:`OwnerInference` (with a method name).

    Returns:
        The layers, by module name.
    """
    if isinstance(method, OwnerInference) and options:
        raise TypeError(f"options go with a method name, got an OwnerInference and {options}")
    if method is not None and not isinstance(method, OwnerInference | str):
        raise TypeError(f"method must be a str, an OwnerInference or None, got "
                        f"{type(method).__name__}")
    inference = method if not isinstance(method, str) else OwnerInference(method, **options)
    layers = peer_layers(model)
    for layer in layers.values():
        layer.owner_inference = inference
        layer.eval_owners = None if inference is None else "infer"
    return layers


@torch.no_grad()
def inferred_owners(
    model: nn.Module, x: object, *, forward: Callable[[nn.Module, object], object] | None = None
) -> dict[str, torch.Tensor]:
    """Owners each PEER layer infers for a batch (for the accuracy of inference).

    Runs ``forward(model, x)`` (default ``model(x)``) once in eval mode with inference
    on, then restores the modes. Every layer needs ``owner_inference`` set.

    Returns:
        ``{layer name: owners (...)}``, the layer's input shape without its last axis
        (the top owner when soft).
    """
    layers = peer_layers(model)
    missing = [name for name, layer in layers.items() if layer.owner_inference is None]
    if missing:
        raise ValueError(f"layers {missing} have no owner_inference: call "
                         "set_owner_inference(model, method) first")
    modes = {m: m.training for m in model.modules()}
    saved = {name: layer.eval_owners for name, layer in layers.items()}
    try:
        model.eval()
        for layer in layers.values():
            layer.eval_owners, layer.last_inferred_owners = "infer", None
        model(x) if forward is None else forward(model, x)
        return {name: layer.last_inferred_owners for name, layer in layers.items()
                if layer.last_inferred_owners is not None}
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for name, layer in layers.items():
            layer.eval_owners = saved[name]


def owner_posterior(layer: PEER, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(owners O, posterior (..., O)) of ``layer``'s inference for inputs x (..., D).

    Queries are computed in the layer's current mode: call it in eval mode.
    """
    if layer.owner_inference is None:
        raise ValueError("layer has no owner_inference: call set_owner_inference first")
    with torch.no_grad():
        q = layer.query(x)
    owners, post = layer.owner_inference.posterior(layer, q.reshape(-1, layer.heads,
                                                                    layer.dim_key))
    return owners, post.view(*x.shape[:-1], len(owners))
