"""``peer-ll run``: compare continual-learning strategies on a task stream.

With no arguments: Split-Digits (scikit-learn's bundled digits, class-incremental,
5 experiences × 2 classes), 2 seeds, the strategies of
``peer_ll.cli.strategies_zoo.DEFAULT_STRATEGIES``. The run loop and metrics are
:mod:`peer_ll.cli.harness`'s: after each training experience every strategy is
evaluated on the whole test stream, which fills its accuracy matrix R[i][j]. Joint
training trains once on everything; its matrix repeats that one evaluation in every
row, and its last row is the reference for intransigence.

The run folder holds ``run.json`` (the settings), ``results.json`` (see
``peer_ll.evaluation.report``), ``table.txt``, the PNG plots (``peer_ll.evaluation.plots``)
and Avalanche text logs under ``logs/``. Each finished (strategy, seed) is written at
once, atomically, to ``records/``, and ``results.json`` is rewritten from the records so
far (``"complete": false`` until the last); after each experience the strategy is saved
with Avalanche's ``save_checkpoint`` to ``checkpoints/`` (see
:mod:`peer_ll.cli.checkpoints`). ``--resume`` continues a killed run from there, bit for
bit; an existing run folder is refused unless ``--resume`` or ``--force`` is given.

A strategy whose training loss turns NaN or infinite stops with
:class:`~peer_ll.cli.harness.NonFiniteLoss`; its error goes to ``results.json``
(``"failures"``), the other strategies run on, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from peer_ll.cli.files import atomic_write_json, atomic_write_text
from peer_ll.cli.harness import (
    NonFiniteLoss,
    cpu_threads,
    evaluator,
    finite_loss_plugin,
    log_file,
    quiet_avalanche,
    run_stream,
)
from peer_ll.cli.results import environment
from peer_ll.cli.run_args import (  # noqa: F401 (the command's arguments, re-exported)
    DATASETS,
    KINDS,
    _settings,
    _strategies,
    add_arguments,
    check_arguments,
    parse_seeds,
    parse_stream,
    relaunch_flags,
)
from peer_ll.cli.run_folder import open_run_folder
from peer_ll.cli.strategies_zoo import (
    DEFAULT_STRATEGIES,
    NO_PEER,
    STATISTICS_ONLY,
    STRATEGIES,
    TASK_FREE,
    ZooConfig,
    build_strategy,
    parameter_counts,
    stream_info,
)
from peer_ll.evaluation.plots import draw_run_plots, slug
from peer_ll.evaluation.report import results_table, summarize

logger = logging.getLogger(__name__)


def run_strategy(key: str, bench, info, config: ZooConfig, *, seed: int, log=None,
                 progress: bool = False, checkpoint: str | Path | None = None) -> dict:  # fmt: skip
    """Trains one strategy on ``bench`` and returns its seed record.

    Args:
        log: an open text file for Avalanche's text logger.
        checkpoint: a file for mid-stream checkpoints (see ``harness.run_stream``).

    Raises:
        NonFiniteLoss: the training loss became NaN or infinite.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    t = info.n_experiences
    peer = key not in NO_PEER
    strategy = build_strategy(key, info, config,
                              evaluator=evaluator(log, routing=peer, plasticity=peer))  # fmt: skip
    strategy.plugins.append(finite_loss_plugin())
    distributed.prepare(strategy, shard_experts=config.shard_experts)  # only under torchrun
    start = time.perf_counter()
    if info.kind == "online" and key != "joint":
        from peer_ll.cli.online import run_online

        boundaries = key.startswith("peer-") and key not in TASK_FREE
        size = config.batch_size * distributed.world_size()  # the global batch
        evals, values = run_online(strategy, bench, experience_size=size,
                                   seed=seed, boundaries=boundaries)  # fmt: skip
    else:
        evals, values = run_stream(strategy, bench, joint=key == "joint", progress=progress,
                                   desc=STRATEGIES[key], checkpoint=checkpoint)  # fmt: skip
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
    run_dir: str | Path | None = None,
    data_root: str | Path | None = None,
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
        log_dir: where to write one Avalanche text log per strategy and seed (default:
            ``run_dir/logs`` with a ``run_dir``).
        run_dir: a run folder made by ``open_run_folder``: each finished (strategy, seed)
            goes to ``records/`` and ``results.json`` at once; records and checkpoints
            found there are taken up (resume).
        data_root: folder of the IDX files (``make_stream``'s ``root``).
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
        data_root = None
    config = config or ZooConfig()
    if kind == "online":  # one pass over the stream
        config = replace(config, epochs=1)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"strategies must be among {list(STRATEGIES)}, got {list(strategies)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    run_dir = None if run_dir is None else Path(run_dir)
    if log_dir is None and run_dir is not None:
        log_dir = run_dir / "logs"
    records: dict[str, list[dict]] = {key: [] for key in strategies}
    failures: list[dict] = []
    settings = dict(stream=stream, n_experiences=n_experiences, seeds=list(seeds),
                    strategies=list(strategies), max_train_per_exp=max_train_per_exp,
                    max_test_per_exp=max_test_per_exp, **asdict(config))  # fmt: skip
    results: dict[str, Any] = {}
    bar = tqdm(total=len(seeds) * len(strategies), desc="runs", unit="run", disable=not progress)
    with bar, quiet_avalanche():
        for seed in seeds:
            # online: the class stream, cut into mini-experiences by each run
            base_kind = "class" if kind == "online" else kind
            roots = {} if data_root is None else {"root": data_root}
            bench = make_stream(name, kind=base_kind, n_experiences=n_experiences, seed=seed,
                                max_train_per_exp=max_train_per_exp,
                                max_test_per_exp=max_test_per_exp, **roots)  # fmt: skip
            info = stream_info(bench, kind)
            settings["n_experiences"] = info.n_experiences
            for key in strategies:
                bar.set_postfix_str(f"{STRATEGIES[key]}, seed {seed}")
                record = _run_or_resume(key, seed, bench, info, config, run_dir, log_dir,
                                        progress)  # fmt: skip
                if "error" in record:
                    failures.append(record)
                else:
                    records[key].append(record)
                bar.update()
                results = _results(records, failures, settings, config,
                                   complete=bar.n == bar.total)  # fmt: skip
                if run_dir is not None:
                    atomic_write_json(run_dir / "results.json", results)
    return results


def _run_or_resume(key, seed, bench, info, config, run_dir, log_dir, progress) -> dict:
    """The seed record of (key, seed): read from ``run_dir/records`` or run (and saved)."""
    stem = f"{slug(key)}-seed{seed}"
    done = None if run_dir is None else run_dir / "records" / f"{stem}.json"
    if done is not None and done.is_file():
        return json.loads(done.read_text())
    checkpoint = None if run_dir is None else run_dir / "checkpoints" / f"{stem}.pkl"
    resuming = checkpoint is not None and checkpoint.is_file()
    with log_file(log_dir, f"{stem}.log", append=resuming) as log:
        try:
            record = run_strategy(key, bench, info, config, seed=seed, log=log,
                                  progress=progress, checkpoint=checkpoint)  # fmt: skip
        except NonFiniteLoss as err:
            logger.error("%s, seed %d: %s", STRATEGIES[key], seed, err)
            record = dict(strategy=key, seed=seed, error=f"NonFiniteLoss: {err}")
    if done is not None:
        atomic_write_json(done, record)
        checkpoint.unlink(missing_ok=True)
    return record


def _results(records, failures, settings, config, *, complete: bool) -> dict[str, Any]:
    joint = {r["seed"]: r["accuracy_matrix"][-1] for r in records.get("joint", [])}
    summaries = {STRATEGIES[k]: summarize(recs, joint_rows=joint)
                 for k, recs in records.items() if recs}  # fmt: skip
    return {"config": dict(settings), "environment": environment(config.device),
            "strategies": summaries, "failures": list(failures),
            "complete": complete}  # fmt: skip


def main(args: argparse.Namespace) -> int:
    if not hasattr(args, "run_dir"):
        check_arguments(args)
    config = ZooConfig(**{f.name: getattr(args, f.name) for f in fields(ZooConfig)})
    if args.nproc > 1 and distributed.world_size() == 1:  # start the ranks, same options
        return distributed.launch(args.nproc, relaunch_flags(args))
    distributed.init(args.seeds[0], args.device)
    ranks = distributed.world_size()  # --batch-size is the global batch: same steps as 1 process
    config = ZooConfig(**{**asdict(config), "device": distributed.local_device(config.device),
                          "batch_size": config.batch_size // ranks})  # fmt: skip
    main_rank = distributed.is_main()
    strategies = _strategies(args)
    if ranks > 1 and set(strategies) & STATISTICS_ONLY:  # each rank would see its share only
        skipped = sorted(set(strategies) & STATISTICS_ONLY)
        strategies = [s for s in strategies if s not in STATISTICS_ONLY]
        if main_rank:
            print(f"peer-ll run: {', '.join(skipped)} skipped: their statistics are not "
                  "data-parallel; run them without --nproc", file=sys.stderr)  # fmt: skip
    run_dir = (open_run_folder(args.run_dir, _settings(args), resume=args.resume,
                               force=args.force) if main_rank else None)  # fmt: skip
    with cpu_threads(args.threads):
        results = run_comparison(
            args.stream, strategies=strategies, seeds=args.seeds, config=config,
            n_experiences=args.experiences, max_train_per_exp=args.max_train_per_exp,
            max_test_per_exp=args.max_test_per_exp, run_dir=run_dir,
            data_root=args.data_root, data=getattr(args, "data", None), progress=main_rank,
        )  # fmt: skip
    if not main_rank:
        return 0
    results["config"]["processes"] = distributed.world_size()
    atomic_write_json(run_dir / "results.json", results)
    cfg = results["config"]
    print(f"\n{cfg['stream']}: {cfg['n_experiences']} experiences, seeds {cfg['seeds']}, "
          f"{config.epochs} epochs, replay budget {config.replay_budget}; "
          "accuracy in %, mean ± std over seeds")  # fmt: skip
    if results["strategies"]:
        table = results_table(results)
        atomic_write_text(run_dir / "table.txt", table + "\n")
        draw_run_plots(results, run_dir)
        print(table)
    for failure in results["failures"]:
        print(
            f"peer-ll run: error: {STRATEGIES[failure['strategy']]}, seed {failure['seed']}: "
            f"{failure['error']}",
            file=sys.stderr,
        )
    print(f"\nrun folder: {run_dir}")
    return 1 if results["failures"] else 0
