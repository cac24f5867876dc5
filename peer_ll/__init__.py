"""peer_ll: lifelong learning with growable PEER (Parameter Efficient Expert Retrieval) pools.

Importing ``peer_ll`` loads nothing heavy; import the subpackages you use
(``peer_ll.experts``, ``peer_ll.models``, ``peer_ll.strategies``, ...).
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peer-ll")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# The library logs through ``logging.getLogger("peer_ll...")`` and never prints; an
# application chooses where the records go (``logging.basicConfig(level=logging.INFO)``).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
