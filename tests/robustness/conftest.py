"""Probes of the public API as a careless user or an attacker would call it.

``state_hash`` digests everything a failed call must leave alone: every parameter,
buffer and ``requires_grad`` flag, each Parameter's identity, the layer's plain flags
and, if given, the optimizer's state and parameter groups.
"""

import hashlib

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + (
        t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    )


def state_hash(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    d = hashlib.sha256()
    for name, t in module.state_dict(keep_vars=True).items():
        d.update(name.encode() + _tensor_bytes(t) + str((t.requires_grad, id(t))).encode())
    for name, m in module.named_modules():
        flags = {k: v for k, v in vars(m).items() if isinstance(v, bool | int | float | str)}
        d.update(f"{name}{sorted(flags.items())}".encode())
    if optimizer is not None:
        for group in optimizer.param_groups:
            d.update(str([id(p) for p in group["params"]]).encode())
            d.update(str({k: v for k, v in group.items() if k != "params"}).encode())
        for p, state in optimizer.state.items():
            d.update(str(id(p)).encode())
            for k, v in sorted(state.items()):
                d.update(k.encode() + (_tensor_bytes(v) if torch.is_tensor(v) else str(v).encode()))
    return d.hexdigest()


@pytest.fixture
def hashed():
    return state_hash


@pytest.fixture
def layer():
    """A small two-owner layer in training mode (owner 0: 16 experts, owner 1: 4)."""
    peer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    peer.grow(2, owner=1)
    return peer.train()
