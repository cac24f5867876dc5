"""PEER layers with growable, owner-tagged expert pools (no Avalanche import here)."""

from peer_ll.experts.owner_inference import (
    OwnerInference,
    inferred_owners,
    owner_posterior,
    peer_layers,
    set_owner_inference,
)
from peer_ll.experts.owner_input import InputOwnerStats, InputRouting
from peer_ll.experts.owner_routing import QueryAdapter
from peer_ll.experts.owner_stats import OwnerQueryStats, recording_query_stats
from peer_ll.experts.peer import PEER
from peer_ll.experts.protection import key_margin_loss
from peer_ll.experts.routing import expert_usage, unevenness

__all__ = [
    "PEER",
    "InputOwnerStats",
    "InputRouting",
    "OwnerInference",
    "OwnerQueryStats",
    "QueryAdapter",
    "expert_usage",
    "inferred_owners",
    "key_margin_loss",
    "owner_posterior",
    "peer_layers",
    "recording_query_stats",
    "set_owner_inference",
    "unevenness",
]
