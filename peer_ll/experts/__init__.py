"""The PEER layer and its growable, owner-tagged expert pool (no Avalanche import here).

- :class:`PEER`: the paper's layer (He 2024), with a pool that grows by segments;
- owners as explicit data: :class:`OwnerMix`, :func:`mix_owners`,
  :func:`call_with_owners`;
- :func:`peer_layers`: the PEER layers of a model;
- :func:`expert_usage`, :func:`unevenness`: the paper's Table 2 routing metrics;
- :class:`PerOwner`: one copy of a module per owner (e.g. per-owner
  :class:`QueryAdapter` s, an optional query transform);
- :func:`load_or_restore`: a state-dict load into any model that fails whole.
"""

from peer_ll.experts.checkpoint import load_or_restore
from peer_ll.experts.layers import peer_layers
from peer_ll.experts.owners import OwnerMix, Owners, call_with_owners, mix_owners
from peer_ll.experts.peer import PEER
from peer_ll.experts.per_owner import PerOwner, per_owner_modules
from peer_ll.experts.pool import ExpertPool
from peer_ll.experts.query_adapter import QueryAdapter
from peer_ll.experts.routing import RoutingStats, expert_usage, unevenness

__all__ = [
    "PEER",
    "ExpertPool",
    "OwnerMix",
    "Owners",
    "PerOwner",
    "QueryAdapter",
    "RoutingStats",
    "call_with_owners",
    "expert_usage",
    "load_or_restore",
    "mix_owners",
    "peer_layers",
    "per_owner_modules",
    "unevenness",
]
