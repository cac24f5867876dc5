"""``peer-ll run``: compare continual-learning strategies on a task stream.

With no arguments: Split-Digits (scikit-learn's bundled digits, class-incremental,
5 experiences × 2 classes), 2 seeds, the twelve strategies of
``peer_ll.cli.strategies_zoo.DEFAULT_STRATEGIES``. The run loop and metrics are
:mod:`peer_ll.cli.harness`'s: after each training experience every strategy is
evaluated on the whole test stream, which fills its accuracy matrix R[i][j]. Joint
training trains once on everything; its matrix repeats that one evaluation in every
row, and its last row is the reference for intransigence.

The run folder holds ``results.json`` (see ``peer_ll.evaluation.report``),
``table.txt``, the PNG plots (``peer_ll.evaluation.plots``) and Avalanche text logs
under ``logs/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from peer_ll.cli import distributed
from peer_ll.cli.harness import cpu_threads, evaluator, log_file, quiet_avalanche, run_stream
from peer_ll.cli.results import environment
from peer_ll.cli.strategies_zoo import (
    DEFAULT_STRATEGIES,
    NO_PEER,
    STRATEGIES,
    ZooConfig,
    build_strategy,
    parameter_counts,
    stream_info,
)
from peer_ll.evaluation.plots import draw_run_plots, slug
from peer_ll.evaluation.report import (
    results_table,
    summarize,
    write_results,
)

DATASETS = ("digits", "fashion-mnist", "mnist")
KINDS = ("class", "task", "permuted", "rotated", "online")
HELP = {
    "lr": "Adam learning rate, constant, every strategy",
    "batch_size": "training mini-batch",
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


def run_strategy(key: str, bench, info, config: ZooConfig, *, seed: int, log=None,
                 progress: bool = False) -> dict:  # fmt: skip
    """Trains one strategy on ``bench`` and returns its seed record (``log``: a text file)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    t = info.n_experiences
    peer = key not in NO_PEER
    strategy = build_strategy(key, info, config,
                              evaluator=evaluator(log, routing=peer, plasticity=peer))  # fmt: skip
    distributed.prepare(strategy)  # DDP under torchrun; nothing in a single process
    start = time.perf_counter()
    if info.kind == "online" and key != "joint":
        from peer_ll.cli.online import run_online

        boundaries = key.startswith("peer-") and key != "peer-grow-online"
        evals, values = run_online(strategy, bench, experience_size=config.batch_size,
                                   seed=seed, boundaries=boundaries)  # fmt: skip
    else:
        evals, values = run_stream(strategy, bench, joint=key == "joint", progress=progress,
                                   desc=STRATEGIES[key])  # fmt: skip
    seconds = time.perf_counter() - start
    total, active = parameter_counts(strategy.model)
    record = dict(seed=seed, accuracy_matrix=[e["accuracy"] for e in evals],
                  params_total=total, params_active=active, seconds=seconds,
                  routing=evals[-1]["routing"])  # fmt: skip
    record["health"] = {
        name: [e["health"].get(name, [np.nan] * t) for e in evals]
        for name in ("dead_units", "effective_rank")
    }
    if key != "joint":
        record["avalanche"] = {
            "forgetting": float(values["StreamForgetting/eval_phase/test_stream"]),
            "bwt": float(values["StreamBWT/eval_phase/test_stream"]),
        }
    return record


def run_comparison(
    stream: str = "digits-class",
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    seeds: Sequence[int] = (0, 1),
    config: ZooConfig | None = None,
    n_experiences: int | None = None,
    max_train_per_exp: int | None = None,
    max_test_per_exp: int | None = None,
    log_dir: str | Path | None = None,
    progress: bool = True,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Trains every strategy on every seed; returns the ``results.json`` content.

    Args:
        stream: ``DATASET-KIND``, e.g. ``"digits-class"``, ``"fashion-mnist-permuted"``.
        strategies: keys of ``peer_ll.cli.strategies_zoo.STRATEGIES``.
        seeds: one run per seed; the seed also draws the stream (class order,
            permutations, subsample).
        config: shared training settings (default ``ZooConfig()``).
        n_experiences: experiences (default: 5; 10 for permuted streams).
        max_train_per_exp, max_test_per_exp: subsample each experience.
        log_dir: where to write one Avalanche text log per strategy and seed.
        progress: show progress bars.
        data: a user's ``.npz`` (``X``, ``y``[, ``task``]) or ``.csv`` file
            (``peer_ll.data.load_arrays``); ``stream`` then gives the KIND
            (``"class"``, ``"task"``, ...; a ``DATASET-`` prefix is ignored), and 20 %
            of each class is held out for testing.
    """
    from peer_ll.data import load_arrays, make_stream

    if data is None:
        name, kind = parse_stream(stream)
    else:
        name, kind = load_arrays(data), stream.rpartition("-")[2]
        if kind not in KINDS:
            raise ValueError(f"stream must be a KIND among {list(KINDS)} with data, got {kind!r}")
        stream = f"{Path(data).stem}-{kind}"
    config = config or ZooConfig()
    if kind == "online":  # one pass over the stream
        config = replace(config, epochs=1)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"strategies must be among {list(STRATEGIES)}, got {list(strategies)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    records: dict[str, list[dict]] = {key: [] for key in strategies}
    bar = tqdm(total=len(seeds) * len(strategies), desc="runs", unit="run", disable=not progress)
    with bar, quiet_avalanche():
        for seed in seeds:
            sizes = dict(n_experiences=n_experiences, max_train_per_exp=max_train_per_exp,
                         max_test_per_exp=max_test_per_exp)  # fmt: skip
            # online: the class stream, cut into mini-experiences by each run
            base_kind = "class" if kind == "online" else kind
            bench = make_stream(name, kind=base_kind, seed=seed, **sizes)
            info = stream_info(bench, kind)
            for key in strategies:
                bar.set_postfix_str(f"{STRATEGIES[key]}, seed {seed}")
                with log_file(log_dir, f"{slug(key)}-seed{seed}.log") as log:
                    record = run_strategy(key, bench, info, config, seed=seed, log=log,
                                          progress=progress)  # fmt: skip
                records[key].append(record)
                bar.update()
    joint = {r["seed"]: r["accuracy_matrix"][-1] for r in records.get("joint", [])}
    summaries = {STRATEGIES[k]: summarize(recs, joint_rows=joint) for k, recs in records.items()}
    settings = dict(stream=stream, n_experiences=info.n_experiences, seeds=list(seeds),
                    strategies=list(strategies), max_train_per_exp=max_train_per_exp,
                    max_test_per_exp=max_test_per_exp, **asdict(config))  # fmt: skip
    return {"config": settings, "environment": environment(config.device),
            "strategies": summaries}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", default="digits-class",
                        help="DATASET-KIND: DATASET in digits, fashion-mnist, mnist; KIND in "
                             "class, task, permuted, rotated, online (class-incremental, "
                             "one pass in mini-experiences of --batch-size) (default "
                             "digits-class)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="a .npz (X, y[, task]) or .csv file of your own; --stream is then "
                             "the KIND (class, task, permuted, rotated; default class)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated, among {', '.join(STRATEGIES)} (default: the "
                             "first twelve)")
    parser.add_argument("--epochs", type=int, default=ZooConfig.epochs,
                        help=f"epochs per experience, every strategy (default {ZooConfig.epochs})")
    parser.add_argument("--seeds", default="2",
                        help="a count N (seeds 0..N-1) or a comma-separated list (default 2)")
    parser.add_argument("--out", default=None,
                        help="run folder (default runs/YYYYmmdd-HHMMSS)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--experiences", type=int, default=None,
                        help="number of experiences (default 5; 10 for permuted)")
    parser.add_argument("--max-train-per-exp", type=int, default=None,
                        help="subsample each training experience to this many samples")
    parser.add_argument("--max-test-per-exp", type=int, default=None,
                        help="subsample each test experience to this many samples")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (data parallel, torchrun on this machine; gloo on the "
                             "CPU, NCCL on CUDA); or start the run with torchrun (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models run fastest so)")
    for f in fields(ZooConfig):
        if f.name not in ("epochs", "device"):
            text = f"{HELP[f.name]} (default {f.default})"
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                                default=f.default, help=text)  # fmt: skip


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"4,7"`` -> [4, 7]."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError as err:
        raise ValueError(f"--seeds must be a count or a list like 0,1, got {text!r}") from err
    if count < 1:
        raise ValueError(f"--seeds must be a count >= 1, got {count}")
    return list(range(count))


def main(args: argparse.Namespace) -> int:
    config = ZooConfig(**{f.name: getattr(args, f.name) for f in fields(ZooConfig)})
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    data = getattr(args, "data", None)
    try:
        if data is None:
            parse_stream(args.stream)
        elif args.stream.rpartition("-")[2] not in KINDS:
            raise ValueError(f"--stream must be a KIND among {list(KINDS)} with --data, "
                             f"got {args.stream!r}")  # fmt: skip
        seeds = parse_seeds(args.seeds)
        if not strategies or set(strategies) - set(STRATEGIES):
            raise ValueError(f"--strategies must be among {list(STRATEGIES)}, got {strategies}")
    except ValueError as err:
        print(f"peer-ll run: error: {err}", file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("runs") / stamp
    if args.nproc < 1:
        print(f"peer-ll run: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1 and distributed.world_size() == 1:  # start the ranks, same options
        options = {**vars(args), "out": str(run_dir)}
        return distributed.launch(args.nproc, [
            item for key, value in options.items() if value is not None and key != "nproc"
            for item in (f"--{key.replace('_', '-')}", str(value))])
    distributed.init(seeds[0], args.device)
    config = ZooConfig(**{**asdict(config), "device": distributed.local_device(config.device)})
    main_rank = distributed.is_main()
    with cpu_threads(args.threads):
        results = run_comparison(
            args.stream, strategies=strategies, seeds=seeds, config=config,
            n_experiences=args.experiences, max_train_per_exp=args.max_train_per_exp,
            max_test_per_exp=args.max_test_per_exp, data=data,
            log_dir=run_dir / "logs" if main_rank else None, progress=main_rank,
        )  # fmt: skip
    if not main_rank:
        return 0
    results["config"]["processes"] = distributed.world_size()
    write_results(run_dir, results)
    table = results_table(results)
    (run_dir / "table.txt").write_text(table + "\n")
    draw_run_plots(results, run_dir)
    cfg = results["config"]
    print(f"\n{cfg['stream']}: {cfg['n_experiences']} experiences, seeds {cfg['seeds']}, "
          f"{cfg['epochs']} epochs, replay budget {config.replay_budget}; "
          "accuracy in %, mean ± std over seeds")  # fmt: skip
    print(table)
    print(f"\nrun folder: {run_dir}")
    return 0
