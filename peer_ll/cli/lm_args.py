"""``peer-ll lm``'s arguments, their checks, and its run folder's saved progress.

:func:`add_arguments` declares the flags; :func:`check_arguments` runs before any data
is read or folder made. The run folder keeps ``records/METHOD.json`` (a method's
finished record and its text samples) beside the checkpoints, written atomically with
the torch random state at that point; ``--resume`` trains the first domain's model anew
(deterministic, and its query statistics are not in a checkpoint), takes up the
finished methods and reruns only the others, so the results equal an uninterrupted
run's. A method killed halfway is rerun from its start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch

from peer_ll.cli.args import non_negative_float, non_negative_int, positive_float, positive_int
from peer_ll.cli.files import atomic_write_text
from peer_ll.cli.lm_methods import DEFAULT_METHODS, METHODS
from peer_ll.cli.run_folder import check_run_folder

#: Arguments that do not change a run's results (left out of ``run.json``).
NOT_SETTINGS = (
    "out",
    "resume",
    "force",
    "no_progress",
    "no_reload_check",
    "threads",
    "run_dir",
    "func",
)
#: API argument names in library messages -> the flags that set them.
FLAGS = {"max_bytes_per_domain": "--max-bytes", "block_size": "--block-size",
         "source": "--domains NAME=PATH"}  # fmt: skip
#: ``--tiny``'s model.
TINY = dict(
    dim=32,
    layers=2,
    attn_heads=2,
    block_size=32,
    peer_num_keys=8,
    peer_heads=2,
    peer_topk=4,
    peer_dim_key=16,
    adapter_rank=4,
    attention_adapter_rank=4,
)
#: ``--tiny``: a smoke run of well under a minute on 2 CPU cores.
TINY_LIMITS = dict(max_bytes=30_000, eval_blocks=4, steps_first=30, steps=10, grow_keys=8,
                   top_t=16)  # fmt: skip


DEFAULT_DOMAINS = ("python-stdlib", "pydoc-topics", "unicode-names")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    pos, count, rate, frac = positive_int, non_negative_int, positive_float, non_negative_float
    add(
        "--domains",
        nargs="+",
        default=list(DEFAULT_DOMAINS),
        metavar="DOMAIN",
        help="domains in stream order: built-in names (python-stdlib, pydoc-topics, "
        "unicode-names) or NAME=PATH for a folder or file of text (default: the three "
        "built-ins)",
    )
    add("--steps-first", type=count, default=1000, help="training steps on the first domain (1000)")
    add("--steps", type=count, default=250, help="training steps on each later domain (250)")
    add("--lr-first", type=rate, default=3e-3, help="peak learning rate, first domain (3e-3)")
    add("--lr", type=rate, default=6e-3, help="peak learning rate, later domains (6e-3)")
    add("--batch-size", type=pos, default=16, help="blocks per step (16)")
    add("--block-size", type=pos, default=128, help="context length T (128)")
    add("--max-bytes", type=pos, default=1_000_000, help="bytes of text per domain (1000000)")
    add("--eval-blocks", type=pos, default=96, help="test blocks per domain (96)")
    add(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=METHODS,
        help="methods for the later domains (default: all but grow-pool)",
    )
    add("--grow-keys", type=pos, default=32, help="sub-keys per side of a grown segment (32)")
    add("--top-t", type=pos, default=256, help="sparse finetuning: rows per layer and step (256)")
    add("--dim", type=pos, default=128, help="model width (128)")
    add("--layers", type=pos, default=4, help="transformer blocks (4)")
    add(
        "--peer-layers",
        type=peer_layers,
        default=None,
        metavar="all|I,J,...",
        help="blocks with a PEER FFN, the same for every method: 'all' (the paper: PEER "
        "replaces every FFN) or block indices from 0 (default: the middle block)",
    )
    add(
        "--pool-query",
        choices=("shared", "own"),
        default="shared",
        help="grow-pool: 'shared': new experts are scored with the base's query (one search "
        "over the pool, as the base plus one segment per domain); 'own': each domain trains "
        "its own query adapter (one search per domain) (shared)",
    )
    add(
        "--pool-pseudo",
        choices=("queries", "centroids"),
        default="centroids",
        help="grow-pool: the regulariser's pseudo-queries of earlier domains: one Gaussian "
        "('queries') or k-means centroids plus noise ('centroids') of their queries (centroids)",
    )
    add(
        "--pool-copy-experts",
        action="store_true",
        help="grow-pool: new experts start as copies of the old experts their keys retrieve "
        "(default: random)",
    )
    add(
        "--pool-keep-weight",
        type=frac,
        default=1.0,
        help="grow-pool: weight of the regulariser's keep term (old queries stay old) (1.0)",
    )
    add("--pool-margin", type=frac, default=1.0,
        help="grow-pool: score margin of the regulariser's win and keep terms (1.0)")  # fmt: skip
    add("--pool-centroids", type=pos, default=256,
        help="grow-pool, --pool-pseudo centroids: k-means centroids per earlier domain, PEER "
        "layer and head (256)")  # fmt: skip
    add("--pool-centroid-noise", type=frac, default=1.0,
        help="grow-pool, --pool-pseudo centroids: pseudo-queries are centroids plus this "
        "times their cluster's spread times N(0, 1); 0: the centroids alone (1.0)")  # fmt: skip
    add(
        "--experts-only",
        action="store_true",
        help="grow-and-freeze grows only PEER experts and sub-keys in the PEER blocks (the "
        "method in its plainest form): no expert layers beside dense MLPs, no query or "
        "attention adapters",
    )
    add(
        "--tiny",
        action="store_true",
        help="a tiny model, data and step count: a smoke run of well under a minute",
    )
    add(
        "--base",
        choices=("peerlm", "hf-gpt2"),
        default="peerlm",
        help="peerlm: the methods above on a PEERLM; hf-gpt2: PEER experts vs LoRA vs full "
        "finetuning on a Hugging Face GPT-2 (peer_ll.cli.hf_lm)",
    )
    add("--seed", type=count, default=0, help="random seed (0)")
    add("--threads", type=count, default=0, help="torch threads (0: torch's default)")
    add("--out", default=None, help="run folder (default: runs/lm-<time>)")
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out (same arguments): finished methods are kept",
    )
    add("--force", action="store_true", help="remove the run in --out first and start anew")
    add("--no-reload-check", action="store_true", help="skip loading checkpoints anew")
    add("--no-progress", action="store_true", help="no progress bars")


def peer_layers(text: str) -> str:
    """``--peer-layers``: 'all' or comma-separated block indices (checked against --layers)."""
    parts = text.split(",")
    if text != "all" and not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected 'all' or block indices like 0,2, got {text!r}")
    return text


def peer_block_indices(text: str | None, layers: int) -> tuple[int, ...] | None:
    """The PEER blocks ``--peer-layers`` names for a model of ``layers`` blocks (None: default)."""
    if text is None:
        return None
    if text == "all":
        return tuple(range(layers))
    blocks = tuple(sorted({int(p) for p in text.split(",")}))
    if blocks[-1] >= layers:
        raise ValueError(f"--peer-layers must be block indices in [0, {layers}), got {text}")
    return blocks


def flag_message(err: BaseException) -> str:
    """``err``'s message with API argument names replaced by the CLI flags."""
    text = str(err)
    for name, flag in FLAGS.items():
        text = text.replace(name, flag)
    return text


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that make a run's results (``run.json``)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def check_arguments(args: argparse.Namespace) -> None:
    """Checks every argument of ``peer-ll lm`` (``--tiny`` limits applied first)."""
    if args.tiny:
        for name, limit in TINY_LIMITS.items():
            setattr(args, name, min(getattr(args, name), limit))
        args.block_size = TINY["block_size"]
    if len(args.domains) < 2:
        raise ValueError(f"--domains must name at least 2 domains, got {args.domains}")
    from peer_ll.data.text_domains import BUILTIN_DOMAINS

    for spec in args.domains:
        name, sep, path = spec.partition("=")
        if not sep and spec not in BUILTIN_DOMAINS:
            raise ValueError(f"--domains: {spec!r} is neither a built-in domain "
                             f"{list(BUILTIN_DOMAINS)} nor NAME=PATH")  # fmt: skip
        if sep and (not name or not Path(path).exists()):
            raise ValueError(f"--domains {spec}: expected NAME=PATH of an existing file or "
                             "folder")  # fmt: skip
    args.run_dir = Path(args.out or f"runs/lm-{dt.datetime.now():%Y%m%d-%H%M%S}")
    check_run_folder(args.run_dir, settings(args), resume=args.resume, force=args.force)


def save_progress(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` (JSON, NaN kept) and the torch random state, atomically."""
    payload = {**record, "rng": torch.get_rng_state().tolist()}
    atomic_write_text(path, json.dumps(payload))


def load_progress(path: Path) -> dict[str, Any] | None:
    """The record saved at ``path`` (its random state restored), or None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    torch.set_rng_state(torch.tensor(record.pop("rng"), dtype=torch.uint8))
    return record
