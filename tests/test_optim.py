"""The sparse optimizer: lazy Adam on retrieved rows, AdamW on dense parameters."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.kernels.lazy_adamw import native_available
from peer_ll.optim import SparseAdamW, make_optimizer, migrate_state


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def test_dense_parameters_follow_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = SparseAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 5)
    for _ in range(4):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_only_retrieved_rows_change():
    layer = PEER(16, num_keys=8, heads=2, topk=4, dim_key=8)
    opt = make_optimizer(layer, lr=1e-2, weight_decay=0.1)
    before = layer.down.detach().clone()
    x = torch.randn(3, 16)
    _, ids = layer.retrieve(x)
    opt.zero_grad()
    layer(x).square().sum().backward()
    opt.step()
    changed = (layer.down.detach() != before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(ids.flatten().tolist())
    assert changed.numel() > 0


def test_sparse_rows_match_dense_adam_on_those_rows():
    """Lazy Adam equals Adam for rows touched on every step."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(6, 3))
    ref = torch.nn.Parameter(table.detach().clone())
    ours = SparseAdamW([table], lr=1e-2)
    dense = torch.optim.Adam([ref], lr=1e-2)
    rows = torch.tensor([1, 4])
    for _ in range(3):
        g = torch.randn(2, 3)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (6, 3)).coalesce()
        full = torch.zeros(6, 3)
        full[rows] = g
        ref.grad = full
        ours.step()
        dense.step()
    torch.testing.assert_close(table[rows], ref[rows])
    untouched = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(table[untouched], ref[untouched])  # Adam: zero grad, zero step


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"lr must be a float >= 0.0, got -1.0"):
        SparseAdamW(p, lr=-1)
    with pytest.raises(ValueError, match="weight_decay must be a float >= 0.0"):
        SparseAdamW(p, weight_decay=-0.1)


def test_migrate_state_needs_a_peer_layer():
    opt = SparseAdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="layer must be a PEER layer, got Linear"):
        migrate_state(opt, torch.nn.Linear(2, 2))


def test_bf16_expert_state_halves_moment_memory_and_still_trains():
    layer = PEER(16, num_keys=8, heads=2, topk=4, dim_key=8)
    opt = make_optimizer(layer, lr=1e-2, expert_state_dtype=torch.bfloat16)
    x = torch.randn(32, 16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = layer(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[layer.down]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[layer.to_query.weight]["exp_avg"].dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]


def test_uncoalesced_sparse_gradient_with_repeated_rows_is_summed():
    table = torch.nn.Parameter(torch.zeros(4, 2))
    opt = SparseAdamW([table], lr=0.1)
    grad = torch.sparse_coo_tensor(torch.tensor([[2, 2]]), torch.ones(2, 2), (4, 2))
    table.grad = grad
    opt.step()
    assert torch.equal(opt.state[table]["exp_avg"][2], torch.full((2,), 0.1 * 2.0))
    assert float(table[[0, 1, 3]].abs().sum()) == 0.0


def _train_with_growth(backend, moments):
    """Train a 2-segment layer with segment 0 frozen, grow past capacity, train on."""
    torch.manual_seed(0)
    layer = PEER(16, num_keys=8, heads=2, topk=4, dim_key=8, capacity=64)
    layer.grow(5, owner=1)  # past capacity: the tables are reallocated
    layer.freeze(0)
    opt = make_optimizer(
        layer, lr=1e-2, weight_decay=0.1, expert_state_dtype=moments, backend=backend
    )
    frozen_rows = layer.down.detach()[:64].clone()
    x = torch.randn(24, 16)
    for step in range(6):
        if step == 3:
            layer.grow(3, owner=2)  # past capacity again, with optimizer state to carry
            migrate_state(opt, layer)
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert torch.equal(layer.down.detach()[:64], frozen_rows)  # frozen rows: bit for bit
    return layer, opt


@pytest.mark.skipif(not native_available(), reason="no C compiler here")
@pytest.mark.parametrize("moments, tol", [(None, 1e-6), (torch.bfloat16, 1e-2)])
def test_in_place_kernel_matches_gather_scatter_path(moments, tol):
    """The C kernel against the torch path (gather, fused AdamW, scatter) on a whole layer.

    Tolerances: see tests/kernels/test_lazy_adamw.py (one fp32 rounding per step apart;
    bf16 moments flip a few roundings).
    """
    new, new_opt = _train_with_growth("native", moments)
    old, old_opt = _train_with_growth("torch", moments)
    for name in ("down", "up", "sub_keys"):
        a, b = getattr(new, name), getattr(old, name)
        assert rel_rms(a, b) <= tol, name
        sa, sb = new_opt.state[a], old_opt.state[b]
        assert sa["exp_avg"].dtype == (moments or torch.float32)
        assert rel_rms(sa["exp_avg"].float(), sb["exp_avg"].float()) <= tol, name
        assert int(sa["step"]) == int(sb["step"]) == 6


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of .* got 'gpu'"):
        SparseAdamW([torch.nn.Parameter(torch.zeros(2))], backend="gpu")
