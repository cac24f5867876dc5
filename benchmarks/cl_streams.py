"""Continual-learning comparison on three Fashion-MNIST streams, 3 seeds.

Streams (``peer_ll.data.make_stream``):
- Split-Fashion-MNIST, class-incremental, 5 experiences × 2 classes;
- Split-Fashion-MNIST, task-incremental (one head per task), 5 × 2 classes;
- Permuted Fashion-MNIST, domain-incremental, 10 experiences.

Every strategy of ``peer_ll.cli.strategies_zoo`` (the twelve of ``peer-ll run``, "PEER
growth, no replay" and the other routing-protection variants) trains with the same
epochs, learning rate and replay budget. To fit a 2-core CPU each training experience
is subsampled (default 2,000 images, balanced over classes) and each test experience too
(default 1,000).

Each stream's run folder (results.json, plots, logs) goes under ``--out``; the tables,
the gaps of the PEER strategies to the baselines and the routing drift are printed
and appended to benchmarks/RESULTS.md under its ``## `` heading (``peer_ll.cli.results``).

    python benchmarks/cl_streams.py                      # the full comparison
    python benchmarks/cl_streams.py --seeds 1 --epochs 1 --max-train-per-exp 200  # smoke
    python benchmarks/cl_streams.py --from-runs runs/cl_streams   # re-report finished runs
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from peer_ll.cli.compare import parse_seeds, run_comparison
from peer_ll.cli.harness import cpu_threads
from peer_ll.cli.results import environment_line, write_section
from peer_ll.cli.strategies_zoo import NON_PEER_BASELINES, STRATEGIES, ZooConfig
from peer_ll.evaluation.plots import draw_run_plots
from peer_ll.evaluation.report import load_results, results_table, write_results

STREAMS = {
    "fashion-mnist-class": "Split-Fashion-MNIST, class-incremental, 5 × 2 classes",
    "fashion-mnist-task": "Split-Fashion-MNIST, task-incremental, 5 × 2 classes",
    "fashion-mnist-permuted": "Permuted Fashion-MNIST, domain-incremental, 10 experiences",
}
PEER = (
    "PEER growth",
    "PEER growth + RD",
    "PEER sparse FT",
    "PEER growth, no replay",
    "PEER protect (full)",
    "PEER protect",
    "PEER protect + gate",
    "PEER protect, input owners",
)
BASELINES = ("Naive", "EWC", "LwF", "Replay", "Joint")
#: Replay-free baselines without a PEER pool (peer_ll.cli.strategies_zoo.NON_PEER_BASELINES).
NON_PEER = tuple(STRATEGIES[k] for k in NON_PEER_BASELINES)
HEADING = "## Continual learning on Fashion-MNIST streams (benchmarks/cl_streams.py)"


def gaps_table(results: dict) -> str:
    """Markdown: each PEER strategy's average accuracy and forgetting minus each baseline's."""
    s = results["strategies"]
    base = [b for b in BASELINES if b in s]
    if not base:
        return ""
    head = "| PEER strategy | " + " | ".join(f"Δacc vs {b}" for b in base)
    head += " | " + " | ".join(f"Δforg vs {b}" for b in base if b != "Joint") + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(base) - ("Joint" in base))]
    for name in (p for p in PEER if p in s):
        acc = [100 * (s[name]["avg_accuracy"] - s[b]["avg_accuracy"]) for b in base]
        forg = [100 * (s[name]["forgetting"] - s[b]["forgetting"]) for b in base if b != "Joint"]
        lines.append(f"| {name} | " + " | ".join(f"{v:+.1f}" for v in [*acc, *forg]) + " |")
    return "\n".join(lines)


def pool_gain(results: dict, name: str = "PEER protect (full)") -> str:
    """One sentence: ``name``'s accuracy and what it adds over the best non-PEER baseline."""
    s = results["strategies"]
    base = [b for b in NON_PEER if b in s]
    if name not in s or not base:
        return ""
    best = max(base, key=lambda b: s[b]["avg_accuracy"])
    acc, ref = 100 * s[name]["avg_accuracy"], 100 * s[best]["avg_accuracy"]
    gain = f"adds {acc - ref:.1f} points over" if acc >= ref else f"loses {ref - acc:.1f} points to"
    return (f"{name} {acc:.1f} %: the PEER pool {gain} the best replay-free baseline "
            f"without a pool, {best} ({ref:.1f} %).")  # fmt: skip


def drift_table(results: dict) -> str:
    """Markdown: where the inputs of old experiences route after the last experience."""
    lines = ["| strategy | own owner | older owners | newer owners |", "|---|---|---|---|"]
    for name, s in results["strategies"].items():
        for layer, stats in (s.get("routing") or {}).items():
            share = np.asarray(stats["share"], dtype=float)
            if share.shape[1] < 2:
                continue
            t = share.shape[0] - 1  # the experiences before the last
            own = np.mean([share[j, j] for j in range(t)])
            older = np.mean([share[j, :j].sum() for j in range(t)])
            newer = np.mean([share[j, j + 1 :].sum() for j in range(t)])
            lines.append(f"| {name} ({layer}) | {100 * own:.0f} % | {100 * older:.0f} % | "
                         f"{100 * newer:.0f} % |")  # fmt: skip
    return "\n".join(lines)


def section(all_results: dict[str, dict], command: str) -> str:
    """The RESULTS.md text (under :data:`HEADING`) for the finished streams."""
    first = next(iter(all_results.values()))
    env, cfg = first["environment"], first["config"]
    out = [
        f"Command: `{command}`  ",
        environment_line(env) + "  ",
        f"Settings: seeds {cfg['seeds']}; {cfg['epochs']} epochs; Adam lr {cfg['lr']}; "
        f"batch {cfg['batch_size']}; replay budget {cfg['replay_budget']} samples (Replay and "
        "the PEER strategies except 'no replay'); hidden {h}; {n}² experts per growth "
        "segment, fixed pools of about the final grown size; subsampled to "
        f"{cfg['max_train_per_exp']} training and {cfg['max_test_per_exp']} test images "
        "per experience. Accuracy in %, mean ± sample std over seeds; forgetting is "
        "Chaudhry et al.'s (max); intransigence against Joint of the same seed.".format(
            h=cfg["hidden"], n=cfg["num_keys"]),
    ]  # fmt: skip
    for stream, results in all_results.items():
        gaps = gaps_table(results)
        out += [
            "",
            f"### {STREAMS.get(stream, stream)}",
            "",
            pool_gain(results),
            "",
            results_table(results, markdown=True),
        ]
        if gaps:
            out += [
                "",
                "PEER strategies minus baselines (points; Δforg < 0 is less forgetting):",
                "",
                gaps,
            ]
        out += ["",
                "Routing of the inputs of experiences 0..T-2 after the last experience "
                "(share of router mass, mean over those experiences and seeds):", "",
                drift_table(results)]  # fmt: skip
    return "\n".join(out) + "\n"


def _run_or_load(stream: str, args, all_results: dict) -> None:
    """Runs one stream (or loads its finished run with --from-runs) into ``all_results``."""
    if args.from_runs:
        path = Path(args.from_runs) / stream
        if (path / "results.json").is_file():
            all_results[stream] = load_results(path)
        return
    config = ZooConfig(epochs=args.epochs, hidden=args.hidden)
    results = run_comparison(
        stream, strategies=args.strategies.split(","), seeds=parse_seeds(args.seeds),
        config=config, max_train_per_exp=args.max_train_per_exp,
        max_test_per_exp=args.max_test_per_exp, log_dir=Path(args.out) / stream / "logs",
    )  # fmt: skip
    write_results(Path(args.out) / stream, results)
    draw_run_plots(results, Path(args.out) / stream)
    all_results[stream] = results
    print(f"\n{STREAMS.get(stream, stream)}\n{results_table(results)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-train-per-exp", type=int, default=2000)
    parser.add_argument("--max-test-per-exp", type=int, default=1000)
    parser.add_argument("--out", default="runs/cl_streams")
    parser.add_argument("--from-runs", default=None, help="report the run folders found here")
    parser.add_argument("--no-append", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    all_results = {}
    with cpu_threads(args.threads):
        for stream in args.streams.split(","):
            _run_or_load(stream, args, all_results)
    if not all_results:
        print("no finished stream to report")
        return 1
    given = sys.argv[1:] if argv is None else argv
    text = section(all_results, f"python benchmarks/cl_streams.py {shlex.join(given)}".strip())
    print(f"\n{HEADING}\n\n{text}")
    if not args.no_append:
        write_section(Path(__file__).with_name("RESULTS.md"), HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
