"""Retrieval insurance on class-incremental Split-Fashion-MNIST (or Split-Digits).

Trains ``peer-protect`` (grow-and-freeze, owners inferred from query likelihood) on
the class-incremental stream, then evaluates the whole test set twice: the plain
argmax-owner route, and :func:`peer_ll.protect.insurance.insured_forward` with the
threshold at the 10th percentile of the owner posterior's confidence (so the least
certain 10 % pay for ``--top`` routes). With ``--mode typical`` each owner's
:class:`~peer_ll.protect.insurance.RouteTypicality` is fit on its experience's training
data right after that experience (its route and the trunk are frozen from then on), and
a paying input keeps the most typical of its ``--top`` routes. Reported: error on that
bottom 10 % with and without insurance, accuracy on the whole test set, routes per input
and wall time of a pass over the test set (median of 9, interleaved).

    PYTHONPATH=. python benchmarks/insurance.py --seeds 3 --max-train-per-exp 1000
"""

from __future__ import annotations

import argparse
import time

import torch

from peer_ll.cli.results import environment_line, write_section
from peer_ll.cli.strategies_zoo import ZooConfig, build_strategy, stream_info
from peer_ll.data import make_stream
from peer_ll.protect.insurance import RouteTypicality, insured_forward, owner_posterior


def tensors(experiences) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened inputs (N, F) and labels (N,) of the experiences' datasets."""
    xs, ys = [], []
    for exp in experiences:
        for i in range(len(exp.dataset)):
            x, y = exp.dataset[i][:2]
            xs.append(torch.as_tensor(x).flatten())
            ys.append(int(y))
    return torch.stack(xs).float(), torch.tensor(ys)


def timed(calls, repeats: int = 9) -> tuple[list, list[float]]:
    """Each call's result and median wall time (s), the calls interleaved ``repeats`` times.

    Interleaving keeps a shared machine's load drift out of the ratio of the times.
    """
    times = [[] for _ in calls]
    for _ in range(repeats):
        outs = []
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            outs.append(call())
            spent.append(time.perf_counter() - start)
    return outs, [sorted(t)[len(t) // 2] for t in times]


NAMES = {"fashion-mnist": "Fashion-MNIST", "digits": "Digits"}


def one_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    limits = (
        dict(max_train_per_exp=args.max_train_per_exp, max_test_per_exp=args.max_test_per_exp)
        if args.dataset != "digits"
        else {}
    )
    bench = make_stream(args.dataset, kind="class", seed=seed, **limits)  # fmt: skip
    info = stream_info(bench, "class")
    strategy = build_strategy("peer-protect", info, ZooConfig(epochs=args.epochs))
    evidence = RouteTypicality()
    for owner, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        if args.mode == "typical":
            xs, ys = tensors([exp])
            evidence.fit(strategy.model.model.eval(), owner, xs, ys)
    routed = strategy.model.eval()
    x, y = tensors(bench.test_stream)
    _, post = owner_posterior(routed, x)
    conf = post.max(1).values
    threshold = float(conf.quantile(0.10))
    low = conf < threshold
    ((plain, _), (insured, report)), (t_plain, t_insured) = timed([
        lambda: insured_forward(routed, x, threshold=0.0),
        lambda: insured_forward(routed, x, threshold=threshold, top=args.top, mode=args.mode,
                                evidence=evidence),
    ])  # fmt: skip
    wrong_plain, wrong_ins = plain.argmax(1) != y, insured.argmax(1) != y
    return dict(
        seed=seed,
        share=report.share,
        routes=report.routes_per_input,
        err_low_plain=float(wrong_plain[low].float().mean()),
        err_low_ins=float(wrong_ins[low].float().mean()),
        acc_plain=1 - float(wrong_plain.float().mean()),
        acc_ins=1 - float(wrong_ins.float().mean()),
        time_ratio=t_insured / t_plain,
        ms_plain=1000 * t_plain,
        ms_insured=1000 * t_insured,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-train-per-exp", type=int, default=1000)
    parser.add_argument("--max-test-per-exp", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--mode", default="mix", choices=("mix", "wide", "typical"))
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [one_seed(s, args) for s in range(args.seeds)]
    lines = ["| seed | share paying | routes/input | bottom-10 % error, plain → insured | "
             "relative fall | test acc plain → insured | "
             "wall time of a test pass, plain → insured |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        fall = 1 - r["err_low_ins"] / max(r["err_low_plain"], 1e-12)
        lines.append(
            f"| {r['seed']} | {100 * r['share']:.1f} % | {r['routes']:.2f} | "
            f"{100 * r['err_low_plain']:.1f} → {100 * r['err_low_ins']:.1f} % | "
            f"{100 * fall:.0f} % | {100 * r['acc_plain']:.1f} → {100 * r['acc_ins']:.1f} % | "
            f"{r['ms_plain']:.0f} → {r['ms_insured']:.0f} ms (×{r['time_ratio']:.2f}) |"
        )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "seed"}
    fall = 1 - mean["err_low_ins"] / max(mean["err_low_plain"], 1e-12)
    summary = (
        f"Mean over {len(rows)} seeds: bottom-10 % error {100 * mean['err_low_plain']:.1f} → "
        f"{100 * mean['err_low_ins']:.1f} % ({100 * fall:.0f} % relative fall; goal: at least "
        f"20 %), {mean['routes']:.2f} routes per input (goal: at most 1.20), wall time "
        f"×{mean['time_ratio']:.2f} (one forward per owner present; see the table)."
    )
    text = "\n".join([
        f"Command: `PYTHONPATH=. python benchmarks/insurance.py --seeds {args.seeds} "
        f"--max-train-per-exp {args.max_train_per_exp} --max-test-per-exp "
        f"{args.max_test_per_exp} --epochs {args.epochs} --top {args.top} --mode {args.mode} "
        f"--dataset {args.dataset}` (peer-protect, query-likelihood owners, "
        f"Split-{NAMES[args.dataset]} class-incremental, 5 × 2 classes"
        + (", whole sets" if args.dataset == "digits" else "") + ")",
        environment_line(), "", summary, "", *lines,
    ])  # fmt: skip
    print(text)
    write_section("benchmarks/RESULTS.md", "## Retrieval insurance (classification)", text)


if __name__ == "__main__":
    main()
