"""Kernels for PEER: product-key top-k retrieval, expert mixing, selected scores.

Each op has a Triton version and a pure-torch reference (``reference.py``, the CPU
path and the test oracle) behind one public function that takes
``backend="auto" | "torch" | "triton"``:

- ``peer_ll.kernels.product_topk.product_topk``: exact top-k over segmented
  product keys (not differentiable);
- ``peer_ll.kernels.selected_scores.selected_scores``: differentiable scores of
  the retrieved experts;
- ``peer_ll.kernels.expert_mix.expert_mix``: ``Σ g·σ(u·x)·v`` with row-sparse
  table gradients (``peer_ll.kernels.row_grad``);
- ``peer_ll.kernels.lazy_adamw.lazy_adamw_``: AdamW on the touched rows of a table,
  in place (the row update of ``peer_ll.optim.SparseAdamW``): Triton on CUDA, a small
  C kernel on CPU (``_native.py``, built on first use), torch as the fallback.

On CPU, "auto" retrieval also uses a C row top-k (``_native_topk.py``, built the same
way); ``peer_ll.kernels.memory`` puts large tables on transparent huge pages.

``peer_ll.kernels.aot`` compiles every Triton kernel configuration for sm_80/sm_90
ahead of time, without a GPU (``python -m peer_ll.kernels.aot``).

Triton is imported only when a Triton kernel first runs (the ``_*_triton.py``
modules), never at import.
"""

from peer_ll.kernels.backend import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
