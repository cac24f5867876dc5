"""Backend selection: "auto" picks by device; "triton" fails clearly where it cannot run."""

import subprocess
import sys

import pytest
import torch

from peer_ll.kernels import backend, resolve_backend
from peer_ll.kernels.expert_mix import expert_mix


def test_auto_is_torch_on_cpu_and_names_are_checked():
    t = torch.zeros(2)
    assert resolve_backend("auto", t) == "torch"
    assert resolve_backend("torch", t) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", t)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Patch the check rather than the variable: Triton reads TRITON_INTERPRET once.
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    x = torch.randn(2, 4)
    ids = torch.zeros(2, 1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        expert_mix(
            x, ids, torch.ones(2, 1, 1), torch.randn(3, 4), torch.randn(3, 4), backend="triton"
        )


def test_importing_the_kernels_imports_no_triton():
    code = (
        "import sys, peer_ll.kernels.product_topk, peer_ll.kernels.expert_mix, "
        "peer_ll.kernels.selected_scores, peer_ll.experts; "
        "print('triton' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
