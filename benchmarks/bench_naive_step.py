"""Training step of the Naive PEERClassifier: this checkout against older ones, interleaved.

The model is ``peer-ll run``'s Naive model on Split-Digits: 64 inputs, 10 classes, hidden
64, one PEER block of round(16·√5)² = 36² experts, an incremental head, a growth policy
that never grows, ``make_optimizer(lr=1e-3)``, mini-batches of 32. Each checkout runs in
a worker process of its own (``PYTHONPATH`` set to it, one thread); the workers take turns,
a round of steps each, in rotating order, so all see the same machine load. Times are the
worker thread's CPU time (``time.thread_time``), which waiting for a core on a shared
machine does not inflate; wall time is shown beside. Reported: medians over steps, the
ratio of the medians against the first checkout, and the median and range of the
per-round ratios. Then torch.profiler (with Python stacks) runs 5 steps in each worker and
counts the aten ops per step, and those whose stack passes through per-owner statistics
code (``owner_stats.py``, ``query_stats.py``, ``input_stats.py``, ``_record_query_stats``).

Usage:
    python benchmarks/bench_naive_step.py --other pre=../checkout-a [--other mid=../b]
        [--rounds 40 --steps 25] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
OWNER_STATS = ("owner_stats.py", "query_stats.py", "input_stats.py", "_record_query_stats")
HEADING = "## Naive PEERClassifier training step: no per-owner statistics (design, #12)"


# ----------------------------------------------------------------------------- worker
def _build():
    import torch

    from peer_ll.optim import make_optimizer
    from peer_ll.strategies import GrowthPolicy

    torch.manual_seed(0)
    kwargs = dict(hidden=64, peer={"num_keys": 36}, head="incremental")
    never = GrowthPolicy(when="never")
    try:
        from peer_ll.strategies import peer_classifier  # after the design change
    except ImportError:
        from peer_ll.models.classifier import PEERClassifier

        model = PEERClassifier(64, 10, growth=never, **kwargs)
    else:
        model = peer_classifier(64, 10, growth=never, **kwargs)
    return model.train(), make_optimizer(model, lr=1e-3)


def _worker() -> None:
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model, opt = _build()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    def step() -> tuple[float, float, float]:  # thread CPU time: step, forward+backward; wall
        wall, start = time.perf_counter(), time.thread_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        middle = time.thread_time()
        opt.step()
        return time.thread_time() - start, middle - start, time.perf_counter() - wall

    import peer_ll

    print(json.dumps({"peer_ll": peer_ll.__file__}), flush=True)
    for line in sys.stdin:
        command, n = line.split()
        if command == "run":
            times = [step() for _ in range(int(n))]
            print(
                json.dumps(
                    {k: [t[i] for t in times] for i, k in enumerate(("step", "fb", "wall"))}
                ),
                flush=True,
            )
        else:  # "profile": ops per step, and those under per-owner statistics code
            from torch._C._profiler import _ExperimentalConfig
            from torch.profiler import ProfilerActivity, profile

            with profile(
                activities=[ProfilerActivity.CPU],
                with_stack=True,
                experimental_config=_ExperimentalConfig(verbose=True),
            ) as prof:
                for _ in range(int(n)):
                    step()
            events = [e for e in prof.events() if e.name.startswith("aten::") and e.stack]
            hits = [e for e in events if any(m in f for f in e.stack for m in OWNER_STATS)]
            names = sorted({e.name for e in hits})
            print(
                json.dumps(
                    {
                        "ops": len(events) / int(n),
                        "owner_stats_ops": len(hits) / int(n),
                        "names": names[:8],
                    }
                ),
                flush=True,
            )


# ----------------------------------------------------------------------------- driver
class Worker:
    def __init__(self, checkout: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        found = Path(self._read()["peer_ll"]).resolve()
        if checkout.resolve() not in found.parents:
            raise SystemExit(f"worker imported peer_ll from {found}, not from {checkout}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("a worker stopped (see its error above)")
        return json.loads(line)

    def ask(self, command: str, n: int) -> dict:
        self.proc.stdin.write(f"{command} {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    if "--worker" in sys.argv:
        return _worker()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--other",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="an older checkout to compare with (repeatable; the first is "
        "the baseline of the ratios)",
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=25, help="steps per round and worker")
    parser.add_argument("--results", default=None, help="write the section into this file")
    args = parser.parse_args()
    checkouts = dict(o.split("=", 1) for o in args.other)
    workers = {k: Worker(Path(p)) for k, p in checkouts.items()}
    workers["this"] = Worker(HERE.parents[1])
    labels = list(workers)
    base = labels[0]
    for w in workers.values():
        w.ask("run", 20)  # warm-up: allocations, optimizer state
    times = {k: {"step": [], "fb": [], "wall": []} for k in workers}
    ratios = {k: [] for k in labels[1:]}
    for r in range(args.rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate who goes first
        got = {k: workers[k].ask("run", args.steps) for k in order}
        for k, v in got.items():
            times[k]["step"] += v["step"]
            times[k]["fb"] += v["fb"]
            times[k]["wall"] += v["wall"]
        for k in ratios:
            ratios[k].append(
                statistics.median(got[base]["step"]) / statistics.median(got[k]["step"])
            )
    prof = {k: w.ask("profile", 5) for k, w in workers.items()}
    for w in workers.values():
        w.close()
    ms = {k: {p: statistics.median(v) * 1e3 for p, v in t.items()} for k, t in times.items()}
    n = args.rounds * args.steps
    others = " ".join(f"--other {k}=<checkout of {k}>" for k in checkouts)
    text = (
        f"`python benchmarks/bench_naive_step.py {others} --rounds {args.rounds} --steps "
        f"{args.steps}` (one thread, {n} steps per checkout, interleaved in rounds of "
        f"{args.steps}): medians in ms of thread CPU time (wall time beside); speed-up "
        f"against `{base}`: ratio of the medians (per-round ratios: median, range).\n\n"
        "| checkout | step | forward+backward | step (wall) | step speed-up "
        "| forward+backward speed-up | aten ops per step | of them per-owner statistics |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )

    def speed_up(k: str) -> str:
        if k == base:
            return "1"
        r = ratios[k]
        return (
            f"{ms[base]['step'] / ms[k]['step']:.2f}x ({statistics.median(r):.2f}x, "
            f"{min(r):.2f}-{max(r):.2f})"
        )

    for k in labels:
        text += (
            f"| {k} | {ms[k]['step']:.2f} | {ms[k]['fb']:.2f} | {ms[k]['wall']:.2f} | "
            f"{speed_up(k)} | {ms[base]['fb'] / ms[k]['fb']:.2f}x | {prof[k]['ops']:.0f} | "
            f"{prof[k]['owner_stats_ops']:.0f} |\n"
        )
    text += (
        "\nPer-owner statistics ops seen: "
        + "; ".join(f"{k}: {', '.join(prof[k]['names']) or 'none'}" for k in labels)
        + ".\n"
    )
    print(text)
    if args.results:
        from peer_ll.cli.results import write_section

        write_section(args.results, HEADING, text, replace=True)


if __name__ == "__main__":
    main()
