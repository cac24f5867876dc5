"""Triton expert_mix against the torch reference: output and every gradient."""

import pytest
import torch
from kernel_cases import mix_case, rel_rms

from peer_ll.kernels import reference
from peer_ll.kernels.expert_mix import expert_mix

# fp32 on both sides; the kernels accumulate in fp32 in a different order (tiles of
# 32 rows × 128 columns vs bmm / embedding_bag): relative RMS ≲ 1e-6. 1e-5 leaves a
# 10x margin; one missing or extra expert term moves the result by ~1/sqrt(15).
TOL = 1e-5


def run(backend, case, dy, **kw):
    x, ids, gates, down, up = case
    out = expert_mix(x, ids, gates, down, up, backend=backend, **kw)
    return (out, *torch.autograd.grad(out, (x, gates, down, up), dy))


@pytest.mark.parametrize(
    ("activation", "sparse_grad", "deterministic"),
    [("gelu", True, True), ("relu", False, False), ("gelu", True, False)],
)
def test_forward_and_every_gradient(activation, sparse_grad, deterministic):
    case = mix_case()  # T = 37, H = 3, K = 5, D = 24, E = 20, N = 300
    frozen = torch.zeros(300, dtype=torch.bool)
    frozen[::3] = True
    dy = torch.randn(37, 20)
    kw = dict(activation=activation, frozen=frozen, sparse_grad=sparse_grad)
    got = run("triton", case, dy, deterministic=deterministic, **kw)
    want = run("torch", case, dy, **kw)
    for name, g, w in zip(["out", "x", "gates", "down", "up"], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_rms(g, w) <= TOL, name
    for table_grad in got[3:]:
        assert table_grad.is_sparse == sparse_grad
        if sparse_grad:
            assert table_grad.is_coalesced()
            assert not bool(frozen[table_grad.indices()[0]].any())
        else:
            assert float(table_grad[frozen].abs().max()) == 0.0


def test_sorted_row_sums_are_bitwise_reproducible():
    case, dy = mix_case(T=9), torch.randn(9, 20)
    first = run("triton", case, dy)[3]
    again = run("triton", case, dy)[3]
    assert torch.equal(first.values(), again.values())


def test_missing_ids_contribute_nothing():
    x, ids, gates, down, up = mix_case(T=5)
    holes = ids.clone()
    holes[:, :, -1] = -1  # "no expert" in the last place of every head
    got = expert_mix(x, holes, gates, down, up, backend="triton")
    want = reference.expert_mix(x, ids[..., :-1], gates[..., :-1], down, up)
    assert rel_rms(got, want) <= TOL


def test_rejects_mismatched_shapes():
    x, ids, gates, down, up = mix_case(T=3)
    with pytest.raises(ValueError, match="ids and gates"):
        expert_mix(x, ids, gates[:, :, :2], down, up)
    with pytest.raises(ValueError, match="activation"):
        expert_mix(x, ids, gates, down, up, activation="tanh")


@pytest.mark.gpu
def test_gpu_bf16_large():
    case = mix_case(T=2048, H=8, K=16, D=1024, E=1024, N=1 << 18, dtype=torch.bfloat16)
    case = tuple(t.detach().cuda().requires_grad_(t.dtype.is_floating_point) for t in case)
    dy = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    got = run("triton", case, dy)
    # Oracle: the same bf16 values in fp32 through the reference.
    ref_case = tuple(
        t.detach().float().requires_grad_() if t.is_floating_point() else t for t in case
    )
    want = run("torch", ref_case, dy.float())
    # bf16 outputs: 2^-9 relative rounding per value, plus bf16 storage of the
    # table gradients; 1e-2 relative RMS bounds both with margin.
    for name, g, w in zip(["out", "x", "gates", "down", "up"], got, want, strict=True):
        assert rel_rms(g.float(), w) <= 1e-2, name
