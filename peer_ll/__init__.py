"""peer_ll: lifelong learning with growable PEER (Parameter Efficient Expert Retrieval) pools.

Importing ``peer_ll`` loads nothing heavy; import the subpackages you use
(``peer_ll.experts``, ``peer_ll.models``, ``peer_ll.strategies``, ...).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peer-ll")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
