"""CPU training step of one PEER layer: in-place lazy AdamW against the gather/scatter path.

Both optimizers drive the same layer (dim 256, 1024² experts, heads 8, topk 16, dim_key
128, 1024 tokens) and alternate step by step in one process, with a copy-bandwidth
measurement between steps, so all of them see the same machine load; the figures are
medians over steps. The floor of a step is (6·A + 14·R) × dim × 4 bytes at the median
copy bandwidth (see bench_layer.py).

Usage:
    python benchmarks/bench_step.py [--threads 1] [--steps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_layer import DIM, DIM_KEY, HEADS, TOPK, copy_bandwidth

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = PEER(DIM, num_keys=args.keys, heads=HEADS, topk=TOPK, dim_key=DIM_KEY)
    optimizers = {b: make_optimizer(layer, lr=1e-3, backend=b) for b in ("auto", "torch")}
    x = torch.randn(args.tokens, DIM)
    step = {b: [] for b in optimizers}
    update = {b: [] for b in optimizers}
    forward_backward, bandwidth = [], []
    for i in range(args.steps + 1):  # the first round allocates state: not counted
        for backend, opt in optimizers.items():
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            layer(x).square().mean().backward()
            middle = time.perf_counter()
            opt.step()
            stop = time.perf_counter()
            if i:
                step[backend].append(stop - start)
                update[backend].append(stop - middle)
                forward_backward.append(middle - start)
        if i:
            bandwidth.append(copy_bandwidth(repeats=1))
    with torch.no_grad():
        _, ids = layer.retrieve(x)
    A, R = ids.numel(), int(torch.unique(ids).numel())
    bw = statistics.median(bandwidth)
    floor = (6 * A + 14 * R) * DIM * 4 / bw

    def ms(values):
        return statistics.median(values) * 1e3

    print(
        f"{args.threads} thread(s), {args.keys}² experts, {args.tokens} tokens, medians of "
        f"{args.steps} steps: A = {A:,}, R = {R:,}, copy bandwidth {bw / 1e9:.1f} GB/s, "
        f"floor {floor * 1e3:.0f} ms; forward+backward {ms(forward_backward):.0f} ms"
    )
    for backend, name in (("auto", "in-place C kernel"), ("torch", "torch gather/scatter")):
        print(
            f"- {name}: step {ms(step[backend]):.0f} ms ({ms(step[backend]) / floor / 1e3:.2f}"
            f"x the floor), optimizer step {ms(update[backend]):.0f} ms"
        )


if __name__ == "__main__":
    main()
