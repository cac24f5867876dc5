"""Backend selection for peer_ll kernels: "auto" | "torch" | "triton".

Nothing here imports Triton at module import time.
"""

from __future__ import annotations

import functools
import os

import torch

# Compiled for a GPU, the bitonic top-k of K = 32 or 64 makes code that takes minutes
# or more to compile (bf16 K=32 for sm_80 and fp32 K=64 for sm_90 did not finish in
# 150 s); peer_ll.kernels.aot compiles every K <= 16 in seconds. So compiled kernels
# take k <= 16 (the paper's k); the interpreter takes up to 64.
COMPILED_MAX_K = 16

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return the concrete backend ("torch" or "triton") for these tensors.

    "auto" picks Triton for CUDA tensors (when Triton imports) and torch otherwise.
    "triton" on CPU tensors only works under ``TRITON_INTERPRET=1``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: "triton" was asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got tensors on {devices}); "
            "use backend='torch' or 'auto', or set TRITON_INTERPRET=1 before importing "
            "peer_ll to run the kernels in Triton's CPU interpreter"
        )
    return "triton"
