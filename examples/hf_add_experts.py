"""Add PEER experts for a new text domain to a Hugging Face GPT-2, next to what it knows.

Build a small byte-level GPT-2 from its config (no hub) and train it on Python
source (domain A, the "existing model"). Then add PEER experts owned by English
reference prose (domain B, owner 1) beside every MLP with one call, train only
them, and check that: with the base domain selected the model's logits are the
old model's bit for bit; B's perplexity drops; the domain can also be inferred
from the text. Finally the experts alone are saved (safetensors) and loaded into
a fresh copy of the base model.

    python examples/hf_add_experts.py            # about a minute on 2 CPU cores
    python examples/hf_add_experts.py --tiny     # a few seconds
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from peer_ll.adapters import ExpertsConfig, ExpertsModel, add_experts
from peer_ll.data.text import TEXT_VOCAB_SIZE, text_domain_stream
from peer_ll.optim import make_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="tiny model and data (smoke run)")
args = parser.parse_args()
torch.manual_seed(0)
dim, layers, block, steps, data_bytes = (
    (32, 2, 32, 30, 60_000) if args.tiny else (96, 3, 64, 250, 300_000)
)

stream = text_domain_stream(
    ("python-stdlib", "pydoc-topics"), block_size=block, max_bytes_per_domain=data_bytes
)
A, B = ({s: stream.get_split(n, s) for s in ("train", "test")} for n in stream.domain_names)


def train(model, blocks, **route):
    """AdamW steps (row-sparse for expert tables) on random batches of blocks (N, T + 1)."""
    opt = make_optimizer(model, lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,))]
        logits = model(input_ids=batch[:, :-1], **route).logits
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def perplexity(model, blocks, **route):
    logits = model(input_ids=blocks[:32, :-1], **route).logits
    return math.exp(F.cross_entropy(logits.flatten(0, 1), blocks[:32, 1:].flatten()))


# 1. The existing model: a GPT-2 trained on domain A.
config = GPT2Config(
    vocab_size=TEXT_VOCAB_SIZE,
    n_positions=block,
    n_embd=dim,
    n_layer=layers,
    n_head=2,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=256,
    eos_token_id=257,
)
gpt2 = GPT2LMHeadModel(config)
train(gpt2, A["train"])
a_before, b_before = perplexity(gpt2, A["test"]), perplexity(gpt2, B["test"])
old_logits = gpt2(input_ids=A["test"][:8, :-1]).logits.detach()
folder = Path(tempfile.mkdtemp())
gpt2.save_pretrained(folder / "base")

# 2. One call adds domain B's experts beside every MLP (and rank-8 deltas on attention)
#    and freezes everything old.
config = ExpertsConfig(heads=4, topk=8, dim_key=32, adapter_rank=8)  # + attention deltas
model = add_experts(gpt2, config, num_keys=8, owner=1)
print(model.print_trainable_parameters())
train(model, B["train"], owners=1)

same = torch.equal(model(input_ids=A["test"][:8, :-1], owners=0).logits, old_logits)
print(f"A, base domain selected: logits bit-identical to the old model: {same}")
print(
    f"A perplexity: before {a_before:.2f}, "
    f"base domain {perplexity(model, A['test'], owners=0):.2f}, "
    f"domain inferred {perplexity(model, A['test'], owners='infer'):.2f}"
)
print(
    f"B perplexity: before {b_before:.2f}, "
    f"B's experts {perplexity(model, B['test'], owners=1):.2f}, "
    f"domain inferred {perplexity(model, B['test'], owners='infer'):.2f}"
)

# 3. Save only the experts; load them into a fresh copy of the base model.
model.save_pretrained(folder / "experts")
size = (folder / "experts" / "adapter_model.safetensors").stat().st_size
loaded = ExpertsModel.from_pretrained(
    GPT2LMHeadModel.from_pretrained(folder / "base"), folder / "experts"
)
x = B["test"][:8, :-1]
print(
    f"experts-only checkpoint: {size:,} bytes; reloaded logits identical: "
    f"{torch.equal(loaded(input_ids=x, owners=1).logits, model(input_ids=x, owners=1).logits)}"
)
