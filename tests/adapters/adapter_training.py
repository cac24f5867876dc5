"""Training steps shared by the adapter tests."""

import torch

from peer_ll.adapters import ExpertsConfig, ExpertsModel, add_experts
from peer_ll.optim import make_optimizer

SMALL = ExpertsConfig(heads=2, topk=3, dim_key=8)
ADAPTED = ExpertsConfig(heads=2, topk=3, dim_key=8, adapter_rank=2)  # + attention deltas


def train(model: ExpertsModel, tokens: torch.Tensor, owner: int, steps: int = 3) -> None:
    """A few AdamW steps on ``owner``'s route (lr high enough to move every touched row)."""
    model.train()
    opt = make_optimizer(model, lr=0.05)
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens, owners=owner).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def two_domains(base, tokens, config: ExpertsConfig = SMALL) -> ExpertsModel:
    """``base`` with trained experts for owners 1 and 2."""
    model = add_experts(base, config, num_keys=3, owner=1)
    train(model, tokens, 1)
    add_experts(model, num_keys=3, owner=2)
    train(model, tokens.flip(-1), 2)
    return model
