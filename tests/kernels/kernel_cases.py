"""Shared inputs and checks for the kernel tests (imported by tests/kernels/test_*.py).

The default shapes are small and odd on purpose: 37 tokens, 3 heads, a 13 × 11
segment plus a 5 × 5 one, dim_key 24, D = 24, E = 20.
"""

from __future__ import annotations

import math

import torch

SEGMENTS = [[0, 13, 11, 0], [13, 5, 5, 143]]  # 13×11 then 5×5: 168 experts, 18 key rows


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over finite entries (dense, fp64)."""
    a, e = actual.detach().to_dense().double(), expected.detach().to_dense().double()
    fin = torch.isfinite(e)
    assert torch.equal(fin, torch.isfinite(a)), "the infinite entries differ"
    a, e = a[fin], e[fin]
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def retrieval_case(T=37, H=3, d=24, segments=SEGMENTS, *, seed=0, dtype=torch.float32):
    """(queries (T, H, d), sub_keys (R, 2, d/2), segments (S, 4)) with random normal entries."""
    g = torch.Generator().manual_seed(seed)
    segs = torch.tensor(segments, dtype=torch.int64)
    rows = int((segs[:, 0] + segs[:, 1:3].max(dim=1).values).max())
    q = torch.randn(T, H, d, generator=g).to(dtype)
    keys = torch.randn(rows, 2, d // 2, generator=g).to(dtype)
    return q, keys, segs


def full_keys(sub_keys: torch.Tensor, segments: torch.Tensor):
    """Every expert's full key [c_a; c'_b] (N, d) and its segment index (N,)."""
    keys, seg_of = [], []
    for s, (off, n_l, n_r, _) in enumerate(segments.tolist()):
        a = torch.arange(n_l).repeat_interleave(n_r)
        b = torch.arange(n_r).repeat(n_l)
        keys.append(torch.cat([sub_keys[off + a, 0], sub_keys[off + b, 1]], dim=-1))
        seg_of.append(torch.full((n_l * n_r,), s))
    return torch.cat(keys), torch.cat(seg_of)


def brute_force_topk(q, sub_keys, segments, k, segment_mask=None):
    """Exhaustive top-k over all full keys; ids are rows of the concatenated segments."""
    keys, seg_of = full_keys(sub_keys, segments)
    scores = q @ keys.T  # (T, H, N)
    if segment_mask is not None:
        scores = scores.masked_fill(~segment_mask[:, seg_of][:, None, :], -math.inf)
    if scores.shape[-1] < k:
        scores = torch.nn.functional.pad(scores, (0, k - scores.shape[-1]), value=-math.inf)
    top, ids = scores.topk(k, dim=-1)
    return top, ids.masked_fill(top == -math.inf, -1)


def assert_no_ties(scores: torch.Tensor, gap: float = 1e-5) -> None:
    """Inputs must be tie-free for ids to be well defined: adjacent finite scores differ.

    The scores of these cases stay below 32, where an fp32 ulp is <= 2^-19 ≈ 1.9e-6.
    Two summation orders of a 12-term dot product differ by a few ulps at most, so
    a gap of 1e-5 (about 5 ulps) cannot be reordered by rounding.
    """
    fin = torch.isfinite(scores[..., 1:]) & torch.isfinite(scores[..., :-1])
    gaps = (scores[..., :-1] - scores[..., 1:])[fin]
    assert float(scores[torch.isfinite(scores)].abs().max()) < 32
    assert gaps.numel() == 0 or float(gaps.min()) > gap, "near-ties in the test input"


def assert_same_topk(actual, expected, tol: float) -> None:
    """Sorted scores agree within ``tol`` (relative RMS) and every row has the same id set."""
    (s_a, i_a), (s_e, i_e) = actual, expected
    assert s_a.shape == s_e.shape and i_a.dtype == torch.int64
    assert rel_rms(s_a, s_e) <= tol
    assert torch.equal(i_a.sort(dim=-1).values, i_e.sort(dim=-1).values)


def mix_case(T=37, H=3, K=5, D=24, E=20, N=300, *, seed=0, dtype=torch.float32):
    """Inputs of expert_mix; ids repeat within and across tokens, as retrieval's do."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (T, H, K), generator=g)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    gates = torch.rand(T, H, K, generator=g).to(dtype).requires_grad_()
    down = (torch.randn(N, D, generator=g) / math.sqrt(D)).to(dtype).requires_grad_()
    up = torch.randn(N, E, generator=g).to(dtype).requires_grad_()
    return x, ids, gates, down, up
