"""lazy_adamw_: the in-place row update (C kernel, Triton in the interpreter) against torch's."""

import pytest
import torch
from kernel_cases import rel_rms

from peer_ll.kernels import lazy_adamw
from peer_ll.kernels.lazy_adamw import lazy_adamw_, native_available

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# The in-place kernels compute m as β1·m + (1-β1)·g, torch's fused AdamW as a lerp:
# the two differ by about one fp32 rounding (~6e-8 relative) per element and step;
# 1e-6 relative RMS over 3 steps leaves a 5x margin and fails on any wrong term.
FP32_TOL = 1e-6
# bf16 moments: a one-ulp difference before rounding flips some bf16 roundings
# (2^-8 relative each); a wrong formula is off by far more than 1e-2.
BF16_TOL = 1e-2

needs_native = pytest.mark.skipif(not native_available(), reason="no C compiler here")


def _tables(n=50, c=37, moments=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, c, generator=g)
    m = (0.1 * torch.randn(n, c, generator=g)).to(moments)
    v = (0.01 * torch.rand(n, c, generator=g)).to(moments)
    return p, m, v


def _run(backend, moments, *, grad_by_row=False, steps=3):
    p, m, v = _tables(moments=moments)
    rows = torch.tensor([0, 3, 4, 17, 30, 49])
    g = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        grad = torch.randn(p.shape if grad_by_row else (len(rows), p.shape[1]), generator=g)
        lazy_adamw_(p, m, v, grad, rows, step=t, grad_by_row=grad_by_row, backend=backend, **HYPER)
    return rows, (p, m, v)


@needs_native
@pytest.mark.parametrize("moments, tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("grad_by_row", [False, True])
def test_native_matches_torch_path(moments, tol, grad_by_row):
    rows, got = _run("native", moments, grad_by_row=grad_by_row)
    _, want = _run("torch", moments, grad_by_row=grad_by_row)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    before = _tables(moments=moments)
    for name, a, b, old in zip("pmv", got, want, before, strict=True):
        assert a.dtype == b.dtype == old.dtype
        assert rel_rms(a[rows].float(), b[rows].float()) <= tol, name
        assert torch.equal(a[untouched], old[untouched]), name  # bit for bit untouched
        assert not torch.equal(a[rows], old[rows]), name


@pytest.mark.parametrize("moments", [torch.float32])
def test_triton_matches_torch_path(moments):
    """The Triton kernel in the interpreter (fp32 only: its bf16 arithmetic is wrong)."""
    rows, got = _run("triton", moments, steps=2)
    _, want = _run("torch", moments, steps=2)
    for name, a, b in zip("pmv", got, want, strict=True):
        assert rel_rms(a[rows], b[rows]) <= FP32_TOL, name


@needs_native
def test_native_matches_float64_formula():
    """One step against the formula in the module docstring, evaluated in fp64."""
    p, m, v = _tables()
    rows = torch.tensor([2, 5, 11])
    grad = torch.randn(3, p.shape[1])
    P, M, V, G = (t.double().clone() for t in (p, m, v, grad))
    lazy_adamw_(p, m, v, grad, rows, step=4, backend="native", **HYPER)
    b1, b2, lr, wd = HYPER["beta1"], HYPER["beta2"], HYPER["lr"], HYPER["weight_decay"]
    m_r = b1 * M[rows] + (1 - b1) * G
    v_r = b2 * V[rows] + (1 - b2) * G * G
    denom = v_r.sqrt() / (1 - b2**4) ** 0.5 + HYPER["eps"]
    p_r = P[rows] * (1 - lr * wd) - lr / (1 - b1**4) * m_r / denom
    for a, want in ((p, p_r), (m, m_r), (v, v_r)):
        assert rel_rms(a[rows], want) <= FP32_TOL


def test_torch_path_chunks_cover_every_row(monkeypatch):
    """Chunking the gathers (one row per chunk here) changes nothing but roundings.

    torch's fused AdamW rounds its vector body and scalar tail differently, so the
    split of a chunk into vectors moves the last bit; hence FP32_TOL, not equality.
    """
    _, want = _run("torch", torch.float32)
    monkeypatch.setattr(lazy_adamw, "_CHUNK_BYTES", 1)
    _, got = _run("torch", torch.float32)
    for a, b in zip(got, want, strict=True):
        assert rel_rms(a, b) <= FP32_TOL


def test_bad_arguments_change_nothing():
    p, m, v = _tables()
    before = p.clone()
    rows = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        lazy_adamw_(p, m, v, torch.ones(2, 37), rows, step=1, backend="cuda", **HYPER)
    with pytest.raises(ValueError, match=r"grad \(R, C...\) must agree.*grad \(3, 37\)"):
        lazy_adamw_(p, m, v, torch.ones(3, 37), rows, step=1, **HYPER)
    with pytest.raises(RuntimeError, match="backend='native' needs contiguous fp32"):
        lazy_adamw_(
            p.double(),
            m.double(),
            v.double(),
            torch.ones(2, 37).double(),
            rows,
            step=1,
            backend="native",
            **HYPER,
        )
    assert torch.equal(p, before)


@pytest.mark.parametrize("env", [{"PEER_LL_NATIVE": "0"}, {"CC": "false"}])
def test_without_the_c_kernel_auto_falls_back_to_torch(monkeypatch, tmp_path, env):
    """No kernel (switched off, or a compiler that fails): "auto" runs the torch path."""
    from peer_ll.kernels import _native

    monkeypatch.setenv("PEER_LL_CACHE_DIR", str(tmp_path))  # no kernel built before
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _native.load.cache_clear()
    try:
        assert not native_available()
        _, got = _run("auto", torch.float32)
    finally:
        _native.load.cache_clear()
    _, want = _run("torch", torch.float32)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, moments",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_gpu_triton_matches_torch_path(dtype, moments):
    """Compiled Triton kernel on large tables, bf16 included (wrong in the interpreter)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, R = 100_003, 257, 20_000
    rows = torch.randperm(N, device="cuda", generator=g)[:R].sort().values
    tables = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        p = torch.randn(N, C, device="cuda").to(dtype)
        m = (0.1 * torch.randn(N, C, device="cuda")).to(moments)
        v = (0.01 * torch.rand(N, C, device="cuda")).to(moments)
        for t in (1, 2):
            grad = torch.randn(
                R, C, device="cuda", generator=torch.Generator(device="cuda").manual_seed(t)
            ).to(dtype)
            lazy_adamw_(p, m, v, grad, rows, step=t, backend=backend, **HYPER)
        tables.append((p, m, v))
    tol = FP32_TOL if dtype == moments == torch.float32 else BF16_TOL
    for name, a, b in zip("pmv", *tables, strict=True):
        assert rel_rms(a.float(), b.float()) <= tol, name
