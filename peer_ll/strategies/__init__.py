"""Avalanche glue: PEER pools that grow per experience, plugins and strategy factories."""

from peer_ll.strategies.carry_state import CarryOptimizerState
from peer_ll.strategies.classifier import MultiHeadPEERClassifier, peer_classifier
from peer_ll.strategies.dense_grads import (
    DENSE_GRAD_PLUGINS,
    DenseExpertGrads,
    needs_dense_grads,
    sparse_aware,
)
from peer_ll.strategies.factories import peer_grow, peer_sparse_finetuning
from peer_ll.strategies.growth import (
    GrowthEvent,
    GrowthPolicy,
    PEERGrowth,
    attach_growth,
    check_growth,
    growth_modules,
)
from peer_ll.strategies.lm import AvalancheLM, LMDomainGrowth, peer_lm_strategy
from peer_ll.strategies.novelty import GrowthDecision, LossJumpTrigger, NoveltyTrigger
from peer_ll.strategies.sparse_finetuning import SparseExpertFinetuning

__all__ = [
    "DENSE_GRAD_PLUGINS",
    "AvalancheLM",
    "CarryOptimizerState",
    "DenseExpertGrads",
    "GrowthDecision",
    "GrowthEvent",
    "GrowthPolicy",
    "LMDomainGrowth",
    "MultiHeadPEERClassifier",
    "LossJumpTrigger",
    "NoveltyTrigger",
    "PEERGrowth",
    "SparseExpertFinetuning",
    "attach_growth",
    "check_growth",
    "growth_modules",
    "needs_dense_grads",
    "peer_classifier",
    "peer_grow",
    "peer_lm_strategy",
    "peer_sparse_finetuning",
    "sparse_aware",
]
