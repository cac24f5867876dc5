"""Triton selected_scores against the torch reference and a brute-force oracle."""

import pytest
import torch
from kernel_cases import rel_rms, retrieval_case

from peer_ll.kernels.selected_scores import selected_scores

# fp32 dot products of 12 terms per half, summed in another order: ≲ 1e-6 relative
# RMS; 1e-5 leaves a 10x margin, while one wrong key row moves a score by O(1).
TOL = 1e-5


def grads(backend, q, keys, left, right, frozen, dy):
    out = selected_scores(q, keys, left, right, frozen=frozen, backend=backend)
    return (out, *torch.autograd.grad(out, (q, keys), dy))


def test_forward_and_gradients_match_reference_and_brute_force():
    q, keys, _ = retrieval_case()  # 37 tokens, 3 heads, d = 24, 18 sub-key rows
    q.requires_grad_()
    keys.requires_grad_()
    left, right = torch.randint(0, 18, (2, 37, 3, 5))
    frozen = torch.zeros(18, dtype=torch.bool)
    frozen[13:] = True  # the 5×5 segment's rows
    dy = torch.randn(37, 3, 5)
    got = grads("triton", q, keys, left, right, frozen, dy)
    want = grads("torch", q, keys, left, right, frozen, dy)
    for name, g, w in zip(["scores", "q", "sub_keys"], got, want, strict=True):
        assert rel_rms(g, w) <= TOL, name
    assert float(got[2][13:].abs().max()) == 0.0
    # Brute force: all left and right half scores (T, H, R), gathered, by autograd.
    half_l = q[..., :12] @ keys[:, 0].T
    half_r = q[..., 12:] @ keys[:, 1].T
    brute = half_l.gather(-1, left) + half_r.gather(-1, right)
    g_q, g_keys = torch.autograd.grad(brute, (q, keys), dy)
    assert rel_rms(got[0], brute) <= TOL and rel_rms(got[1], g_q) <= TOL
    assert rel_rms(got[2][:13], g_keys[:13]) <= TOL


def test_rejects_mismatched_shapes():
    q, keys, _ = retrieval_case(T=2)
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left and right"):
        selected_scores(q, keys, ids, ids[:, :2])
    with pytest.raises(ValueError, match="sub_keys"):
        selected_scores(q, keys[..., :5], ids, ids)


@pytest.mark.gpu
def test_gpu_bf16_large():
    q, keys, _ = retrieval_case(T=4096, H=8, d=128, segments=[[0, 1024, 1024, 0]])
    q = q.cuda().bfloat16().requires_grad_()
    keys = keys.cuda().bfloat16().requires_grad_()
    left, right = torch.randint(0, 1024, (2, 4096, 8, 16), device="cuda")
    dy = torch.randn(4096, 8, 16, device="cuda", dtype=torch.bfloat16)
    got = grads("triton", q, keys, left, right, None, dy)
    qf, kf = q.detach().float().requires_grad_(), keys.detach().float().requires_grad_()
    want = grads("torch", qf, kf, left, right, None, dy.float())
    # bf16 outputs round each value to 2^-9 relative; 1e-2 relative RMS bounds it.
    for name, g, w in zip(["scores", "q", "sub_keys"], got, want, strict=True):
        assert rel_rms(g.float(), w) <= 1e-2, name
