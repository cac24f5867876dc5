"""The torch reference kernels against brute-force and autograd oracles (CPU, fp32)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    SEGMENTS,
    assert_no_ties,
    assert_same_topk,
    brute_force_topk,
    mix_case,
    rel_rms,
    retrieval_case,
)

from peer_ll.kernels import reference
from peer_ll.kernels.row_grad import row_plan, row_sparse_grad

# fp32 results that differ only in the order of summation over <= 256 terms agree to
# about sqrt(256)·2^-24 ≈ 1e-6 relative RMS; 1e-5 leaves a 10x margin and still
# catches any wrong term (which moves the result by ~1/sqrt(#terms) >> 1e-5).
TOL = 1e-5


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_product_topk_is_exact_over_segments(k):
    q, keys, segs = retrieval_case()
    expected = brute_force_topk(q, keys, segs, k)
    assert_no_ties(expected[0])
    assert_same_topk(reference.product_topk(q, keys, segs, k), expected, TOL)


def test_product_topk_segment_mask_and_small_pool():
    q, keys, segs = retrieval_case(segments=[[0, 3, 2, 0], [3, 2, 2, 6], [5, 4, 1, 10]])
    mask = torch.rand(37, 3) > 0.4
    k = 12  # the pool holds 14 experts; a token may be allowed fewer than k
    expected = brute_force_topk(q, keys, segs, k, segment_mask=mask)
    scores, ids = reference.product_topk(q, keys, segs, k, segment_mask=mask)
    assert_same_topk((scores, ids), expected, TOL)
    missing = scores == -math.inf
    assert missing.any() and bool((ids[missing] == -1).all())


def naive_mix(x, ids, gates, down, up, activation):
    """Autograd oracle: Σ g·σ(u·x)·v with dense gathers."""
    u, v = down[ids], up[ids]  # (T, H, K, D), (T, H, K, E)
    a = torch.einsum("thkd,td->thk", u, x)
    act = F.gelu(a) if activation == "gelu" else F.relu(a)
    return torch.einsum("thk,thke->te", act * gates, v)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_expert_mix_matches_autograd_oracle(activation):
    x, ids, gates, down, up = mix_case()
    frozen = torch.zeros(300, dtype=torch.bool)
    frozen[::4] = True
    dy = torch.randn(37, 20)
    out = reference.expert_mix(x, ids, gates, down, up, activation=activation, frozen=frozen)
    grads = torch.autograd.grad(out, (x, gates, down, up), dy)
    expected = naive_mix(x, ids, gates, down, up, activation)
    want = torch.autograd.grad(expected, (x, gates, down, up), dy)
    assert rel_rms(out, expected) <= TOL
    for got, ref in zip(grads[:2], want[:2], strict=True):
        assert rel_rms(got, ref) <= TOL
    for got, ref in zip(grads[2:], want[2:], strict=True):
        assert got.is_sparse and got.is_coalesced()
        ref = ref.masked_fill(frozen[:, None], 0.0)  # frozen rows get no gradient
        assert rel_rms(got, ref) <= TOL
        assert not bool(frozen[got.indices()[0]].any())


def test_row_plan_groups_places_and_drops_frozen_and_missing():
    ids = torch.tensor([[4, 1, -1], [1, 7, 4]])
    frozen = torch.zeros(8, dtype=torch.bool)
    frozen[7] = True
    plan = row_plan(ids, frozen)
    assert plan.rows.tolist() == [1, 4]
    assert plan.offsets.tolist() == [0, 2, 4]
    assert sorted(plan.order[:2].tolist()) == [1, 3] and sorted(plan.order[2:].tolist()) == [0, 5]
    grad = row_sparse_grad(ids.clamp(min=0), torch.ones(2, 3), torch.eye(2), (8, 2), frozen, False)
    assert grad[4].tolist() == [1.0, 1.0] and grad[7].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("path", ["sampled", "chunked"])
def test_gather_dot_agrees_with_one_gather(monkeypatch, path):
    ids = torch.randint(0, 50, (37, 15))
    ids[0, :2] = 7  # the same row twice for one token
    table, vec = torch.randn(50, 24), torch.randn(37, 24)
    expected = (table[ids] * vec[:, None]).sum(-1)
    if path == "chunked":  # the CUDA / non-fp32 path, with 4 tokens per chunk
        monkeypatch.setattr(reference, "_SAMPLED_DTYPES", ())
        monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 15 * 24 * 4)
    assert rel_rms(reference.gather_dot(ids, table, vec), expected) <= TOL


def test_selected_scores_gradient_matches_brute_force_scores():
    q, keys, segs = retrieval_case()
    q.requires_grad_()
    keys.requires_grad_()
    left = torch.randint(0, 18, (37, 3, 5))
    right = torch.randint(0, 18, (37, 3, 5))
    frozen = torch.zeros(18, dtype=torch.bool)
    frozen[13:] = True
    dy = torch.randn(37, 3, 5)
    got = reference.selected_scores(q, keys, left, right, frozen=frozen)
    g_q, g_keys = torch.autograd.grad(got, (q, keys), dy)
    # Brute force: every (left, right) pair's full score, then the selected ones.
    live = torch.where(frozen[:, None, None], keys.detach(), keys)
    left_all, right_all = q[..., :12] @ live[:, 0].T, q[..., 12:] @ live[:, 1].T  # (T, H, R)
    all_pairs = left_all[..., :, None] + right_all[..., None, :]
    expected = all_pairs.flatten(-2).gather(-1, left * 18 + right)
    w_q, w_keys = torch.autograd.grad(expected, (q, keys), dy)
    assert rel_rms(got, expected) <= TOL
    assert rel_rms(g_q, w_q) <= TOL and rel_rms(g_keys, w_keys) <= TOL
    assert float(g_keys[13:].abs().max()) == 0.0


def test_segments_constant_matches_case():
    assert retrieval_case()[2].tolist() == SEGMENTS


def test_gather_dot_with_more_ids_per_row_than_table_rows():
    """Heads of a tiny pool retrieve the same expert: M > N with repeated ids."""
    from peer_ll.kernels.reference import gather_dot

    ids = torch.tensor([[0, 0, 0, 0, 1], [1, 2, 3, 0, 0]])
    table, vec = torch.randn(4, 8), torch.randn(2, 8)
    expected = (table[ids] * vec[:, None]).sum(-1)
    torch.testing.assert_close(gather_dot(ids, table, vec), expected)
    from peer_ll.experts import PEER

    PEER(8, num_keys=2, heads=1, topk=4, dim_key=8)(torch.randn(3, 8)).sum().backward()
