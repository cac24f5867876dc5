"""A failed call on a PEER layer raises a clear error and changes nothing."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer, migrate_state

BAD_OWNERS = [
    ([], ValueError, "owners must be among"),
    (5, ValueError, "owners must be among"),
    (-1, ValueError, "owners must be an int >= 0"),
    ("bogus", TypeError, "owners must be None, an int"),
    (1.5, TypeError, "owners must be None, an int"),
    (True, TypeError, "owners must be an int"),
    ([0, "a"], TypeError, "owners must be an int"),
    (torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]), TypeError, "integer tensor"),
    (torch.ones(6, dtype=torch.bool), TypeError, "integer tensor"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"shape \(6,\)"),
    (torch.zeros(6, 1, dtype=torch.long), ValueError, r"shape \(6,\)"),
    (torch.tensor(-2), ValueError, "owners must be an int >= 0"),
    (torch.tensor([0, 0, 0, 9, 0, 0]), ValueError, "owners must be among"),
]


@pytest.mark.parametrize("owners,error,message", BAD_OWNERS)
def test_failed_forward_changes_nothing(layer, hashed, owners, error, message):
    before = hashed(layer)
    with pytest.raises(error, match=message):
        layer(torch.randn(6, 8), owners=owners)
    assert hashed(layer) == before


def test_owner_with_too_few_experts_changes_nothing(hashed):
    layer = PEER(8, num_keys=4, heads=2, topk=8, dim_key=8)
    layer.grow(2, owner=1)  # owner 1 holds 4 experts < topk 8
    before = hashed(layer.train())
    with pytest.raises(ValueError, match="owners must hold at least topk=8 experts"):
        layer(torch.randn(6, 8), owners=1)
    with pytest.raises(ValueError, match="owners must hold at least topk=8"):
        layer(torch.randn(6, 8), owners=torch.tensor([0, 1, 0, 0, 0, 0]))
    assert hashed(layer) == before


@pytest.mark.parametrize(
    "x,error",
    [
        (torch.randn(6, 7), ValueError),
        (torch.randn(()), ValueError),
        (torch.ones(6, 8, dtype=torch.long), TypeError),
        ([[0.0] * 8], TypeError),
    ],
)
def test_bad_inputs_change_nothing(layer, hashed, x, error):
    before = hashed(layer)
    with pytest.raises(error, match="x must"):
        layer(x)
    assert hashed(layer) == before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype_is_cast_to_the_layer_dtype(layer, dtype):
    x = torch.randn(6, 8)
    layer.eval()
    expected = layer(x.to(dtype).float())
    out = layer(x.to(dtype))
    assert out.dtype == torch.float32 and out.shape == (6, 8)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8)])
def test_empty_batch_gives_empty_output(layer, hashed, shape):
    before = hashed(layer)
    out = layer(torch.randn(*shape), owners=1)
    assert out.shape == (*shape[:-1], 8)
    assert layer.query(torch.randn(*shape)).shape == (*shape[:-1], 2, 8)
    assert hashed(layer) == before  # nothing was routed, no statistics moved


def test_huge_grow_is_refused_before_allocating(layer, hashed):
    before = hashed(layer)
    with pytest.raises(ValueError, match="grow .* must fit in the .* GiB of cpu memory"):
        layer.grow(10**7, owner=2)
    with pytest.raises(ValueError, match="reserve .* must fit"):
        layer.reserve(10**14)
    assert hashed(layer) == before


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda m: m.grow(0, owner=2), ValueError, "num_keys must be an int >= 1"),
        (lambda m: m.grow(2, owner=-1), ValueError, "owner must be an int >= 0"),
        (lambda m: m.grow(2.0, owner=2), TypeError, "num_keys must be an int"),
        (lambda m: m.grow(2, owner=2, num_keys_right=0), ValueError, "num_keys_right"),
        (lambda m: m.freeze([7]), ValueError, "owners must be among"),
        (lambda m: m.freeze("x"), TypeError, "owners must be an int"),
        (lambda m: m.freeze([0, -1]), ValueError, "owners must be an int >= 0"),
        (lambda m: m.unfreeze(3), ValueError, "owners must be among"),
        (lambda m: m.retrieve(torch.randn(6, 8), k=21), ValueError, "k must be <= the 20 experts"),
        (lambda m: m.retrieve(torch.randn(6, 8), owners=1, k=5), ValueError, "at least topk=5"),
        (lambda m: m.retrieve(torch.randn(6, 8), k=0), ValueError, "k must be an int >= 1"),
    ],
)
def test_failed_calls_change_nothing(layer, hashed, call, error, message):
    before = hashed(layer)
    with pytest.raises(error, match=message):
        call(layer)
    assert hashed(layer) == before


def test_retrieve_pads_only_when_asked(layer):
    scores, ids = layer.retrieve(torch.randn(6, 8), k=20)
    assert ids.min() >= 0 and torch.isfinite(scores).all()
    scores, ids = layer.retrieve(torch.randn(6, 8), owners=1, k=6, pad=True)
    assert (ids[..., 4:] == -1).all() and torch.isinf(scores[..., 4:]).all()


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(betas=(0.9, 1.0)), ValueError, "betas"),
        (dict(betas=(float("nan"), 0.9)), ValueError, "betas"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(expert_state_dtype=torch.int8), TypeError, "expert_state_dtype"),
    ],
)
def test_make_optimizer_refuses_bad_hyperparameters(layer, kwargs, error, name):
    with pytest.raises(error, match=name):
        make_optimizer(layer, **kwargs)


def _train_step(layer, opt):
    opt.zero_grad()
    layer(torch.randn(6, 8)).square().mean().backward()
    opt.step()


def test_step_after_growth_past_capacity_without_migrate_state_is_refused(layer, hashed):
    opt = make_optimizer(layer)
    _train_step(layer, opt)
    layer.grow(8, owner=2)  # past capacity: the tables are replaced
    opt.zero_grad()
    layer(torch.randn(6, 8)).square().mean().backward()
    before = hashed(layer, opt)
    with pytest.raises(ValueError, match=r"optimizer must hold .*migrate_state"):
        opt.step()
    assert hashed(layer, opt) == before
    migrate_state(opt, layer)
    old = layer.down.detach().clone()
    opt.step()
    assert not torch.equal(layer.down.detach(), old)  # the new tables train


def test_migrate_state_keeps_the_moments_dtype(layer):
    opt = make_optimizer(layer, expert_state_dtype=torch.bfloat16)
    _train_step(layer, opt)
    layer.grow(8, owner=2)
    migrate_state(opt, layer)
    state = opt.state[layer.pool.down]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["exp_avg"].shape == layer.pool.down.shape


def test_migrate_state_refuses_a_non_layer_and_changes_nothing(layer, hashed):
    opt = make_optimizer(layer)
    _train_step(layer, opt)
    before = hashed(layer, opt)
    with pytest.raises(TypeError, match="layer must be a PEER layer, got Linear"):
        migrate_state(opt, torch.nn.Linear(2, 2))
    assert hashed(layer, opt) == before


def test_freeze_flags_must_be_bools(layer, hashed):
    before = hashed(layer)
    with pytest.raises(TypeError, match="keys must be a bool, got str 'y'"):
        layer.freeze(0, keys="y")
    with pytest.raises(TypeError, match="query must be a bool"):
        layer.unfreeze(0, query=1)
    assert hashed(layer) == before


def test_migrate_state_refuses_a_non_optimizer(layer):
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        migrate_state("adam", layer)
