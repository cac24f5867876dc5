"""PEERLM: shapes, causality, growth that keeps old domains exact, inference, save/load."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_lm import TINY

from peer_ll.cli.lm_train import perplexity, routing_shares, touched_entries, train_lm
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig


def _model(**kwargs) -> PEERLM:
    return PEERLM(LMConfig(**{**TINY, **kwargs}))


def _ids(*shape, low=0, high=256):
    return torch.randint(low, high, shape)


@pytest.fixture(scope="module")
def domains():
    """Small slices of two built-in domains: python source (A) and pydoc prose (B)."""
    from peer_ll.data.text import text_domain_stream

    stream = text_domain_stream(
        ("python-stdlib", "pydoc-topics"), block_size=32, max_bytes_per_domain=60_000
    )
    return [{s: stream.get_split(n, s) for s in ("train", "test")} for n in stream.domain_names]


@pytest.fixture(scope="module", params=["branch", "pool"])
def grown(request, domains):
    """A model trained on A, grown for B with everything old frozen, trained on B."""
    torch.manual_seed(0)
    A, B = domains
    model = _model(growth=request.param)
    train_lm(model, A["train"], steps=40, batch_size=8, lr=1e-2, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = {"A": perplexity(model, A["test"][:16]), "B": perplexity(model, B["test"][:16])}
    model.grow(4, owner=1)
    model.freeze_old(1)
    train_lm(model, B["train"], steps=40, batch_size=8, lr=1e-2, domain=1, progress=False)
    return model, before, ppl


def test_config_rejects_batchnorm_and_bad_values():
    with pytest.raises(ValueError, match="query_norm"):
        LMConfig(query_norm="batch")  # BatchNorm mixes positions: leaks future tokens
    with pytest.raises(ValueError, match="peer_layers"):
        LMConfig(layers=2, peer_layers=(2,))
    with pytest.raises(ValueError, match="attn_heads"):
        LMConfig(dim=30, attn_heads=4)
    with pytest.raises(ValueError, match="growth"):
        LMConfig(growth="tree")
    assert LMConfig().query_norm == "layer" and LMConfig(layers=4).peer_layers == (2,)
    assert LMConfig.from_dict(LMConfig(peer_layers=(1, 2)).to_dict()) == LMConfig(
        peer_layers=(1, 2)
    )


def test_forward_shapes_loss_and_argument_errors():
    model = _model()
    idx = _ids(3, 20)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 20, 258) and loss.dim() == 0 and torch.isfinite(loss)
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="idx"):
        model(torch.randn(3, 20))
    with pytest.raises(ValueError, match="T=33"):
        model(_ids(1, 33))
    with pytest.raises(ValueError, match=r"owners must be None, 'infer', one of \[0\]"):
        model(idx, owners=5)
    with pytest.raises(ValueError, match="owners must be None, 'infer'"):
        model(idx, owners="all")
    with pytest.raises(ValueError, match=r"owners must be an integer tensor of shape \(3,\)"):
        model(idx, owners=torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="owners must be an integer tensor, got a torch.float32"):
        model(idx, owners=torch.zeros(3))
    with pytest.raises(TypeError, match="owners must be None, 'infer', an int"):
        model(idx, owners=1.5)


def test_per_sequence_owners_and_the_inferred_mixture():
    model = _model().eval()
    model.grow(4, owner=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    idx = _ids(3, 16)
    owners = torch.tensor([1, 0, 1])
    got = model(idx, owners=owners)[0]
    for b, o in enumerate(owners.tolist()):
        torch.testing.assert_close(got[b], model(idx[b : b + 1], owners=o)[0][0])
    # "infer": log Σ_d w_d(t) p_d(·|idx[<=t]), the posterior from the evidence so far.
    logp = torch.stack([model(idx, owners=d)[0].log_softmax(-1) for d in (0, 1)])
    seen = logp[:, :, :-1].gather(-1, idx[None, :, 1:, None].expand(2, -1, -1, 1))
    log_post = torch.nn.functional.pad(seen.squeeze(-1).cumsum(-1), (1, 0)).log_softmax(0)
    want = torch.logsumexp(logp + log_post[..., None], dim=0)
    torch.testing.assert_close(model(idx, owners="infer")[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.domain_posterior(idx), log_post.exp())


@pytest.mark.parametrize("owners", [None, 0, 1, "infer"])
def test_causal_every_route(owners):
    """Changing tokens after position t changes no logit at or before t."""
    model = _model().eval()
    model.grow(4, owner=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the grown branch must do something
    idx = _ids(2, 24)
    other = idx.clone()
    other[:, 12:] = _ids(2, 12)
    a, b = model(idx, owners=owners)[0], model(other, owners=owners)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("growth", ["branch", "pool"])
def test_growth_alone_changes_nothing_on_old_routes(growth):
    model = _model(growth=growth).eval()
    idx = _ids(2, 16)
    before = model(idx)[0]
    model.grow(4, owner=1)
    assert model.owners == [0, 1]
    assert torch.equal(model(idx, owners=0)[0], before)
    if growth == "branch":  # new experts start with zero output weights
        assert torch.equal(model(idx, owners=1)[0], before)
    with pytest.raises(ValueError, match="owner must be an int >= 2, got 1"):
        model.grow(4, owner=1)


def test_freeze_old_leaves_only_the_new_domain_trainable():
    model = _model()
    model.grow(4, owner=1)
    model.freeze_old(1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("down", "up", "sub_keys")) or ".1." in n for n in names), names
    assert not any(n.startswith(("tok_emb", "pos_emb", "ln_out")) for n in names)
    assert not any(".attn.qkv." in n or ".attn.proj." in n for n in names)
    assert any("attn.adapters.1" in n for n in names)


def test_old_domain_is_exact_with_restricted_routes(grown, domains):
    """After B, A restricted to the old owners is unchanged."""
    model, before, ppl = grown
    A, B = domains
    assert perplexity(model, A["test"][:16], domain=0) == ppl["A"]  # bit for bit
    changed, new = touched_entries(before, model)
    assert changed == 0 and new > 0  # nothing old moved, new experts trained
    # Without the restriction A's change can only come from routing to new experts.
    unrestricted = perplexity(model, A["test"][:16], domain=None)
    drift = (unrestricted - ppl["A"]) / ppl["A"]
    print(f"\n{model.config.growth}: A unrestricted change {100 * drift:+.2f}%")
    if model.config.growth == "pool":
        shares = routing_shares(model, A["test"][:16])
        print(f"pool: A's router mass on new experts {100 * shares[1]:.2f}%")
        assert (shares[1] > 0) == (unrestricted != ppl["A"])
    assert perplexity(model, B["test"][:16], domain=1) < ppl["B"]  # B improved


def test_inferred_domain_posterior(grown, domains):
    model, _, ppl = grown
    A, B = domains
    x = A["test"][:4, :-1]
    post = model.domain_posterior(x)
    assert post.shape == (2, 4, 32)
    torch.testing.assert_close(post.sum(0), torch.ones(4, 32, dtype=post.dtype))
    torch.testing.assert_close(post[:, :, 0], torch.full((2, 4), 0.5, dtype=post.dtype))
    assert model.infer_domains(x).shape == (4, 32)
    # The mixture's log-loss is at most the best route's plus log 2 per sequence.
    inferred = perplexity(model, A["test"][:16], domain="infer")
    assert inferred <= ppl["A"] * 2 ** (1 / 32) * (1 + 1e-9)


def test_generate_shapes_and_greedy_determinism():
    model = _model()
    prompt = _ids(2, 5)
    out = model.generate(prompt, 40, temperature=0)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 40, temperature=0))
    sampled = model.generate(prompt, 3, top_k=5, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == (2, 8) and int(sampled.max()) < 258
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _model()
    path = tmp_path / "lm.pt"
    model.save(path)
    saved = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "umask", broken)  # the save never touches the process umask
    model.save(path)
    saved = path.read_bytes()
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["lm.pt"]
    monkeypatch.undo()
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_load_in_a_new_process_gives_identical_perplexities(grown, domains, tmp_path):
    model, _, _ = grown
    path = tmp_path / "lm.pt"
    model.save(path)
    blocks = domains[0]["test"][:8]
    torch.save(blocks, tmp_path / "blocks.pt")
    want = [perplexity(model, blocks, domain=d) for d in (0, 1, None, "infer")]
    code = textwrap.dedent(f"""
        import torch
        from peer_ll.cli.lm_train import perplexity
        from peer_ll.models.lm import PEERLM
        torch.set_num_threads({torch.get_num_threads()})
        model = PEERLM.load({str(path)!r})
        blocks = torch.load({str(tmp_path / "blocks.pt")!r}, weights_only=True)
        print(repr([perplexity(model, blocks, domain=d) for d in (0, 1, None, "infer")]))
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert eval(out.stdout.strip().splitlines()[-1]) == want
    fresh = PEERLM.load(path)
    assert fresh.owners == [0, 1] and fresh.config == model.config
