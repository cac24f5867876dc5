"""How far growth into one pool can go in the language model: its ceiling with the old data.

``grow-pool`` (one top-k retrieval per token over one grown pool, everything old frozen,
no domain inference) misses issue #19's language-model goals: the first domain's
perplexity rises and pydoc-topics gains a third of full finetuning's gain. This script
separates the two causes by giving the same method what the goal forbids or lacks:

- ``--old real``: each later domain trains on a mix of its own blocks and the earlier
  domains' training blocks (replay; ``--replay`` is the earlier domains' share of the
  blocks). Then routing learns from real old tokens which queries to leave to the old
  experts, so what is left short of the gain goal is the capacity of new experts with
  everything old frozen: the ceiling of any retrieval regulariser or pseudo-data.
- ``--old generated``: the earlier domains' blocks are sampled from the model itself
  before each domain (generative replay, Shin et al. 2017; no stored data): ``--generated``
  blocks of ``--gen-len`` tokens after a BOS, the last block_size + 1 kept, at
  ``--temperature``.
- ``--old none``: grow-pool itself (with ``--step-mult 1``), ``--keep``/``--win`` its
  regulariser's weights, ``--centroids``/``--centroid-noise`` its pseudo-queries (k-means
  centroids per earlier domain, layer and head, plus noise of their cluster's spread).

Everything else is ``peer-ll lm``'s grow-pool (k-means sub-keys, the base's query, the
same data and learning rate); ``--step-mult`` multiplies the steps per domain (2 with
``--replay 0.5`` gives each new domain as many of its own blocks as grow-pool sees).
RUN is a finished ``peer-ll lm`` run folder with ``full`` among its methods: its base
checkpoint is the start, its data settings are reused, and its full finetuning gives the
gain shares:

    python benchmarks/lm_pool_ceiling.py runs/lm-s0 --old real --replay 0.5 --step-mult 2

Prints one JSON line: the perplexity matrix R (row i: after domain i), the first
domain's change after the last domain, each later domain's gain as a share of full
finetuning's, the share of the first domain's router mass left on the base's experts,
and the training seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from peer_ll.cli.lm_methods import MethodSettings, model_config, pool_config, prepare
from peer_ll.cli.lm_train import load_blocks, perplexity, routing_shares, train_lm
from peer_ll.data.text import BOS_ID
from peer_ll.models.lm import PEERLM


def generated_blocks(
    model: PEERLM, n: int, *, length: int, temperature: float, seed: int
) -> torch.Tensor:
    """(n, block_size + 1) blocks sampled from ``model`` after a BOS (its last tokens)."""
    width = model.config.block_size + 1
    if length < width:
        raise ValueError(f"--gen-len must be at least block_size + 1 = {width}, got {length}")
    sampler = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 64):
        prompt = torch.full((min(64, n - start), 1), BOS_ID)
        out.append(
            sampler.generate(prompt, length, temperature=temperature, generator=gen)[:, -width:]
        )
    return torch.cat(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished peer-ll lm run folder with method 'full'")
    ap.add_argument("--old", choices=("real", "generated", "none"), default="real")
    ap.add_argument("--replay", type=float, default=0.5, help="earlier domains' share (0.5)")
    ap.add_argument("--step-mult", type=float, default=2.0, help="steps × this (2)")
    ap.add_argument("--generated", type=int, default=256, help="--old generated: blocks")
    ap.add_argument("--gen-len", type=int, default=192, help="--old generated: tokens each")
    ap.add_argument("--temperature", type=float, default=1.0, help="--old generated")
    ap.add_argument("--keep", type=float, default=0.0, help="regulariser's keep weight (0)")
    ap.add_argument("--win", type=float, default=0.0, help="regulariser's win weight (0)")
    ap.add_argument("--centroids", type=int, default=256, help="keep term: centroids (256)")
    ap.add_argument("--centroid-noise", type=float, default=1.0, help="keep term: noise (1)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.replay < 1.0:
        raise SystemExit(f"--replay must be in [0, 1), got {args.replay}")
    torch.set_num_threads(1)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    if "full finetuning" not in results["methods"]:
        raise SystemExit(f"run must have method 'full' (for the gain shares), got {run}")
    data = argparse.Namespace(**results["config"]["args"])
    torch.manual_seed(data.seed)
    blocks = load_blocks(data)
    names = list(blocks)
    tests = [blocks[n]["test"] for n in names]
    base = PEERLM.load(next((run / "checkpoints").glob("base-0-*.pt")))
    pool = pool_config(keep=args.keep, centroids=args.centroids, centroid_noise=args.centroid_noise)
    pool = dataclasses.replace(pool, win_weight=args.win)  # pool_config fixes the win weight
    steps = int(round(data.steps * args.step_mult))
    settings = MethodSettings(grow_keys=data.grow_keys, steps=steps, pool=pool)
    model = PEERLM(model_config(base.config, "grow-pool", settings))
    model.load_state_dict(base.state_dict())
    R = [[perplexity(model, t) for t in tests]]
    seconds = []
    for t in range(1, len(names)):
        start = time.perf_counter()
        earlier, new = [blocks[n]["train"] for n in names[:t]], blocks[names[t]]["train"]
        if args.old == "generated":  # sampled before growth: the model as it stands
            old = generated_blocks(
                model,
                args.generated,
                length=args.gen_len,
                temperature=args.temperature,
                seed=data.seed + 100 + t,
            )
        elif args.old == "real":
            old = torch.cat(earlier)
        hook = prepare(
            "grow-pool", model, owner=t, settings=settings, background=earlier, new_blocks=new
        )
        if not pool.regularised:
            hook.watch.remove()
        mix = new
        if args.old != "none" and args.replay > 0:
            n_old = int(len(new) * args.replay / (1 - args.replay))
            gen = torch.Generator().manual_seed(data.seed + t)
            mix = torch.cat([new, old[torch.randint(len(old), (n_old,), generator=gen)]])
        train_lm(
            model,
            mix,
            steps=steps,
            batch_size=data.batch_size,
            lr=data.lr,
            seed=data.seed + t,
            domain=t,
            grad_hook=hook if pool.regularised else None,
            progress=False,
        )
        seconds.append(time.perf_counter() - start)
        R.append([perplexity(model, x) for x in tests])
    full = results["methods"]["full finetuning"]["R"]
    gains = [(R[0][j] - R[j][j]) / (full[0][j] - full[j][j]) for j in range(1, len(names))]
    out = {
        "run": str(run),
        "args": {k: v for k, v in vars(args).items() if k != "run"},
        "steps": steps,
        "R": R,
        "first_change": R[-1][0] / R[0][0] - 1,
        "gain_vs_full": gains,
        "first_on_base": routing_shares(model, tests[0]).get(0, 0.0),
        "seconds": seconds,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
