"""A whole PEER layer with backend="triton" (interpreter on CPU) against backend="torch"."""

import copy

import torch
from kernel_cases import rel_rms

from peer_ll.experts import PEER

# Retrieval is exact in both backends (tie-free random inputs), so both mix the same
# experts; what differs is fp32 summation order: ≲ 1e-6 relative RMS. 1e-5 = 10x margin.
TOL = 1e-5


def test_layer_forward_backward_agrees_across_backends():
    torch.manual_seed(0)
    layer = PEER(
        24,
        dim_out=20,
        num_keys=13,
        heads=3,
        topk=5,
        dim_key=24,
        query_norm="layer",
        backend="torch",
        capacity=13 * 13 + 25,
    )
    layer.grow(5, owner=1)  # a second, 5×5 segment
    layer.freeze(0)  # the first segment's rows and keys get no gradient
    twin = copy.deepcopy(layer)
    twin.backend = "triton"
    x = torch.randn(37, 24)
    results = []
    for net in (layer, twin):
        out = net(x)
        out.square().sum().backward()
        results.append(
            [out.detach(), net.down.grad, net.up.grad, net.sub_keys.grad, net.to_query.weight.grad]
        )
    names = ["out", "down", "up", "sub_keys", "to_query"]
    for name, got, want in zip(names, results[1], results[0], strict=True):
        assert rel_rms(got, want) <= TOL, name
    assert twin.down.grad.is_sparse
    assert not bool(twin.expert_frozen[twin.down.grad.coalesce().indices()[0]].any())
    assert float(twin.sub_keys.grad[:13].abs().max()) == 0.0  # frozen segment's keys
    assert torch.allclose(twin.router_mass, layer.router_mass, rtol=1e-5, atol=1e-6)
