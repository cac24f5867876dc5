"""``peer-ll run``'s command line: its arguments, checked before anything is read or made.

Every flag is checked up front (:func:`check_arguments`): a bad one gives
``peer-ll run: error: ...`` naming the flag, exit status 2, and leaves no folder behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from peer_ll.cli import args as argtypes
from peer_ll.cli.run_folder import check_run_folder
from peer_ll.cli.strategies_zoo import DEFAULT_STRATEGIES, DOMAIN_ONLY, STRATEGIES, ZooConfig

DATASETS = ("digits", "fashion-mnist", "mnist")
KINDS = ("class", "task", "permuted", "rotated", "online")

HELP = {
    "lr": "Adam learning rate, constant, every strategy",
    "batch_size": "training mini-batch",
    "shard_experts": "with --nproc: split every PEER layer's expert tables by columns over the "
    "processes (each holds 1/N of them; retrieval stays exact)",
    "eval_batch_size": "evaluation mini-batch",
    "replay_budget": "samples in memory for Replay and the PEER strategies",
    "hidden": "width of the encoder and the PEER block",
    "num_keys": "sub-keys per side of a pool segment (num_keys² experts per growth)",
    "ewc_lambda": "EWC penalty weight",
    "lwf_alpha": "LwF distillation weight",
    "lwf_temperature": "LwF temperature",
    "rd_alpha": "RouterDistillation weight",
    "top_t": "expert rows per layer and step for sparse finetuning",
}


def parse_stream(stream: str) -> tuple[str, str]:
    """``"fashion-mnist-task"`` -> ``("fashion-mnist", "task")``."""
    name, _, kind = stream.rpartition("-")
    if name not in DATASETS or kind not in KINDS:
        choices = [f"{d}-{k}" for d in DATASETS for k in KINDS]
        raise ValueError(f"stream must be DATASET-KIND, one of {choices}, got {stream!r}")
    return name, kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pos = argtypes.positive_int
    parser.add_argument(
        "--stream",
        default="digits-class",
        help="DATASET-KIND: DATASET in digits, fashion-mnist, mnist; KIND in "
        "class, task, permuted, rotated, online (class-incremental, "
        "one pass in mini-experiences of --batch-size) (default "
        "digits-class)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="a .npz (X, y[, task]) or .csv file of your own; --stream is then "
        "the KIND (class, task, permuted, rotated; default class)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"comma-separated, among {', '.join(STRATEGIES)} (default: the "
        f"first {len(DEFAULT_STRATEGIES)})",
    )
    parser.add_argument(
        "--epochs",
        type=pos,
        default=ZooConfig.epochs,
        help=f"epochs per experience, every strategy (default {ZooConfig.epochs})",
    )
    parser.add_argument(
        "--seeds",
        type=argtypes.seed_list,
        default=[0, 1],
        help="a count N (seeds 0..N-1) or a comma-separated list (default 2)",
    )
    parser.add_argument("--out", default=None, help="run folder (default runs/YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (same arguments) where it stopped",
    )
    parser.add_argument(
        "--force", action="store_true", help="remove the run in --out first and start anew"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder of the IDX files of fashion-mnist or mnist (default: "
        "see 'peer-ll data fetch')",
    )
    parser.add_argument(
        "--experiences",
        type=pos,
        default=None,
        help="number of experiences (default 5; 10 for permuted)",
    )
    parser.add_argument(
        "--max-train-per-exp",
        type=pos,
        default=None,
        help="subsample each training experience to this many samples",
    )
    parser.add_argument(
        "--max-test-per-exp",
        type=pos,
        default=None,
        help="subsample each test experience to this many samples",
    )
    parser.add_argument(
        "--nproc",
        type=pos,
        default=1,
        help="processes (data parallel, torchrun on this machine; gloo on the "
        "CPU, NCCL on CUDA); or start the run with torchrun (default 1). --batch-size "
        "stays the global batch: each process takes batch-size/nproc",
    )
    parser.add_argument(
        "--threads",
        type=pos,
        default=1,
        help="torch CPU threads (default 1: tiny models run fastest so)",
    )
    kinds = {int: pos, float: argtypes.non_negative_float}
    positive = ("lr", "lwf_temperature")
    for f in fields(ZooConfig):
        if f.name == "shard_experts":
            parser.add_argument("--shard-experts", action="store_true", help=HELP[f.name])
        elif f.name not in ("epochs", "device"):
            kind = argtypes.positive_float if f.name in positive else kinds[type(f.default)]
            text = f"{HELP[f.name]} (default {f.default})"
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind,
                                default=f.default, help=text)  # fmt: skip


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"4,7"`` -> [4, 7] (distinct seeds >= 0)."""
    try:
        return argtypes.seed_list(text)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--seeds: {err}") from None


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    config = ZooConfig(**{f.name: getattr(args, f.name) for f in fields(ZooConfig)})
    return dict(stream=args.stream, n_experiences=args.experiences, seeds=list(args.seeds),
                strategies=_strategies(args), max_train_per_exp=args.max_train_per_exp,
                max_test_per_exp=args.max_test_per_exp, data_root=args.data_root,
                data=getattr(args, "data", None), **asdict(config))  # fmt: skip


def _strategies(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.strategies.split(",") if s.strip()]


def check_arguments(args: argparse.Namespace) -> None:
    """Checks every argument of ``peer-ll run``; ValueError naming the flag."""
    from peer_ll.data.images import _not_found_message, find_image_dataset

    data = getattr(args, "data", None)
    if data is None:
        try:
            name, kind = parse_stream(args.stream)
        except ValueError as err:
            raise ValueError(f"--{err}") from None
    else:
        name, kind = None, args.stream.rpartition("-")[2]
        if kind not in KINDS:
            raise ValueError(f"--stream must be a KIND among {list(KINDS)} with --data, "
                             f"got {args.stream!r}")  # fmt: skip
        if not Path(data).is_file():
            raise ValueError(f"--data must be an existing .npz or .csv file, got {data!r}")
    strategies = _strategies(args)
    if not strategies or set(strategies) - set(STRATEGIES):
        raise ValueError(f"--strategies must be among {list(STRATEGIES)}, got {strategies}")
    domain_only = sorted(set(strategies) & DOMAIN_ONLY)
    if domain_only and kind not in ("permuted", "rotated"):
        raise ValueError(f"--stream must be a permuted or rotated stream for {domain_only} "
                         f"(they freeze the one head), got {args.stream!r}")  # fmt: skip
    if kind in ("class", "task") and args.experiences is not None and args.experiences > 10:
        raise ValueError(f"--experiences must be in [1, 10] for a {kind}-incremental stream "
                         f"of 10 classes, got {args.experiences}")  # fmt: skip
    argtypes.check_device(args.device)
    processes = max(args.nproc, int(os.environ.get("WORLD_SIZE", "1")))  # or torchrun's
    if args.shard_experts and processes == 1:
        raise ValueError("--shard-experts needs several processes: --nproc N > 1 (or torchrun)")
    if args.batch_size % processes:
        raise ValueError(f"--batch-size must be a multiple of --nproc {processes} (the "
                         f"global batch is split over them), got {args.batch_size}")  # fmt: skip
    if name not in (None, "digits") and find_image_dataset(name, args.data_root) is None:
        message = _not_found_message(name, args.data_root).replace("root=", "--data-root")
        raise ValueError(f"--stream {args.stream}: {message}")
    args.run_dir = (
        Path(args.out) if args.out else Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    check_run_folder(args.run_dir, _settings(args), resume=args.resume, force=args.force)


def relaunch_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that give each started process the same run as ``args``."""
    options = {**vars(args), "out": str(args.run_dir)}
    flags = [
        item
        for key, value in options.items()
        if value is not None
        and value is not False
        and key not in ("nproc", "run_dir", "command", "func", "seeds")
        for item in (
            (f"--{key.replace('_', '-')}",)
            if value is True
            else (f"--{key.replace('_', '-')}", str(value))
        )
    ]
    return [
        *flags,
        "--seeds",
        ",".join(map(str, args.seeds)) + ("," if len(args.seeds) == 1 else ""),
    ]
