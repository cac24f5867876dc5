"""Add experts for a new text domain to a trained PEER language model.

Train a small byte-level PEERLM on Python source (domain A), then learn English
reference prose (domain B) by growing experts owned by B while everything A
uses stays frozen. A's perplexity is checked three ways: restricted to A's own
experts (exactly as before), with every expert, and with the domain inferred
from the text. Finally the model is saved, loaded back and sampled.

    python examples/add_domain_experts.py            # about 2 minutes on 2 CPU cores
    python examples/add_domain_experts.py --tiny     # a few seconds
"""

import argparse
import tempfile
from pathlib import Path

import torch

from peer_ll.cli.lm_train import perplexity, train_lm
from peer_ll.data.text import decode, text_domain_stream
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="tiny model and data (smoke run)")
args = parser.parse_args()
torch.manual_seed(0)

if args.tiny:
    config = LMConfig(
        dim=32,
        layers=2,
        attn_heads=2,
        block_size=32,
        peer_num_keys=8,
        peer_heads=2,
        peer_topk=4,
        peer_dim_key=16,
    )
    steps, grow_keys, data_bytes, eval_blocks = 30, 8, 60_000, 8
else:
    config = LMConfig()  # 4 blocks, PEER FFN in the middle one, query LayerNorm
    steps, grow_keys, data_bytes, eval_blocks = 400, 32, 600_000, 64

stream = text_domain_stream(
    ("python-stdlib", "pydoc-topics"), block_size=config.block_size, max_bytes_per_domain=data_bytes
)
A, B = ({s: stream.get_split(name, s) for s in ("train", "test")} for name in stream.domain_names)
A["test"], B["test"] = A["test"][:eval_blocks], B["test"][:eval_blocks]

# 1. Train on domain A (owner 0: the base experts).
model = PEERLM(config)
train_lm(model, A["train"], steps=steps, lr=3e-3, desc="train on A")
a_before, b_before = perplexity(model, A["test"]), perplexity(model, B["test"])

# 2. Grow experts owned by B (owner 1) and freeze everything else, then train on B.
model.grow(grow_keys, owner=1)
model.freeze_old(1)
train_lm(model, B["train"], steps=steps // 2, lr=6e-3, domain=1, desc="grow for B")

# 3. Perplexities before and after.
print(
    f"A (python-stdlib): {a_before:.3f} before B;  after B: "
    f"restricted to A's experts {perplexity(model, A['test'], domain=0):.3f}, "
    f"every expert {perplexity(model, A['test'], domain=None):.3f}, "
    f"domain inferred {perplexity(model, A['test'], domain='infer'):.3f}"
)
print(
    f"B (pydoc-topics):  {b_before:.3f} before;  after: "
    f"{perplexity(model, B['test'], domain=1):.3f} (domain known), "
    f"{perplexity(model, B['test'], domain='infer'):.3f} (domain inferred)"
)

# 4. Save, load into a fresh model, and sample what it learned.
with tempfile.TemporaryDirectory() as folder:
    model.save(Path(folder) / "lm.pt")
    loaded = PEERLM.load(Path(folder) / "lm.pt")
assert perplexity(loaded, B["test"], domain=1) == perplexity(model, B["test"], domain=1)
prompt = B["test"][:1, :48]
sample = loaded.generate(
    prompt,
    80,
    temperature=0.8,
    top_k=20,
    owners="infer",
    generator=torch.Generator().manual_seed(0),
)
print(f"prompt: {decode(prompt[0])!r}\nsample: {decode(sample[0, 48:])!r}")
