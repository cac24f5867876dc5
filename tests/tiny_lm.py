"""The PEERLM config the model and strategy tests share (3 blocks, 16 experts a segment).

Importable from any test folder: ``tests/`` is on ``sys.path`` through its conftest.
"""

import torch

from peer_ll.models import PEERLM, LMConfig

TINY = dict(dim=32, layers=3, attn_heads=2, block_size=32, peer_num_keys=4, peer_heads=2,
            peer_topk=4, peer_dim_key=8, adapter_rank=4, attention_adapter_rank=4)  # fmt: skip


def grown_tiny_lm() -> PEERLM:
    """A TINY PEERLM grown by one domain (owner 1), weights perturbed so domains disagree."""
    torch.manual_seed(0)
    model = PEERLM(LMConfig(**TINY)).eval()
    model.grow(4, owner=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # domains that disagree
    return model
