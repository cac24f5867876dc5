"""Adapter-only checkpoints: safetensors + JSON metadata; identical reloads, new process too."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adapter_training import two_domains
from hf_tiny import BUILDERS, tiny_gpt2
from safetensors import safe_open

from peer_ll.adapters import ADAPTER_FILE, ExpertBranch, ExpertsModel


def _all_routes(model, tokens):
    out = {o: model(tokens, owners=o).logits for o in model.owners}
    out["infer"] = model(input_ids=tokens, owners="infer").logits
    return out


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_saves_only_the_experts_and_reloads_identical(arch, tokens, tmp_path):
    torch.manual_seed(0)
    base = BUILDERS[arch]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = two_domains(base, tokens)
    expected = _all_routes(model, tokens)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(".experts." in k for k in keys)  # nothing of the base model
    assert json.loads(meta["config"])["domains"] == [[1, 3], [2, 3]]
    fresh = BUILDERS[arch]()
    fresh.load_state_dict(base_state)
    loaded = ExpertsModel.from_pretrained(fresh, tmp_path)
    assert loaded.owners == [0, 1, 2]
    for route, logits in _all_routes(loaded, tokens).items():
        assert torch.equal(logits, expected[route]), route
    assert loaded.parameter_counts()["trainable"] == 0


def test_trainable_reload_trains_the_newest_domain_only(tokens, tmp_path):
    model = two_domains(tiny_gpt2(), tokens)
    model.save_pretrained(tmp_path)
    loaded = ExpertsModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    for branch in loaded.branches().values():
        layer = branch.experts
        assert torch.equal(layer.frozen, layer.owners != 2)
        assert not any(p.requires_grad for p in layer.to_query.parameters())


def test_bad_checkpoints_raise_and_leave_the_model_unchanged(tokens, tmp_path):
    model = two_domains(tiny_gpt2(), tokens)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="directory"):
        ExpertsModel.from_pretrained(tiny_gpt2(), tmp_path / "missing")
    from hf_tiny import tiny_llama

    llama = tiny_llama()
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ExpertsModel.from_pretrained(llama, tmp_path)
    assert not any(isinstance(m, ExpertBranch) for m in llama.modules())
    gpt2 = tiny_gpt2()
    gpt2.transformer.h = gpt2.transformer.h[:1]  # one block fewer than saved
    with pytest.raises(ValueError, match="targets"):
        ExpertsModel.from_pretrained(gpt2, tmp_path)
    assert not any(isinstance(m, ExpertBranch) for m in gpt2.modules())


RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import GPT2LMHeadModel
    from peer_ll.adapters import ExpertsModel
    folder = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]))  # the parent's: same reduction order
    base = GPT2LMHeadModel.from_pretrained(folder + "/base").eval()
    model = ExpertsModel.from_pretrained(base, folder + "/experts")
    tokens = torch.load(folder + "/tokens.pt")
    out = {str(o): model(tokens, owners=o).logits for o in model.owners}
    out["infer"] = model(input_ids=tokens, owners="infer").logits
    torch.save(out, folder + "/reloaded.pt")
    """
)


def test_reload_in_a_new_process_is_identical(tokens, tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")  # a local folder: no hub
    model = two_domains(base, tokens)
    model.save_pretrained(tmp_path / "experts")
    torch.save(tokens, tmp_path / "tokens.pt")
    expected = {str(k): v for k, v in _all_routes(model, tokens).items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path), str(torch.get_num_threads())],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    reloaded = torch.load(tmp_path / "reloaded.pt")
    assert reloaded.keys() == expected.keys()
    for route, logits in expected.items():
        assert torch.equal(reloaded[route], logits), route
