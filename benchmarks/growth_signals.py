"""Which novelty signal finds the task boundaries of an online stream, and stays quiet
on a stationary one: input statistics, query likelihood, retrieval margin, loss jump.

Prequential and boundary-free: a PEERClassifier (one PEER layer, no growth) trains one
Adam step per mini-batch of ``--batch-size``, and before each step four signals are
taken on the new mini-batch, each relative to what came before (1: as usual):

- **input**: mean squared z-score of the inputs under a running diagonal Gaussian of
  every input seen so far, over the same for the seen inputs (``NoveltyTrigger``'s score,
  one owner);
- **query**: the same for the PEER layer's queries (query likelihood);
- **margin**: running mean of the retrieval margin (k-th minus (k+1)-th score,
  ``retrieval_confidence``) over the batch's mean margin (a drop is novel);
- **loss**: ``LossJumpTrigger``'s signal, the batch's mean loss over the mean loss of
  the ``window`` = 200 inputs before it.

Streams: class-incremental Fashion-MNIST (5 experiences of 2 classes,
``--per-exp`` samples each) cut into mini-batches, and a stationary one (the whole
training set shuffled, the same number of mini-batches). Reported per signal: AUROC of
the first mini-batch after each boundary against the other mini-batches (after the first
experience), and with the threshold set at the lowest boundary signal (so every boundary
fires): false alarms within experiences and on the stationary stream.

    PYTHONPATH=. python benchmarks/growth_signals.py --seeds 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from peer_ll.cli.results import environment_line, write_section
from peer_ll.data.images import load_images
from peer_ll.experts import peer_layers
from peer_ll.models import PEERClassifier
from peer_ll.optim import make_optimizer
from peer_ll.protect.routed import layer_input
from peer_ll.strategies import LossJumpTrigger

SIGNALS = ("input", "query", "margin", "loss")


class Running:
    """Running diagonal Gaussian; score: mean z² of a batch over the seen data's."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def score(self, x: torch.Tensor, floor: float = 0.01) -> float:
        mean = self.s / self.n
        var = (self.ss / self.n - mean**2).clamp_min(0)
        own = (var / (var + floor)).mean()
        return float(((x.double() - mean) ** 2 / (var + floor)).mean() / own)

    def add(self, x: torch.Tensor) -> None:
        self.n += len(x)
        self.s = self.s + x.double().sum(0)
        self.ss = self.ss + x.double().pow(2).sum(0)


def run_stream(batches, seed: int) -> dict[str, list[float]]:
    """Signals (one per mini-batch, NaN for the first) of a prequential pass."""
    torch.manual_seed(seed)
    model = PEERClassifier(784, 10, hidden=64)
    layer = next(iter(peer_layers(model).values()))
    opt = make_optimizer(model, lr=1e-3)
    stats = {"input": Running(), "query": Running()}
    margins: list[float] = []
    jump = LossJumpTrigger(model, window=200, threshold=1e9, cooldown=0)
    out = {s: [] for s in SIGNALS}
    for x, y in batches:
        model.eval()
        with torch.no_grad():
            h = layer_input(model, layer, x)
            q = layer.query(h).flatten(1)
            margin = float(layer.retrieval_confidence(h)["margin"].nanmean())
        feats = {"input": x, "query": q}
        for s in ("input", "query"):
            out[s].append(stats[s].score(feats[s]) if stats[s].n else float("nan"))
            stats[s].add(feats[s])
        out["margin"].append(np.mean(margins) / margin if margins else float("nan"))
        signal = jump.observe(x, y).signal
        out["loss"].append(float("nan") if signal is None else signal)
        margins.append(margin)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return out


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half."""
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def one_seed(seed: int, args) -> dict:
    splits = load_images("fashion-mnist", seed=seed)
    x = torch.tensor(np.asarray(splits.train_images), dtype=torch.float32).flatten(1)
    x, y = x / splits.max_value, torch.tensor(np.asarray(splits.train_labels)).long()
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(10, generator=g).view(5, 2)
    online, first = [], []
    for pair in classes:
        idx = torch.nonzero((y[:, None] == pair[None]).any(1)).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)[: args.per_exp]]
        first.append(len(online))
        online += [(x[b], y[b]) for b in idx.split(args.batch_size)]
    order = torch.randperm(len(x), generator=g)[: len(online) * args.batch_size]
    stationary = [(x[b], y[b]) for b in order.split(args.batch_size)]
    on, st = run_stream(online, seed), run_stream(stationary, seed)
    boundary = np.array(first[1:])
    inside = np.array([i for i in range(first[1], len(online)) if i not in first])
    cool = args.cooldown // args.batch_size  # batches a trigger ignores after a growth
    far = np.array([i for i in inside if min(i - f for f in first if f <= i) > cool])
    res = {}
    for s in SIGNALS:
        sig, calm = np.array(on[s]), np.array(st[s])[first[1] :]
        threshold = sig[boundary].min()
        res[s] = dict(auroc=auroc(sig[boundary], sig[inside]),
                      false_inside=int((sig[inside] >= threshold).sum()),
                      false_far=int((sig[far] >= threshold).sum()),
                      false_stationary=int((calm >= threshold).sum()),
                      boundary=sig[boundary].round(2).tolist(),
                      inside_p95=float(np.quantile(sig[inside], 0.95)),
                      stationary_max=float(calm.max()))  # fmt: skip
    return dict(seed=seed, n=len(online), inside=len(inside), far=len(far),
                calm=len(online) - first[1],
                **res)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-exp", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cooldown", type=int, default=500, help="inputs (NoveltyTrigger's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [one_seed(s, args) for s in range(args.seeds)]
    lines = ["| signal | seed | AUROC boundary vs within | boundary signals | within, 95th pct "
             "| stationary, max | false alarms (threshold: lowest boundary) within / within "
             f"beyond a {args.cooldown}-input cooldown / stationary |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in SIGNALS:
        for r in rows:
            v = r[s]
            lines.append(f"| {s} | {r['seed']} | {v['auroc']:.2f} | {v['boundary']} | "
                         f"{v['inside_p95']:.2f} | {v['stationary_max']:.2f} | "
                         f"{v['false_inside']} of {r['inside']} / {v['false_far']} of "
                         f"{r['far']} / {v['false_stationary']} of {r['calm']} |")  # fmt: skip
    means = [f"{s} {np.mean([r[s]['auroc'] for r in rows]):.2f}" for s in SIGNALS]
    summary = (f"Mean AUROC over {len(rows)} seeds (1: every boundary mini-batch scores above "
               f"every other): {', '.join(means)}.")  # fmt: skip
    text = "\n".join([
        f"Command: `PYTHONPATH=. python benchmarks/growth_signals.py --seeds {args.seeds} "
        f"--per-exp {args.per_exp} --batch-size {args.batch_size} --cooldown {args.cooldown}` "
        "(class-incremental "
        "Fashion-MNIST, 5 × 2 classes, one Adam step per mini-batch, no growth; "
        "stationary: the training set shuffled)",
        environment_line(), "", summary, "", *lines,
    ])  # fmt: skip
    print(text)
    write_section("benchmarks/RESULTS.md", "## Growth signals (online Split-Fashion-MNIST)", text)


if __name__ == "__main__":
    main()
