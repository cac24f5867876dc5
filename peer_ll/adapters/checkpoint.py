"""Adapter-only checkpoints: the experts in one safetensors file, the config as its metadata.

The file ``adapter_model.safetensors`` (PEFT's name) holds every branch's state (a
PEER layer's, or a PerOwner's low-rank deltas) under ``{module name}.experts.{tensor}``
(its name in the model); its
metadata holds the format, the base model's class and the
:class:`ExpertsConfig` as JSON (with the growth history, which loading replays
before it copies the tensors in).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from peer_ll.models.lm_io import write_atomically

ADAPTER_FILE = "adapter_model.safetensors"
FORMAT = "peer_ll.adapters/2"  # /1 stored the low-rank deltas as {name}.down.{owner}


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """Write ``model``'s experts to ``directory/adapter_model.safetensors``, atomically."""
    if not model.config.domains:
        raise ValueError("model must hold at least one domain's experts, got none")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, branch in {**model.branches(), **model.low_rank()}.items():
        for key, value in branch.experts.state_dict().items():
            tensors[f"{name}.experts.{key}"] = value.detach().contiguous()
    metadata = {
        "format": FORMAT,
        "base_model": type(model.base_model).__name__,
        "config": json.dumps(model.config.to_dict()),
    }
    path = folder / ADAPTER_FILE
    write_atomically(save(tensors, metadata=metadata), path)
    return path


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(metadata with the config parsed, tensors) of a saved adapter."""
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise ValueError(f"directory must hold {ADAPTER_FILE}, got {os.fspath(directory)!r}")
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"adapter format must be {FORMAT!r}, got {metadata.get('format')!r} (files of "
            "peer_ll.adapters/1 cannot be read: save the experts again with this version)"
        )
    metadata["config"] = json.loads(metadata["config"])
    return metadata, tensors


def load_adapter(cls, model, directory: str | os.PathLike, *, is_trainable: bool):
    """Wrap ``model`` in ``cls`` (an ExpertsModel), replay the growth, copy the tensors in.

    Everything is checked before ``model`` changes; a failure while copying puts
    ``model``'s original blocks back.
    """
    from peer_ll.adapters.config import ExpertsConfig

    metadata, tensors = read_adapter(directory)
    if metadata["base_model"] != type(model).__name__:
        raise ValueError(
            f"model must be a {metadata['base_model']} (the saved base), got {type(model).__name__}"
        )
    config = ExpertsConfig.from_dict(metadata["config"])
    domains = config.domains
    wrapped = cls(model, ExpertsConfig.from_dict({**metadata["config"], "domains": []}))
    names = wrapped.targets + wrapped.adapted
    per_target = [[k for k in tensors if k.startswith(t + ".")] for t in names]
    if not domains or not all(per_target) or sum(map(len, per_target)) != len(tensors):
        raise ValueError(
            f"saved tensors must belong to the model's targets {names}, "
            f"got {len(tensors)} tensors named like {sorted(tensors)[:2]}"
        )
    try:
        for owner, num_keys in domains:
            wrapped.add_experts(num_keys, owner=owner)
        for name, branch in {**wrapped.branches(), **wrapped.low_rank()}.items():
            prefix = name + ".experts."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            branch.experts.load_state_dict(state, strict=True)
    except BaseException:
        wrapped.unload()
        raise
    # Replaying add_experts reproduced the saved freezing; without training, freeze all.
    if not is_trainable:
        wrapped.freeze_all()
    return wrapped
