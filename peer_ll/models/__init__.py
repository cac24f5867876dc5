"""Ready models built on PEER layers."""

from peer_ll.models.classifier import PEERClassifier

__all__ = ["PEERClassifier"]
