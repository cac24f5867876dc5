"""PEERLM's sampling loop and its checkpoints: atomic safetensors files (used by its methods).

Axis letters: ``B`` batch, ``T0`` prompt positions, ``V`` vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import fields
from typing import IO

import safetensors
import safetensors.torch
import torch
from torch import nn

from peer_ll.experts.checks import check_allocation, check_float, check_int
from peer_ll.models.transformer import LMConfig


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


def write_atomically(data: bytes | Callable[[IO[bytes]], object], path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    ``data`` is the bytes, or a callable that writes them into the open binary handle it
    is given (e.g. ``lambda f: torch.save(obj, f)``).

    The temp file is fsynced before the rename and removed if anything fails, so an
    interrupted save leaves any previous file at ``path`` intact and no temp file
    behind. The file gets the usual mode (0o666 less the umask, applied by the
    kernel); the process umask is never changed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{name}-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 over ``metadata`` (but its "sha256") and the names, dtypes, shapes and
    bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in (metadata or {}).items() if k != "sha256"}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike
) -> None:
    """Save ``tensors`` with safetensors (no pickle) and a content hash, atomically.

    ``metadata`` (str -> str) goes into the file's header beside ``"sha256"``, the
    :func:`content_hash` that :func:`load_tensors` checks.
    """
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {**metadata, "sha256": content_hash(tensors, metadata)}
    write_atomically(safetensors.torch.save(tensors, metadata=meta), path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a :func:`save_tensors` file, without reading its tensors.

    Raises:
        ValueError: the file is empty, truncated or not a safetensors file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(
            f"path must hold a safetensors checkpoint, got a file of {size} bytes: {path}"
        )
    try:
        with safetensors.safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"path must hold a whole safetensors checkpoint, got {path}: {error}"
        ) from error


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a :func:`save_tensors` file, after checking its content hash."""
    meta = read_metadata(path)
    try:
        tensors = safetensors.torch.load_file(os.fspath(path), device=str(device))
    except Exception as error:
        raise ValueError(
            f"path must hold a whole safetensors checkpoint, got {path}: {error}"
        ) from error
    if meta.get("sha256") != content_hash(tensors, meta):
        raise ValueError(
            f"path must hold a checkpoint whose content matches its sha256, "
            f"got one that does not (corrupted or edited): {path}"
        )
    return tensors


def config_from_header(text: object) -> LMConfig:
    """The :class:`LMConfig` of a checkpoint header, checked before anything is allocated.

    Every config key must be present and the model it describes must fit in memory
    (an estimate of its parameters, dominated by the embeddings, blocks and pools).
    """
    if not isinstance(text, str):
        raise ValueError(f"checkpoint must hold its config as JSON metadata, got {text!r}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint config must be JSON, got {text[:80]!r}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint config must be a JSON object, got {type(data).__name__}")
    missing = sorted({f.name for f in fields(LMConfig)} - set(data))
    if missing:
        raise ValueError(f"checkpoint config must hold every LMConfig key, got none for {missing}")
    config = LMConfig.from_dict(data)
    check_allocation("checkpoint config (the model it describes)", estimated_bytes(config))
    return config


def estimated_bytes(config: LMConfig) -> int:
    """Bytes of a fresh PEERLM's float32 parameters for ``config`` (within a few %)."""
    c, d = config, config.dim
    dense = c.vocab_size * d + c.block_size * d + c.layers * (4 + 2 * c.mlp_ratio) * d * d
    rows = max(c.peer_capacity or 0, c.peer_num_keys**2)
    keys = max(rows // c.peer_num_keys + 1, 2 * c.peer_num_keys)
    peer = rows * 2 * d + keys * c.peer_dim_key + c.peer_heads * c.peer_dim_key * d
    return 4 * (dense + len(c.peer_layers) * peer)


CHECKPOINT_FORMAT = "peer_ll.PEERLM.safetensors/2"


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a PEERLM's weights, config and frozen names with :func:`save_tensors`."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    save_tensors(
        model.state_dict(),
        {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(model.config.to_dict()),
            "frozen": json.dumps(frozen),
        },
        path,
    )


def load_model(cls: type, path: str | os.PathLike, map_location: str | torch.device):
    """Build ``cls`` (PEERLM) from :func:`save_model`'s file; see ``PEERLM.load``."""
    meta = read_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"path must hold a PEERLM checkpoint (format "
            f"{CHECKPOINT_FORMAT!r}), got format {meta.get('format')!r}"
        )
    model = cls(config_from_header(meta.get("config")))
    model.load_state_dict(load_tensors(path))
    frozen = json.loads(meta.get("frozen", "[]"))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model.to(map_location)
