"""The PEER layer as the paper defines it: retrieval, gates, experts, shapes, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from peer_ll.experts import PEER, expert_usage, unevenness


def small(**kw):
    cfg = dict(num_keys=6, heads=3, topk=5, dim_key=8)
    cfg.update(kw)
    return PEER(24, **cfg)


def brute_force_topk(layer, x, owners=None):
    """Exhaustive top-k over every expert's full key [c; c']."""
    q = layer.query(x)  # (T, H, d)
    scores = q @ layer.expert_keys().T  # (T, H, N)
    if owners is not None:
        allowed = torch.isin(layer.owners, torch.tensor(owners))
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores.topk(layer.topk, dim=-1)


def test_forward_shape_and_dim_out():
    layer = small(dim_out=7)
    x = torch.randn(2, 5, 24)
    assert layer(x).shape == (2, 5, 7)


def test_retrieval_matches_brute_force_over_several_segments():
    layer = small(capacity=200)
    layer.grow(3, owner=1)
    layer.grow(2, owner=2)  # 4 experts: a segment smaller than k = 5
    layer.grow(1, owner=3, num_keys_right=4)  # a 1 x 4 segment
    layer.eval()
    x = torch.randn(37, 24)
    scores, ids = layer.retrieve(x)
    ref_scores, ref_ids = brute_force_topk(layer, x)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)


def test_retrieval_restricted_to_owners_matches_brute_force():
    layer = small(capacity=200)
    layer.grow(3, owner=1)
    layer.grow(4, owner=2)
    layer.eval()
    x = torch.randn(19, 24)
    scores, ids = layer.retrieve(x, owners=[1, 2])
    ref_scores, ref_ids = brute_force_topk(layer, x, owners=[1, 2])
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert bool((layer.owners[ids] >= 1).all())


def test_per_input_owners_restrict_each_token():
    layer = small(capacity=200)
    layer.grow(3, owner=1)
    layer.eval()
    x = torch.randn(10, 24)
    per_input = torch.tensor([0, 1] * 5)
    _, ids = layer.retrieve(x, owners=per_input)
    assert torch.equal(layer.owners[ids], per_input[:, None, None].expand_as(ids))


def test_output_is_gated_sum_of_singleton_experts():
    """f(x) = Σ_heads Σ_i softmax(scores)_i · gelu(u_iᵀx) · v_i, no biases."""
    layer = small()
    layer.eval()
    x = torch.randn(11, 24)
    scores, ids = layer.retrieve(x)
    down, up = layer.expert_weights()
    gates = scores.softmax(-1)  # (T, H, K)
    act = F.gelu(torch.einsum("td,thkd->thk", x, down[ids]))
    expected = torch.einsum("thk,thke->te", gates * act, up[ids])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,activation", [("sigmoid", "relu"), ("softmax", "relu")])
def test_gate_and_activation_options(gate, activation):
    layer = small(gate=gate, activation=activation, query_norm=None)
    x = torch.randn(9, 24)
    scores, ids = layer.retrieve(x)
    down, up = layer.expert_weights()
    gates = scores.sigmoid() if gate == "sigmoid" else scores.softmax(-1)
    act = F.relu(torch.einsum("td,thkd->thk", x, down[ids]))
    expected = torch.einsum("thk,thke->te", gates * act, up[ids])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_queries_do_not_mix_positions():
    layer = small(query_norm="layer")
    x = torch.randn(8, 24)
    alone = layer(x[:1])
    together = layer(x)
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-6)


def test_batch_norm_is_the_default_query_norm():
    layer = small()
    assert isinstance(layer.query_norm, torch.nn.BatchNorm1d)
    layer.train()
    q = layer.query(torch.randn(64, 24) * 5 + 3).reshape(64, -1)
    torch.testing.assert_close(q.mean(0), torch.zeros(q.shape[1]), atol=1e-4, rtol=0)


def test_gradients_reach_query_keys_and_retrieved_rows_only():
    layer = small()
    x = torch.randn(13, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.to_query.weight.grad.abs().sum() > 0
    assert layer.sub_keys.grad.abs().sum() > 0
    grad = layer.down.grad
    assert grad.is_sparse
    _, ids = layer.retrieve(x.detach())
    assert set(grad.coalesce().indices()[0].tolist()) <= set(ids.flatten().tolist())


def test_sparse_and_dense_gradients_agree():
    x = torch.randn(17, 24)
    grads = []
    for sparse in (True, False):
        torch.manual_seed(1)
        layer = small()
        layer.sparse_grad = sparse
        layer(x).square().sum().backward()
        g = layer.down.grad
        grads.append(g.to_dense() if g.is_sparse else g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_routing_statistics():
    layer = small()
    layer.eval()
    x = torch.randn(40, 24)
    layer.reset_routing_stats()
    layer(x)
    mass = layer.expert_mass
    # softmax gates sum to 1 per token and head
    assert math.isclose(float(mass.sum()), 40 * 3, rel_tol=1e-5)
    stats = layer.routing_stats()
    assert stats["usage"] == pytest.approx(float((mass > 0).float().mean()))
    z = mass / mass.sum()
    nz = z[z > 0]
    assert stats["unevenness"] == pytest.approx(
        math.log(mass.numel()) + float((nz * nz.log()).sum()), rel=1e-5
    )
    conf = layer.retrieval_confidence(x)
    scores, _ = layer.retrieve(x, k=layer.topk + 1)
    torch.testing.assert_close(conf["margin"], scores[..., -2] - scores[..., -1])
    assert conf["gate_entropy"].shape == (40, 3)
    assert bool((conf["gate_entropy"] <= math.log(layer.topk) + 1e-5).all())
    layer.reset_routing_stats()
    assert float(layer.expert_mass.sum()) == 0.0


def test_usage_and_unevenness_extremes():
    assert expert_usage(torch.tensor([1.0, 0.0, 0.0, 0.0])) == 0.25
    assert unevenness(torch.ones(8)) == pytest.approx(0.0, abs=1e-12)
    assert unevenness(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(math.log(4))


def test_introspection_shapes():
    layer = small(dim_out=10)
    layer.grow(2, owner=4)
    n = 36 + 4
    assert layer.num_experts == n
    assert layer.expert_keys().shape == (n, 8)
    down, up = layer.expert_weights()
    assert down.shape == (n, 24) and up.shape == (n, 10)
    assert layer.owners.dtype == torch.long and layer.owners.tolist() == [0] * 36 + [4] * 4
    assert layer.query(torch.randn(2, 3, 24)).shape == (2, 3, 3, 8)
    scores, ids = layer.retrieve(torch.randn(2, 3, 24))
    assert scores.shape == ids.shape == (2, 3, 3, 5)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(num_keys=0), ValueError, ["num_keys", ">= 1", "0"]),
        (dict(dim_key=7), ValueError, ["dim_key", "even", "7"]),
        (dict(topk=37), ValueError, ["topk", "36", "37"]),
        (dict(owner="a"), TypeError, ["owner", "int", "str"]),
        (dict(query_norm="group"), ValueError, ["query_norm", "group"]),
        (dict(num_keys=2.0), TypeError, ["num_keys", "int", "float"]),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        small(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_inputs():
    layer = small()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 24\), got \(3, 23\)"):
        layer(torch.randn(3, 23))
    with pytest.raises(TypeError, match="floating dtype, got torch.int64"):
        layer(torch.ones(3, 24, dtype=torch.long))
    with pytest.raises(ValueError, match=r"owners must be among \[0\], got \[7\]"):
        layer(torch.randn(3, 24), owners=7)
    with pytest.raises(TypeError, match="owners must be an int >= 0, got str 'x'"):
        layer(torch.randn(3, 24), owners=["x"])
    with pytest.raises(TypeError, match="owners must be None, an int, a sequence"):
        layer(torch.randn(3, 24), owners="infer")
    layer.grow(2, owner=1)
    needed = "owners must hold at least topk=5 experts, got owners 1 holding 4"
    with pytest.raises(ValueError, match=needed):
        layer(torch.randn(3, 24), owners=1)
