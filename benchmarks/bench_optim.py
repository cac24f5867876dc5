"""CPU lazy AdamW row update: the in-place C kernel against the torch gather/scatter path.

One table of 1024² rows × 256 (fp32), 113,925 distinct touched rows (what a step of
1024 tokens × 8 heads × 16 experts touches in a 1024² pool), fp32 moments. Providers
run alternately in one process, so they see the same machine load; medians of
repeats. ``torch`` chunks are the gathered rows per chunk (bytes of one table's chunk):
2 MiB is the default, 32 MiB the chunking before the in-place kernel.

Usage:
    python benchmarks/bench_optim.py [--threads 1] [--repeats 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peer_ll.kernels import lazy_adamw

N, D, R = 1 << 20, 256, 113_925
HYPER = dict(step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p, m, v = torch.randn(N, D), torch.zeros(N, D), torch.zeros(N, D)
    rows = torch.randperm(N)[:R].sort().values
    grad = torch.randn(R, D)
    cases = [(f"torch, {b >> 10} KiB chunks", "torch", b) for b in (1 << 18, 1 << 21, 1 << 25)]
    cases.append(("in-place C kernel", "native", lazy_adamw._CHUNK_BYTES))
    default = lazy_adamw._CHUNK_BYTES
    for rnd in range(args.rounds):
        for name, backend, chunk in cases:
            lazy_adamw._CHUNK_BYTES = chunk
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                lazy_adamw.lazy_adamw_(p, m, v, grad, rows, backend=backend, **HYPER)
                times.append(time.perf_counter() - start)
            print(
                f"round {rnd + 1}, {args.threads} thread(s): {name}: "
                f"{statistics.median(times) * 1e3:.0f} ms"
            )
    lazy_adamw._CHUNK_BYTES = default


if __name__ == "__main__":
    main()
