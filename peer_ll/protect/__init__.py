"""Routing protection for growing PEER pools: owner scoring, per-owner modules, strategies.

Once every old parameter of a growing pool is frozen, an old input changes output only
through routing. This package keeps each input on its own owner's experts:

- :class:`PerOwner`: one container for every per-owner part (head, encoder layer, norms,
  PEER query adapters), owner-aware (``forward(x, owners=None)``);
- owner scorers, ``scores(model, x) -> (owners, (B, O) log-probabilities)``:
  :class:`InputOwnerStats` (input statistics), :class:`QueryOwnerStats` (query
  likelihood), :class:`OwnerGate` (a gate fit on replayed inputs); a task label needs
  none;
- :class:`OwnerRouted`: a model that decides each forward's owners (standing owner,
  scorer argmax, or a soft :class:`~peer_ll.experts.OwnerMix`) and passes them down;
- :class:`OwnerRouting` (Avalanche plugin) and :func:`peer_protect`: the full method;
- :class:`RouterDistillation` and :func:`peer_router_distillation`: LwF on routing;
- baselines that show what the pool adds: :func:`input_stats_classifier` (owner inference
  alone as a classifier) and :func:`owner_mlp_classifier` (a per-owner MLP for the pool).

Nothing below this package imports it.
"""

from peer_ll.experts.per_owner import MASKED_LOGIT, PerOwner, per_owner_modules
from peer_ll.protect.builders import (
    with_owner_encoder,
    with_owner_head,
    with_owner_norms,
    with_query_adapters,
)
from peer_ll.protect.distillation import (
    QueryDistillation,
    RouterDistillation,
    peer_router_distillation,
    routing_kl,
)
from peer_ll.protect.factory import INFERENCES, peer_protect, protect_classifier, protect_plugin
from peer_ll.protect.gate import OwnerGate
from peer_ll.protect.input_stats import InputOwnerStats
from peer_ll.protect.mlp_ablation import owner_mlp_classifier
from peer_ll.protect.plugin import OwnerRouting
from peer_ll.protect.query_stats import QueryOwnerStats
from peer_ll.protect.routed import OwnerRouted
from peer_ll.protect.stats_classifier import InputStatsClassifier, input_stats_classifier

__all__ = [
    "INFERENCES",
    "MASKED_LOGIT",
    "InputOwnerStats",
    "InputStatsClassifier",
    "OwnerGate",
    "OwnerRouted",
    "OwnerRouting",
    "PerOwner",
    "QueryDistillation",
    "QueryOwnerStats",
    "RouterDistillation",
    "input_stats_classifier",
    "owner_mlp_classifier",
    "peer_protect",
    "peer_router_distillation",
    "per_owner_modules",
    "protect_classifier",
    "protect_plugin",
    "routing_kl",
    "with_owner_encoder",
    "with_owner_head",
    "with_owner_norms",
    "with_query_adapters",
]
