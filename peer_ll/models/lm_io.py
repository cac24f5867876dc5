"""PEERLM's sampling loop and atomic checkpoint writing (used by its methods).

Axis letters: ``B`` batch, ``T0`` prompt positions, ``V`` vocabulary.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from peer_ll.experts.checks import check_float, check_int


@torch.no_grad()
def sample(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    owners: object = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample from ``model(idx, owners=owners) -> (logits (B, T, V), _)``.

    (B, T0) prompt ids -> (B, T0 + max_new_tokens); the context is cropped to the
    last ``block_size`` tokens; ``temperature`` 0 means greedy decoding.
    """
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    check_float("temperature", temperature, minimum=0.0)
    if top_k is not None:
        check_int("top_k", top_k, minimum=1)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:], owners=owners)
        logits = logits[:, -1]  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx


def save_atomically(payload: dict, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to ``path`` through a temp file and ``os.replace``.

    An interrupted save leaves any previous file at ``path`` intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; keep the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
