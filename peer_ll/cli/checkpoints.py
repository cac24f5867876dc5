"""Mid-stream checkpoints of a strategy, with Avalanche's ``save_checkpoint``.

After each finished experience :func:`save_stream_checkpoint` stores the whole strategy
(model, optimizer, plugins such as the replay buffer and the growth policy, evaluator
state) with Avalanche's ``save_checkpoint``, together with the evaluation rows so far
and the random states of torch, numpy and ``random``. :func:`load_stream_checkpoint`
restores all of it, so a resumed run continues bit for bit as the uninterrupted one.

The files are Avalanche's (dill pickles): load only checkpoints that a run of yours
wrote into its own run folder.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer_ll.cli.files import atomic_write

#: The strategy attribute that carries the run's own state inside the checkpoint.
STATE = "peer_ll_stream_state"


def save_stream_checkpoint(strategy, path: str | Path, rows: list[dict[str, Any]],
                           values: dict[str, Any]) -> Path:  # fmt: skip
    """Saves ``strategy`` and the run's rows, last metric values and random states.

    Args:
        strategy: an Avalanche template, between two experiences.
        path: the checkpoint file (written atomically).
        rows: the evaluation rows of the experiences trained so far.
        values: the metric values of the last evaluation.

    Returns:
        ``path``.
    """
    from avalanche.checkpointing import save_checkpoint

    setattr(strategy, STATE, {
        "rows": list(rows), "values": dict(values), "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(), "random": random.getstate(),
    })  # fmt: skip
    try:
        return atomic_write(path, lambda handle: save_checkpoint(strategy, handle))
    finally:
        delattr(strategy, STATE)


def load_stream_checkpoint(strategy, path: str | Path) -> tuple[list[dict], dict[str, Any]]:
    """Restores ``strategy`` from ``path`` if it exists.

    Returns:
        ``(rows, values)`` of the experiences the checkpoint had finished
        (``([], {})`` if there is no checkpoint; the strategy is then unchanged).
    """
    from avalanche.checkpointing import maybe_load_checkpoint

    path = Path(path)
    if not path.is_file():
        return [], {}
    strategy, done = maybe_load_checkpoint(strategy, path, map_location=strategy.device)
    state = strategy.__dict__.pop(STATE)
    if len(state["rows"]) != done:
        raise ValueError(f"checkpoint {path} holds {len(state['rows'])} rows for {done} "
                         "finished experiences")  # fmt: skip
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    return state["rows"], state["values"]
