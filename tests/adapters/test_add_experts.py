"""add_experts on tiny GPT-2 and Llama models: identity, freezing, routing, errors."""

import pytest
import torch
from adapter_training import SMALL, train, two_domains

from peer_ll.adapters import ExpertBranch, ExpertsConfig, ExpertsModel, add_experts


def test_targets_every_mlp_and_keeps_outputs_bit_identical_at_init(base, tokens):
    ref = base(tokens).logits
    model = add_experts(base, SMALL, num_keys=3, owner=1)
    assert sorted(model.branches()) == model.targets and len(model.targets) == 2
    assert all(name.endswith(".mlp") for name in model.targets)
    for owners in (None, 0, 1, [0, 1], torch.tensor([1, 0, 1])):
        assert torch.equal(model(tokens, owners=owners).logits, ref), owners


def test_base_domain_stays_bit_identical_after_training_two_domains(base, tokens):
    ref = base(tokens).logits
    model = two_domains(base, tokens)
    assert model.owners == [0, 1, 2]
    assert torch.equal(model(tokens, owners=0).logits, ref)
    assert not torch.allclose(model(tokens, owners=1).logits, ref)
    assert not torch.allclose(model(tokens, owners=2).logits, model(tokens, owners=1).logits)


def test_only_the_new_domain_trains(base, tokens):
    model = add_experts(base, SMALL, num_keys=3, owner=1)
    train(model, tokens, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_experts(model, num_keys=3, owner=2)
    train(model, tokens, 2)
    after = model.state_dict()
    changed = set()
    for name, old in before.items():
        new = after[name]
        if name.endswith((".down", ".up")):
            new = new[: old.shape[0]]
        elif name.endswith(".sub_keys"):
            new = new[: old.shape[0]]
        if old.shape == new.shape and not torch.equal(old, new):
            changed.add(name)
    # Owner 1's rows, the query networks and the whole base model are untouched;
    # only the bookkeeping buffers (frozen masks, the query network's frozen flag) changed.
    bookkeeping = ("expert_frozen", "key_frozen", "frozen_query")
    assert all(n.endswith(bookkeeping) for n in changed), changed
    for branch in model.branches().values():
        layer = branch.experts
        new_rows = layer.owners == 2
        assert bool(layer.frozen[~new_rows].all()) and not bool(layer.frozen[new_rows].any())
        assert not any(p.requires_grad for p in layer.to_query.parameters())
        assert not torch.equal(layer.up[: layer.num_experts][new_rows], torch.zeros(9, 24))
    base_params = [p for n, p in model.named_parameters() if ".experts." not in n]
    assert base_params and not any(p.requires_grad for p in base_params)


def test_per_input_owners_equal_the_per_owner_routes(base, tokens):
    model = two_domains(base, tokens)
    per_owner = {o: model(tokens, owners=o).logits for o in (0, 1, 2)}
    owners = torch.tensor([2, 0, 1])
    mixed = model(tokens, owners=owners).logits
    for b, o in enumerate(owners.tolist()):
        # Row subsets change the matmul blocking: equal to float rounding.
        torch.testing.assert_close(mixed[b], per_owner[o][b], rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed[1], per_owner[0][1])  # the base rows skip the experts exactly


def test_infer_mixes_by_a_causal_posterior(base, tokens):
    model = two_domains(base, tokens)
    post = model.domain_posterior(tokens)
    assert post.shape == (3, *tokens.shape)
    torch.testing.assert_close(post.sum(0), torch.ones(tokens.shape))
    torch.testing.assert_close(post[:, :, 0], torch.full((3, 3), 1 / 3))  # nothing seen yet
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % tokens.max()
    later = model.domain_posterior(changed)
    assert torch.equal(later[:, :, :8], post[:, :, :8])  # no future token leaks in
    out = model(input_ids=tokens, labels=tokens, owners="infer")
    assert out.logits.shape == (*tokens.shape, base.config.vocab_size)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(tokens.shape))
    best = min(model(input_ids=tokens, labels=tokens, owners=o).loss for o in (0, 1, 2))
    # Bayesian model averaging: at most log(O) nats per sequence above the best route.
    n_targets = tokens.shape[1] - 1
    assert out.loss <= best + torch.log(torch.tensor(3.0)) / n_targets + 1e-5


def test_owners_scope_routes_a_plain_torch_model_and_leaves_nothing_behind(tokens):
    torch_model = torch.nn.Sequential(
        torch.nn.Embedding(61, 16),
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)),
    )
    x = torch_model(tokens)
    base_count = sum(p.numel() for p in torch_model.parameters())
    model = add_experts(torch_model, SMALL, num_keys=3, owner=4, target_modules="1")
    assert isinstance(torch_model[1], ExpertBranch)
    with torch.no_grad():
        torch_model[1].experts.up.normal_()
    assert torch.equal(model(tokens, owners=0), x)
    assert not torch.allclose(model(tokens, owners=4), x)
    from peer_ll.adapters import scoped_owners

    assert scoped_owners() is None
    counts = model.parameter_counts()
    assert counts["total"] == base_count + counts["added"]
    assert model.unload() is torch_model and torch.equal(torch_model(tokens), x)


@pytest.mark.parametrize(
    ("owners", "error"),
    [
        (3, ValueError),
        ("all", ValueError),
        (torch.tensor([0.0, 1.0, 1.0]), TypeError),
        (torch.tensor([[0, 1]]), ValueError),
        (-1, ValueError),
        (torch.tensor([0, 1, 5]), ValueError),
    ],
)
def test_bad_owners_raise_naming_owners(base, tokens, owners, error):
    model = add_experts(base, SMALL, num_keys=3, owner=1)
    with pytest.raises(error, match="owners"):
        model(tokens, owners=owners)


def test_generate_routes_by_owners(base, tokens):
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    before = base.generate(tokens, **kwargs)
    model = two_domains(base, tokens)
    assert torch.equal(model.generate(tokens, owners=0, **kwargs), before)
    assert model.generate(tokens, owners=1, **kwargs).shape == before.shape


def test_a_branch_refuses_strings_naming_owners(base, tokens):
    model = add_experts(base, SMALL, num_keys=3, owner=1)
    with pytest.raises(TypeError, match="owners"):
        model.generate(tokens, owners="infer", max_new_tokens=1)
    branch = next(iter(model.branches().values()))
    with pytest.raises(TypeError, match="owners"):
        branch(torch.randn(2, 24), owners="1")


def test_bad_growth_raises_and_changes_nothing(base):
    with pytest.raises(ValueError, match="target_modules"):
        add_experts(base, SMALL, num_keys=3, owner=1, target_modules=["nothing_here"])
    assert not any(isinstance(m, ExpertBranch) for m in base.modules())
    with pytest.raises(ValueError, match="num_keys"):
        add_experts(base, SMALL, num_keys=1, owner=1)  # 1 expert < topk = 3
    assert not any(isinstance(m, ExpertBranch) for m in base.modules())
    model = add_experts(base, SMALL, num_keys=3, owner=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="owner"):
        add_experts(model, num_keys=3, owner=2)
    with pytest.raises(ValueError, match="config"):
        add_experts(model, SMALL, num_keys=3, owner=3)
    assert model.config.domains == [[2, 3]]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_parameter_counts_and_trainable_line(base):
    model = add_experts(base, ExpertsConfig(heads=2, topk=3, dim_key=8), num_keys=3, owner=1)
    counts = model.parameter_counts()
    width, layers = 24 + 24, 2
    query = 24 * 2 * 8 + 2 * 8  # to_query + LayerNorm(dim_key)
    per_layer = 9 * width + 3 * 8 + query
    assert counts["added"] == counts["trainable"] == layers * per_layer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] <= trainable  # spare capacity rows are not counted
    line = model.print_trainable_parameters()
    assert line.startswith(f"trainable params: {counts['trainable']:,} || all params: ")
    add_experts(model, num_keys=4, owner=2)
    assert model.parameter_counts()["trainable"] == layers * (16 * width + 4 * 8)


def test_gradient_checkpointing_is_refused(tokens):
    from hf_tiny import tiny_gpt2

    gpt2 = tiny_gpt2()
    model = add_experts(gpt2, SMALL, num_keys=3, owner=1)
    gpt2.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(tokens, labels=tokens, owners=1)
    assert isinstance(model, ExpertsModel)
