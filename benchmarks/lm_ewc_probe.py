"""Probe: does EWC-regularised full finetuning keep the first text domain? (issue #19)

The language-model goal of growth into one pool (one retrieval per token, no domain
inference) asks for the first domain's perplexity to rise at most 2 % after two more
domains while they gain at least 80 % of full finetuning's gain. The simplest method that
also needs no domain at test time is full finetuning with a penalty that keeps the old
parameters: EWC (Kirkpatrick et al. 2017), ``λ Σ F_i (θ_i - θ*_i)²`` with the diagonal
empirical Fisher F of the first domain's training blocks (30 batches), applied to every
dense parameter (the PEER expert tables have sparse gradients and change only where
retrieved; they get no penalty). Same model, data and schedules as ``peer-ll lm``:

    python benchmarks/lm_ewc_probe.py [--lams 0 1e2 1e3 1e4 1e5] [--steps-first 300]
        [--steps 100] [--max-bytes 300000] [--eval-blocks 32]

Prints one JSON line per λ: python-stdlib's perplexity after the last domain and its
change, each later domain's perplexity right after training on it and its gain as a
share of λ = 0's (plain full finetuning). The plain torch loop of ``peer-ll lm`` trains:
Avalanche's EWC plugin needs its classification template.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from peer_ll.cli.lm_train import load_blocks, perplexity, sample_batches, train_lm
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig

NAMES = ("python-stdlib", "pydoc-topics", "unicode-names")


def diagonal_fisher(model: PEERLM, blocks: torch.Tensor, batches: int = 30) -> dict:
    """{name: mean squared gradient} of the dense parameters over ``batches`` batches."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for batch in sample_batches(blocks, batch_size=16, steps=batches, seed=1):
        model.zero_grad()
        model(batch[:, :-1], batch[:, 1:], owners=0)[1].backward()
        for n, p in model.named_parameters():
            if p.grad is not None and not p.grad.is_sparse:
                fisher[n] += p.grad.detach() ** 2 / batches
    model.eval()
    return {n: f for n, f in fisher.items() if f.any()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0, 1e2, 1e3, 1e4, 1e5])
    parser.add_argument("--steps-first", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-bytes", type=int, default=300_000)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = argparse.Namespace(
        domains=list(NAMES), block_size=128, max_bytes=args.max_bytes, seed=args.seed,
        eval_blocks=args.eval_blocks,
    )  # fmt: skip
    blocks = load_blocks(data)
    torch.manual_seed(args.seed)
    base = PEERLM(LMConfig())
    train_lm(base, blocks[NAMES[0]]["train"], steps=args.steps_first, lr=3e-3, progress=False,
             domain=0)  # fmt: skip
    before = [perplexity(base, blocks[n]["test"], domain=0) for n in NAMES]
    print(json.dumps({"base perplexities": dict(zip(NAMES, before, strict=True))}))
    fisher = diagonal_fisher(base, blocks[NAMES[0]]["train"])
    star = {n: p.detach().clone() for n, p in base.named_parameters()}
    plain = None
    for lam in args.lams:
        model = copy.deepcopy(base)
        params = dict(model.named_parameters())

        def penalty(_, lam=lam, params=params):
            for n, f in fisher.items():
                if lam and params[n].grad is not None:
                    params[n].grad.add_(2 * lam * f * (params[n].detach() - star[n]))

        after = []
        for name in NAMES[1:]:
            train_lm(model, blocks[name]["train"], steps=args.steps, lr=6e-3, progress=False,
                     domain=0, grad_hook=penalty)  # fmt: skip
            after.append(perplexity(model, blocks[name]["test"], domain=0))
        end = perplexity(model, blocks[NAMES[0]]["test"], domain=0)
        plain = after if plain is None and lam == 0 else plain
        row = {"lam": lam, NAMES[0]: end, "change %": 100 * (end / before[0] - 1)}
        for i, name in enumerate(NAMES[1:]):
            row[name] = after[i]
            if plain is not None:
                row[f"{name} gain/full"] = (before[i + 1] - after[i]) / (before[i + 1] - plain[i])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
