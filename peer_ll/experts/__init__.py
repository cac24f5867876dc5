"""PEER layers with growable, owner-tagged expert pools (no Avalanche import here)."""

from peer_ll.experts.peer import PEER
from peer_ll.experts.routing import expert_usage, unevenness

__all__ = [
    "PEER",
    "expert_usage",
    "unevenness",
]
