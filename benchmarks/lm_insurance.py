"""PEERLM domain inference with insurance on three text domains.

Trains a small PEERLM on python-stdlib, grows and trains pydoc-topics, then
unicode-names (each growth freezes the rest), and compares on every domain's test
blocks ``owners="infer"`` (every route for every token) with
``owners="infer", confidence=c`` (every route only until the domain posterior reaches
``c``): perplexity and routes per token (a decoder caching each route's keys and
values pays O routes per token before the commit point and one after). With
``--prior 2`` (or 1) insurance instead runs only the routes that a byte bigram (unigram)
naive Bayes domain posterior of the prefix (``NgramDomainPrior``, fit on each domain's
training blocks) cannot rule out at ``c``, each from the block's start, mixed by their
own posterior (``prior_mixture``); a route costs its last active position + 1.

    PYTHONPATH=. python benchmarks/lm_insurance.py --seeds 3
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from peer_ll.cli.lm_train import train_lm
from peer_ll.cli.results import environment_line, write_section
from peer_ll.data.text import text_domain_stream
from peer_ll.models import PEERLM, LMConfig
from peer_ll.models.insurance import NgramDomainPrior

DOMAINS = ("python-stdlib", "pydoc-topics", "unicode-names")
TINY = dict(dim=64, layers=3, attn_heads=4, block_size=64, peer_num_keys=8, peer_heads=2,
            peer_topk=4, peer_dim_key=16, adapter_rank=4, attention_adapter_rank=4)  # fmt: skip


def nll(logp: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.nll_loss(logp.flatten(0, 1), y.reshape(-1), reduction="sum"))


def one_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    stream = text_domain_stream(DOMAINS, block_size=64, max_bytes_per_domain=args.bytes,
                                seed=seed)  # fmt: skip
    splits = [{s: stream.get_split(n, s) for s in ("train", "test")} for n in stream.domain_names]
    model = PEERLM(LMConfig(**TINY))
    for d, split in enumerate(splits):
        if d:
            model.grow(8, owner=d)
            model.freeze_old(d)
        train_lm(model, split["train"], steps=args.steps, batch_size=16, lr=3e-3,
                 domain=d if d else None, progress=False)  # fmt: skip
    model.eval()
    prior = None
    if args.prior:
        prior = NgramDomainPrior(model.config.vocab_size, order=args.prior)
        for split in splits:
            prior.fit(split["train"])
    return [evaluate(model, splits, c, args.test_blocks, prior) | dict(seed=seed, confidence=c)
            for c in args.confidence]  # fmt: skip


def evaluate(model: PEERLM, splits, confidence: float, test_blocks: int, prior=None) -> dict:
    full = ins = routes = count = 0.0
    t_full = t_ins = 0.0
    with torch.no_grad():
        for split in splits:
            blocks = split["test"][:test_blocks]
            x, y = blocks[:, :-1], blocks[:, 1:]
            start = time.perf_counter()
            full += nll(model(x, owners="infer")[0], y)
            t_full += time.perf_counter() - start
            start = time.perf_counter()
            out, r = model.insured_mixture(x, confidence, prior=prior)
            t_ins += time.perf_counter() - start
            ins += nll(out, y)
            routes += float(r.sum()) * x.shape[1]
            count += y.numel()
    return dict(ppl_full=math.exp(full / count), ppl_ins=math.exp(ins / count),
                routes=routes / count, time_ratio=t_ins / t_full)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--bytes", type=int, default=200_000)
    parser.add_argument("--test-blocks", type=int, default=64)
    parser.add_argument(
        "--confidence",
        default="0.99",
        help="comma-separated confidences, each evaluated on the same models",
    )
    parser.add_argument(
        "--prior",
        type=int,
        default=0,
        choices=(0, 1, 2),
        help="n-gram order of the naive Bayes domain prior (0: none)",
    )
    args = parser.parse_args()
    text_confidence = args.confidence
    args.confidence = [float(c) for c in args.confidence.split(",")]
    torch.set_num_threads(1)
    rows = [row for s in range(args.seeds) for row in one_seed(s, args)]
    lines = ["| seed | confidence | perplexity, full mixture | with insurance | relative | "
             "routes/token | wall time insured/full |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['seed']} | {r['confidence']} | {r['ppl_full']:.3f} | "
                     f"{r['ppl_ins']:.3f} | "
                     f"{100 * (r['ppl_ins'] / r['ppl_full'] - 1):+.2f} % | {r['routes']:.2f} | "
                     f"{r['time_ratio']:.2f} |")  # fmt: skip
    summary = []
    for c in args.confidence:
        mine = [r for r in rows if r["confidence"] == c]
        rel = sum(r["ppl_ins"] / r["ppl_full"] - 1 for r in mine) / len(mine)
        routes = sum(r["routes"] for r in mine) / len(mine)
        summary.append(
            f"Confidence {c}, mean over {args.seeds} seeds: perplexity {100 * rel:+.2f} % "
            f"against the full mixture (goal: within 1 %), {routes:.2f} routes per token "
            f"(goal: at most 1.3; the full mixture runs {len(DOMAINS)})."
        )
    text = "\n".join([
        f"Command: `PYTHONPATH=. python benchmarks/lm_insurance.py --seeds {args.seeds} "
        f"--steps {args.steps} --bytes {args.bytes} --test-blocks {args.test_blocks} "
        f"--confidence {text_confidence} --prior {args.prior}` "
        f"(domains {', '.join(DOMAINS)}; T = 64)",
        environment_line(), "", *summary, "", *lines,
    ])  # fmt: skip
    print(text)
    write_section("benchmarks/RESULTS.md", "## Retrieval insurance (language model)", text)


if __name__ == "__main__":
    main()
