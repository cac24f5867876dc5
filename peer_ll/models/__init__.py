"""Ready models built on PEER layers."""

from peer_ll.models.classifier import PEERClassifier
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig

__all__ = ["LMConfig", "PEERClassifier", "PEERLM"]
