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

    python benchmarks/lm_query_overlap.py runs/lm-default-s0 --old 0 --new 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from peer_ll.cli.lm_pool import layer_queries
from peer_ll.experts.segment_init import kmeans
from peer_ll.models.lm import PEERLM


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


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished peer-ll lm run folder")
    ap.add_argument("--old", type=int, default=0, help="index of the old domain (0)")
    ap.add_argument("--new", type=int, default=1, help="index of the new domain (1)")
    ap.add_argument("--centroids", type=int, default=256, help="k-means centroids per domain")
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
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
