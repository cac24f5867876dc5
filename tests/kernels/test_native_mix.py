"""expert_mix with backend="native" (the C kernels) against the torch reference."""

import pytest
import torch
from kernel_cases import rel_rms

from peer_ll.kernels.expert_mix import expert_mix
from peer_ll.kernels.lazy_adamw import native_available

# Same fp32 products, summed in another order (8 partial sums per dot product):
# ≲ 1e-7 relative RMS measured; 1e-5 leaves a wide margin and fails on any wrong term.
TOL = 1e-5


@pytest.mark.skipif(not native_available(), reason="no C compiler here")
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_native_mix_matches_reference(activation):
    T, H, K, D, E, N = 37, 3, 5, 24, 20, 300
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.randint(0, N, (T, H, K))
    gates = torch.rand(T, H, K, requires_grad=True)
    down = torch.randn(N, D, requires_grad=True)
    up = torch.randn(N, E, requires_grad=True)
    frozen = torch.zeros(N, dtype=torch.bool)
    frozen[:50] = True
    weight = torch.linspace(-1, 1, E)
    results = []
    for backend in ("native", "torch"):
        for t in (x, gates, down, up):
            t.grad = None
        out = expert_mix(x, ids, gates, down, up, activation=activation, frozen=frozen,
                         backend=backend)
        (out * weight).sum().backward()
        results.append([out.detach(), x.grad, gates.grad, down.grad, up.grad])
    for name, got, want in zip(["out", "x", "gates", "down", "up"], *results, strict=True):
        assert rel_rms(got, want) <= TOL, name
    rows = results[0][3].coalesce().indices()[0]
    assert rows.numel() > 0 and not bool(frozen[rows].any())  # frozen rows: no gradient
