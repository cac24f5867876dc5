"""Task-free growth on an online Split-Fashion-MNIST stream, and false growth when stationary.

1. ``peer-ll run``'s ``fashion-mnist-online`` stream (class-incremental, 5 experiences of
   2 classes, cut into mini-experiences of ``--batch-size``, one pass): ``peer-grow``
   given the boundaries against ``peer-grow-online`` (NoveltyTrigger, no boundaries),
   with final accuracy, pool size and per-owner routing load (paper Table 2 usage and
   unevenness after the last experience, averaged over the test experiences).
2. A stationary stream: the whole training set shuffled into 30 mini-experiences; the
   NoveltyTrigger's growths are counted (the goal: at most one).

    PYTHONPATH=. python benchmarks/task_free_growth.py --seeds 3 --max-train-per-exp 2000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from peer_ll.cli.compare import run_comparison
from peer_ll.cli.results import environment_line, write_section
from peer_ll.cli.strategies_zoo import ZooConfig
from peer_ll.data.images import load_images
from peer_ll.strategies import NoveltyTrigger

KEYS = ("peer-grow", "peer-grow-online")


def stationary_growths(seed: int, size: int) -> int:
    """Growths of a NoveltyTrigger over 30 shuffled mini-experiences of one distribution."""
    splits = load_images("fashion-mnist", seed=seed)
    x = torch.tensor(np.asarray(splits.train_images), dtype=torch.float32)
    x = x.flatten(1) / splits.max_value
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: 30 * size]
    trigger = NoveltyTrigger()
    return sum(trigger.observe(b).grow for b in x[order].split(size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-train-per-exp", type=int, default=2000)
    parser.add_argument("--max-test-per-exp", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    config = ZooConfig(batch_size=args.batch_size)
    res = run_comparison("fashion-mnist-online", strategies=KEYS, seeds=seeds, config=config,
                         max_train_per_exp=args.max_train_per_exp,
                         max_test_per_exp=args.max_test_per_exp, progress=False)  # fmt: skip
    lines = ["| strategy | final avg acc % | owners (segments) | params | usage | unevenness | "
             "share of the newest owner, per test experience |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, summary in res["strategies"].items():
        for rec in summary["per_seed"]:
            (layer,) = rec["routing"].values()
            lines.append(
                f"| {name}, seed {rec['seed']} | {100 * rec['avg_accuracy']:.1f} | "
                f"{len(layer['owners'])} | {rec['params_total']} | "
                f"{np.mean(layer['usage']):.3f} | {np.mean(layer['unevenness']):.3f} | "
                f"{[round(row[-1], 2) for row in layer['share']]} |"
            )
    acc = {n: 100 * s["avg_accuracy"] for n, s in res["strategies"].items()}
    acc_std = {n: 100 * s["avg_accuracy_std"] for n, s in res["strategies"].items()}
    params = {n: s["params_total"] for n, s in res["strategies"].items()}
    ref, free = "PEER growth", "PEER task-free growth"
    stationary = [stationary_growths(s, args.batch_size) for s in seeds]
    summary = (
        f"Mean over seeds {seeds}: given the boundaries {acc[ref]:.1f} ± {acc_std[ref]:.1f} %, "
        f"task-free {acc[free]:.1f} ± {acc_std[free]:.1f} % (gap {acc[ref] - acc[free]:+.1f} "
        f"points; goal: within 2); parameters task-free / boundaries "
        f"{params[free] / params[ref]:.2f}× (goal: at most 1.5×). Stationary stream (30 "
        f"mini-experiences of {args.batch_size}): growths per seed {stationary} (goal: at most 1)."
    )
    text = "\n".join([
        f"Command: `PYTHONPATH=. python benchmarks/task_free_growth.py --seeds {args.seeds} "
        f"--max-train-per-exp {args.max_train_per_exp} --max-test-per-exp "
        f"{args.max_test_per_exp} --batch-size {args.batch_size}`",
        environment_line(), "", summary, "", *lines,
    ])  # fmt: skip
    print(text)
    write_section("benchmarks/RESULTS.md", "## Task-free growth (online Split-Fashion-MNIST)", text)


if __name__ == "__main__":
    main()
