"""Test-time cost per token of a ``peer-ll lm`` run's final models, measured.

Loads the checkpoints of a finished run folder and times next-token evaluation of the
same test blocks, one thread, best of ``--repeats``:

    python benchmarks/lm_token_cost.py runs/lm-default-s0 --blocks 16

Rows: the base model (after the first domain), and each method's model after the last
domain in the evaluation mode its results row uses (grow-and-freeze: domain inferred,
the posterior mixture; grow-pool: one retrieval).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from peer_ll.cli.lm_train import perplexity
from peer_ll.models.lm import PEERLM

#: checkpoint prefix -> (row label, the ``domain`` argument of the evaluation)
ROWS = {
    "base": ("base model (first domain only)", None),
    "full": ("full finetuning", None),
    "grow-and-freeze": ("grow-and-freeze (domain inferred)", "infer"),
    "grow-pool": ("grow-pool (one retrieval)", None),
}


def token_cost(model: PEERLM, blocks: torch.Tensor, domain, repeats: int) -> float:
    """Best wall-clock microseconds per predicted token over ``repeats`` passes."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            perplexity(model, blocks, domain=domain, batch_size=len(blocks))
            best = min(best, time.perf_counter() - start)
    return 1e6 * best / blocks[:, 1:].numel()


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished peer-ll lm run folder")
    ap.add_argument("--blocks", type=int, default=16, help="test blocks of the first domain")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    tests = torch.load(run / "eval_blocks.pt")
    blocks = next(iter(tests.values()))[: args.blocks]
    last = {}
    for path in sorted((run / "checkpoints").glob("*.pt")):
        match = re.match(r"(.+?)-(\d+)-", path.stem)  # METHOD-STEP-DOMAIN
        if match is None:
            continue
        prefix, step = match[1], int(match[2])
        if prefix in ROWS and step >= last.get(prefix, (-1, None))[0]:
            last[prefix] = (step, path)
    lines = ["| model | evaluation | µs per token | vs base |", "|---|---|---|---|"]
    base = None
    for prefix, (label, domain) in ROWS.items():
        if prefix not in last:
            continue
        model = PEERLM.load(last[prefix][1])
        cost = token_cost(model, blocks, domain, args.repeats)
        base = cost if base is None else base
        mode = {None: "one forward", "infer": "posterior over domains"}[domain]
        lines.append(f"| {label} | {mode} | {cost:.1f} | {cost / base:.2f}× |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
