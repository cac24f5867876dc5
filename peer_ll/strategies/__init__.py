"""Avalanche glue: PEER pools that grow per experience, plugins and strategy factories."""

from peer_ll.strategies.calibrated_margin import CalibratedMarginInference
from peer_ll.strategies.carry_state import CarryOptimizerState
from peer_ll.strategies.dense_grads import (
    DENSE_GRAD_PLUGINS,
    DenseExpertGrads,
    needs_dense_grads,
    sparse_aware,
)
from peer_ll.strategies.factories import peer_grow, peer_router_distillation, peer_sparse_finetuning
from peer_ll.strategies.growth import (
    GrowthEvent,
    GrowthPolicy,
    PEERGrowth,
    attach_growth,
    growth_modules,
)
from peer_ll.strategies.lm import AvalancheLM, LMDomainGrowth, peer_lm_strategy
from peer_ll.strategies.owner_gate import GateOwnerInference, OwnerGate, ReplayOwnerGate
from peer_ll.strategies.protect import peer_protect, protect_classifier, protect_plugin
from peer_ll.strategies.protect_plugins import KeyMarginProtection, OwnerRouting, owner_heads
from peer_ll.strategies.router_distillation import (
    QueryDistillation,
    RouterDistillation,
    routing_kl,
)
from peer_ll.strategies.sparse_finetuning import SparseExpertFinetuning

__all__ = [
    "DENSE_GRAD_PLUGINS",
    "CarryOptimizerState",
    "DenseExpertGrads",
    "GrowthEvent",
    "GrowthPolicy",
    "PEERGrowth",
    "QueryDistillation",
    "RouterDistillation",
    "SparseExpertFinetuning",
    "attach_growth",
    "growth_modules",
    "needs_dense_grads",
    "peer_grow",
    "peer_router_distillation",
    "peer_sparse_finetuning",
    "routing_kl",
    "sparse_aware",
    "GateOwnerInference",
    "KeyMarginProtection",
    "OwnerGate",
    "OwnerRouting",
    "ReplayOwnerGate",
    "owner_heads",
    "peer_protect",
    "protect_plugin",
    "CalibratedMarginInference",
    "protect_classifier",
    "AvalancheLM",
    "LMDomainGrowth",
    "peer_lm_strategy",
]
