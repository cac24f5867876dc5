"""Kernels for PEER: product-key top-k retrieval and expert mixing.

Each op lives in its own module with a Triton version and the pure-torch
reference (``reference.py``) behind one public function that takes
``backend="auto" | "torch" | "triton"``:

- ``peer_ll.kernels.product_topk.product_topk``
- ``peer_ll.kernels.expert_mix.expert_mix``
"""

from peer_ll.kernels.backend import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
