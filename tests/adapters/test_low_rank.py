"""Per-domain low-rank deltas on the attention projections (ExpertsConfig.adapter_rank)."""

import json

import pytest
import torch
from adapter_training import ADAPTED, train, two_domains
from hf_tiny import BUILDERS

from peer_ll.adapters import (
    ADAPTER_FILE,
    ExpertBranch,
    ExpertsConfig,
    ExpertsModel,
    add_experts,
)
from peer_ll.experts import PerOwner
from peer_ll.models.transformer import LowRankDelta


def test_deltas_sit_on_attention_and_keep_the_base_route_bit_identical(base, tokens):
    ref = base(tokens).logits
    model = two_domains(base, tokens, ADAPTED)
    names = sorted(model.low_rank())
    assert names and all(".attn." in n or ".self_attn." in n for n in names)
    assert not any(".mlp." in n for n in names)  # the MLP is wrapped by the experts' branch
    assert torch.equal(model(tokens, owners=0).logits, ref)
    assert model.low_rank()[names[0]].owners == [1, 2]
    assert all(isinstance(d.experts, PerOwner) for d in model.low_rank().values())
    deltas = [d.experts.copies["1"].up for d in model.low_rank().values()]
    assert any(bool(u.abs().sum() > 0) for u in deltas)  # domain 1's deltas trained


def test_only_the_newest_domains_delta_trains(tokens):
    from hf_tiny import tiny_gpt2

    model = add_experts(tiny_gpt2(), ADAPTED, num_keys=3, owner=1)
    train(model, tokens, 1)
    one = {n: d.experts.copies["1"] for n, d in model.low_rank().items()}
    before = {n: (d.down.clone(), d.up.clone()) for n, d in one.items()}
    add_experts(model, num_keys=3, owner=2)
    train(model, tokens, 2)
    for name, branch in model.low_rank().items():
        old, new = branch.experts.copies["1"], branch.experts.copies["2"]
        assert isinstance(new, LowRankDelta) and old is one[name]
        assert torch.equal(old.down, before[name][0])
        assert torch.equal(old.up, before[name][1])
        assert new.up.requires_grad and not old.up.requires_grad
        assert bool(new.up.abs().sum() > 0)
        assert not torch.equal(new.down, old.down)  # a fresh random down, not a copy
    counts = model.parameter_counts()
    rank, dim = ADAPTED.adapter_rank, 24
    c_attn, c_proj = rank * (dim + 3 * dim), rank * (dim + dim)
    assert counts["trainable"] == 2 * (9 * 2 * dim + 3 * 8) + 2 * (c_attn + c_proj)


def test_per_input_owners_apply_each_inputs_delta(tokens):
    from hf_tiny import tiny_llama

    model = two_domains(tiny_llama(), tokens, ADAPTED)
    owners = torch.tensor([2, 0, 1])
    mixed = model(tokens, owners=owners).logits
    for b, o in enumerate(owners.tolist()):
        torch.testing.assert_close(
            mixed[b], model(tokens, owners=o).logits[b], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_deltas_save_and_reload_identical(arch, tokens, tmp_path):
    torch.manual_seed(0)
    base = BUILDERS[arch]()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = two_domains(base, tokens, ADAPTED)
    expected = {o: model(tokens, owners=o).logits for o in model.owners}
    model.save_pretrained(tmp_path)
    fresh = BUILDERS[arch]()
    fresh.load_state_dict(state)
    loaded = ExpertsModel.from_pretrained(fresh, tmp_path)
    assert sorted(loaded.low_rank()) == sorted(model.low_rank())
    for o, logits in expected.items():
        assert torch.equal(loaded(tokens, owners=o).logits, logits), o


def test_adapter_modules_must_match(tokens):
    from hf_tiny import tiny_gpt2

    gpt2 = tiny_gpt2()
    config = ExpertsConfig(heads=2, topk=3, dim_key=8, adapter_rank=2, adapter_modules=["nope"])
    with pytest.raises(ValueError, match="adapter_modules"):
        add_experts(gpt2, config, num_keys=3, owner=1)
    assert not any(isinstance(m, ExpertBranch | LowRankDelta) for m in gpt2.modules())
    with pytest.raises(ValueError, match="adapter_rank"):
        ExpertsConfig(adapter_rank=-1)


def test_files_of_the_first_format_raise_a_clear_error(tokens, tmp_path):
    from hf_tiny import tiny_gpt2
    from safetensors.torch import save_file

    model = add_experts(tiny_gpt2(), ADAPTED, num_keys=3, owner=1)
    model.save_pretrained(tmp_path)
    from peer_ll.adapters.checkpoint import read_adapter

    metadata, tensors = read_adapter(tmp_path)
    metadata = {**metadata, "config": json.dumps(metadata["config"])}
    save_file(
        tensors, tmp_path / ADAPTER_FILE, metadata={**metadata, "format": "peer_ll.adapters/1"}
    )
    fresh = tiny_gpt2()
    with pytest.raises(ValueError, match="peer_ll.adapters/1 cannot be read"):
        ExpertsModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, ExpertBranch) for m in fresh.modules())


def test_a_delta_branch_routes_each_input_to_its_owners_delta():
    from peer_ll.adapters.targets import low_rank_deltas

    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    branch = ExpertBranch(proj, low_rank_deltas(6, 4, 2, owner=1, like=proj))
    branch.experts.add_owner(2)
    for copy in branch.experts.copies.values():
        torch.nn.init.normal_(copy.up)  # non-zero deltas
    x = torch.randn(3, 5, 6)
    d1, d2 = (branch.experts.copies[o](x) for o in ("1", "2"))
    assert torch.equal(branch(x), proj(x))  # no owners: no delta
    assert torch.equal(branch(x, owners=0), proj(x))  # the base owner: none either
    torch.testing.assert_close(branch(x, owners=[1, 2, 2]), proj(x) + d1 + d2)
    mixed = branch(x, owners=torch.tensor([2, 0, 1]))
    torch.testing.assert_close(
        mixed, torch.stack([proj(x[0]) + d2[0], proj(x[1]), proj(x[2]) + d1[2]])
    )
    with pytest.raises(ValueError, match="owners must be among"):
        branch(x, owners=3)
    with pytest.raises(TypeError, match="experts must be a PEER layer or a PerOwner"):
        ExpertBranch(proj, torch.nn.Linear(6, 4))
