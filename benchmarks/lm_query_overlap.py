"""How far a ``peer-ll lm`` base model's queries tell two text domains apart, measured.

Growth into one pool with the base's query (``grow-pool --pool-query shared``) can give a
new domain its own experts only where its queries differ from the old domains': a new
sub-key wins a query region, whatever domain the query came from. This script measures
that limit on a finished run folder's base checkpoint: for every PEER layer and head, the
test blocks of two domains are split in halves (no block in both); ``--centroids`` k-means
centroids per domain are fit on the queries of one half, and each query of the other half
is assigned the domain of its nearest centroid. The accuracy (chance: 50 %) shows how far
sub-keys placed among the new domain's queries can avoid the old domain's (a nearest-
centroid rule, not a bound):

    python benchmarks/lm_query_overlap.py runs/lm-default-s0 --old 0 --new 1 [--probe]

``--probe`` adds what any routing rule of the layer's input could do: a logistic-regression
probe (trained on one half, tested on the other) on each PEER layer's inputs (D), and on
the inputs joined with their running mean over the context so far (a causal summary of
the block up to that token), overall and for tokens at position 32 or later.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from peer_ll.cli.lm_pool import layer_queries
from peer_ll.experts.segment_init import kmeans
from peer_ll.models.lm import PEERLM
from peer_ll.strategies.capture import PEERInputs


def nearest_centroid_accuracy(halves: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    """Held-out accuracy of telling domains apart by nearest centroid.

    halves: per domain, (fit, test) queries, (P, d) each; n centroids per domain.
    """
    cents = [kmeans(fit, n, iters=10) for fit, _ in halves]
    correct = total = 0
    for label, (_, test) in enumerate(halves):
        dist = torch.stack([torch.cdist(test, c).min(1).values for c in cents], 1)  # (P, 2)
        correct += int((dist.argmin(1) == label).sum())
        total += len(test)
    return correct / total


def layer_inputs(model: PEERLM, blocks: torch.Tensor) -> dict:
    """{PEER layer: (N, T, D) inputs} of the model's tokens on ``blocks`` (N, T + 1)."""
    watch = PEERInputs(model)
    watch.active = True
    out: dict = {}
    model.eval()
    try:
        with torch.no_grad():
            for batch in blocks.split(16):
                with watch.recording():
                    model(batch[:, :-1])
                for layer, (x, _) in watch.inputs.items():
                    out.setdefault(layer, []).append(x.reshape(len(batch), -1, x.shape[-1]))
    finally:
        watch.remove()
    return {layer: torch.cat(xs) for layer, xs in out.items()}


def with_running_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, T, 2D): each input joined with the mean of inputs 0..t."""
    count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
    return torch.cat([x, x.cumsum(1) / count], -1)


def probe_accuracy(
    halves: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int = 2000, late: int = 32
) -> tuple[float, float]:
    """Held-out accuracy of a logistic-regression probe telling the domains apart.

    halves: per domain, (fit, test) features, (N, T, F) each. Returns the accuracy over
    all test tokens and over those at position ``late`` or later.
    """
    feats = torch.cat([fit.flatten(0, 1) for fit, _ in halves])
    labels = torch.cat([torch.full((fit.shape[0] * fit.shape[1],), i) for i, (fit, _) in
                        enumerate(halves)])  # fmt: skip
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    probe = torch.nn.Linear(feats.shape[1], len(halves))
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(len(feats), (2048,), generator=gen)
        loss = torch.nn.functional.cross_entropy(probe((feats[pick] - mean) / std), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    right = []
    with torch.no_grad():
        for i, (_, test) in enumerate(halves):
            right.append(probe((test - mean) / std).argmax(-1) == i)  # (N, T)
    right = torch.cat(right)
    return float(right.float().mean()), float(right[:, late:].float().mean())


def _percents(accuracies: tuple[float, ...]) -> str:
    """Accuracies as "70 % / 73 %"; "n/a" for a NaN (no token late enough)."""
    return " / ".join("n/a" if a != a else f"{100 * a:.0f} %" for a in accuracies)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished peer-ll lm run folder")
    ap.add_argument("--old", type=int, default=0, help="index of the old domain (0)")
    ap.add_argument("--new", type=int, default=1, help="index of the new domain (1)")
    ap.add_argument("--centroids", type=int, default=256, help="k-means centroids per domain")
    ap.add_argument("--probe", action="store_true", help="also probe the layers' inputs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = Path(args.run)
    tests = list(torch.load(run / "eval_blocks.pt").values())
    model = PEERLM.load(next((run / "checkpoints").glob("base-0-*.pt")))
    halves = []  # per domain: ({layer: fit queries}, {layer: test queries})
    for i in (args.old, args.new):
        half = len(tests[i]) // 2
        batches = max(1, half // 16)  # 16 blocks a batch, each block at most once
        halves.append(
            tuple(
                layer_queries(model, b, batches=batches) for b in (tests[i][:half], tests[i][half:])
            )
        )
    lines = [f"| PEER layer | heads: nearest-centroid accuracy, domain {args.old} vs "
             f"{args.new} (chance 50 %) |", "|---|---|"]  # fmt: skip
    for i, layer in enumerate(model.peer_layers):
        accs = []
        for h in range(layer.heads):  # queries (N, H, d) -> (N, d) of head h
            per_head = [(fit[layer][:, h], test[layer][:, h]) for fit, test in halves]
            accs.append(nearest_centroid_accuracy(per_head, args.centroids))
        lines.append(f"| {i} | " + ", ".join(f"{100 * a:.0f} %" for a in accs) + " |")
    if args.probe:
        inputs = [[layer_inputs(model, b) for b in (t[: len(t) // 2], t[len(t) // 2 :])]
                  for t in (tests[args.old], tests[args.new])]  # fmt: skip
        lines += ["", "| PEER layer | linear probe on inputs (all / position ≥ 32) | "
                  "inputs + running mean (all / position ≥ 32) |", "|---|---|---|"]  # fmt: skip
        for i, layer in enumerate(model.peer_layers):
            plain = [(fit[layer], test[layer]) for fit, test in inputs]
            ctx = [(with_running_mean(f), with_running_mean(t)) for f, t in plain]
            lines.append(f"| {i} | {_percents(probe_accuracy(plain))} | "
                         f"{_percents(probe_accuracy(ctx))} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
