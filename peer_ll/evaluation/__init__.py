"""Forgetting, plasticity and PEER routing metrics (pure functions on matrices)."""

from peer_ll.evaluation.metrics import (
    average_accuracy,
    bwt,
    dead_unit_fraction,
    effective_rank,
    forgetting,
    forgetting_per_experience,
    fwt,
    intransigence,
    learning_accuracy,
    relative_increase,
    routing_share,
    unevenness,
    usage,
)

__all__ = [
    "average_accuracy",
    "bwt",
    "dead_unit_fraction",
    "effective_rank",
    "forgetting",
    "forgetting_per_experience",
    "fwt",
    "intransigence",
    "learning_accuracy",
    "relative_increase",
    "routing_share",
    "unevenness",
    "usage",
]
