"""``peer-ll lm``: add experts for new text domains to a PEER language model.

1. Train a :class:`peer_ll.models.PEERLM` on the first domain (A).
2. For each later domain (B, C, ...), starting from that model, every method of
   :mod:`peer_ll.cli.lm_methods` learns the domains in order: full finetuning,
   PEER sparse finetuning (TF-IDF top-t), grow-only (new experts join the pool,
   everything old frozen) and grow-and-freeze (new experts and adapters owned by
   the domain, everything old frozen, the domain inferred at test time).
3. After every domain each method is evaluated on every domain's test split,
   which fills its perplexity matrix R[i][j]; its model is saved, and at the
   end every checkpoint is loaded in a new process and must give the same
   perplexities, bit for bit.

The defaults are the settings of ``benchmarks/lm_domains.py`` (1,000 steps on the first
domain, 250 on each later one, 1 MB of text per domain): a run takes about 10 minutes on
2 quiet CPU cores. Shorter budgets learn the later domains less well with everything old
frozen (600/150 steps: 79 % of full finetuning's gain, see ``benchmarks/RESULTS.md``);
``--tiny`` is a smoke run of well under a minute.

The run folder is refused if it exists, unless ``--resume`` (take up the finished
methods, see :mod:`peer_ll.cli.lm_args`) or ``--force`` (remove the old run first).

The run folder holds ``results.json`` (R matrices, forgetting, gains, parameters
touched, seconds), ``table.txt``, ``samples.txt``, ``checkpoints/`` and
``eval_blocks.pt``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

from peer_ll.cli import lm_report
from peer_ll.cli.files import atomic_write, atomic_write_text
from peer_ll.cli.lm_args import (
    DEFAULT_DOMAINS,
    TINY,
    add_arguments,
    check_arguments,
    flag_message,
    load_progress,
    peer_block_indices,
    save_progress,
    settings,
)
from peer_ll.cli.lm_methods import (
    EVALUATIONS,
    MethodSettings,
    eval_domain,
    model_config,
    pool_config,
    prepare,
    train_domain,
)
from peer_ll.cli.lm_reload import reload_check
from peer_ll.cli.lm_train import (
    count_parameters,
    domain_accuracy,
    load_blocks,
    perplexity,
    routing_shares,
    touched_entries,
    train_lm,
)
from peer_ll.cli.results import environment
from peer_ll.cli.run_folder import open_run_folder
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig


def evaluate(model: PEERLM, method: str, tests: list[torch.Tensor]) -> dict[str, list[float]]:
    """{row label: [perplexity on each domain's test blocks]} for a method's labels."""
    return {
        label: [
            perplexity(model, t, domain=eval_domain(mode, j, model)) for j, t in enumerate(tests)
        ]
        for label, (m, mode) in EVALUATIONS.items()
        if m == method
    }


def run_method(method, base, names, blocks, args, settings, out) -> dict:
    """Learn domains 1..T-1 with ``method`` from ``base``; returns its records."""
    model = PEERLM(model_config(base.config, method, settings))
    model.load_state_dict(base.state_dict())
    tests = [blocks[n]["test"] for n in names]
    rec = {
        "seconds": [],
        "new_params": [],
        "changed_old_params": [],
        "trainable": [],
        "rows": {},
        "checkpoints": [],
        "extra": [],
    }
    for t in range(1, len(names)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        start = time.perf_counter()
        hook = prepare(
            method,
            model,
            owner=t,
            settings=settings,
            background=[blocks[n]["train"] for n in names[:t]],
            new_blocks=blocks[names[t]]["train"],
        )
        rec["trainable"].append(count_parameters(model, trainable_only=True))
        train_lm(
            model,
            blocks[names[t]]["train"],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed + t,
            domain=train_domain(method, t),
            grad_hook=hook,
            desc=f"{method} on {names[t]}",
            progress=not args.no_progress,
        )
        rec["seconds"].append(time.perf_counter() - start)
        changed, new = touched_entries(before, model)
        rec["new_params"].append(new)
        rec["changed_old_params"].append(changed)
        for label, row in evaluate(model, method, tests).items():
            rec["rows"].setdefault(label, []).append(row)
        rec["extra"].append(_diagnostics(model, method, tests))
        path = out / "checkpoints" / f"{method}-{t}-{names[t]}.pt"
        model.save(path)
        rec["checkpoints"].append(str(path.relative_to(out)))
    rec["model"] = model
    return rec


def _diagnostics(model: PEERLM, method: str, tests: list[torch.Tensor]) -> dict:
    if method in ("grow-only", "grow-pool"):  # routing drift: router mass per domain and owner
        return {"routing_share": [routing_shares(model, t) for t in tests]}
    if method == "grow-and-freeze":
        owners = model.owners
        return {
            "domain_accuracy": [
                domain_accuracy(model, t, j) if j in owners else None for j, t in enumerate(tests)
            ]
        }
    return {}


def main(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "base", "peerlm") == "hf-gpt2":
            from peer_ll.cli import hf_lm

            return hf_lm.main(args)
        if not hasattr(args, "run_dir"):
            check_arguments(args)
        return _run(args)
    except (ValueError, FileNotFoundError) as err:  # bad arguments or data: no traceback
        print(f"peer-ll lm: error: {flag_message(err)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = (
        TINY if args.tiny else dict(dim=args.dim, layers=args.layers, block_size=args.block_size)
    )
    if args.experts_only:
        shape = dict(
            shape,
            grow_dense_blocks=False,
            adapter_rank=0,
            adapter_affine=False,
            attention_adapter_rank=0,
        )
    shape["peer_layers"] = peer_block_indices(args.peer_layers, shape["layers"])
    config = LMConfig(**shape)  # checks the model's shape before any data or folder
    settings_ = MethodSettings(
        grow_keys=args.grow_keys,
        top_t=args.top_t,
        steps=args.steps,
        pool=pool_config(
            args.pool_pseudo,
            keep=args.pool_keep_weight,
            margin=args.pool_margin,
            copy_experts=args.pool_copy_experts,
            centroids=args.pool_centroids,
            centroid_noise=args.pool_centroid_noise,
        ),
        pool_query=args.pool_query,
    )
    if args.tiny:
        settings_ = dataclasses.replace(settings_, background_batches=4)
    blocks = load_blocks(args)
    names = list(blocks)
    if len(names) < 2:
        raise ValueError(f"--domains must name at least 2 distinct domains, got {names}")
    out = open_run_folder(args.run_dir, settings(args), resume=args.resume, force=args.force)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    tests = {n: b["test"] for n, b in blocks.items()}
    atomic_write(out / "eval_blocks.pt", lambda handle: torch.save(tests, handle))

    # The base is trained anew on --resume too (deterministic, and its query statistics,
    # which owners="infer" needs, are not in a checkpoint).
    base = PEERLM(config)
    start = time.perf_counter()
    train_lm(
        base,
        blocks[names[0]]["train"],
        steps=args.steps_first,
        batch_size=args.batch_size,
        lr=args.lr_first,
        seed=args.seed,
        desc=f"train on {names[0]}",
        progress=not args.no_progress,
    )
    first_seconds = time.perf_counter() - start
    first_row = [perplexity(base, blocks[n]["test"]) for n in names]
    base.save(out / "checkpoints" / f"base-0-{names[0]}.pt")

    records = {}
    for method in args.methods:
        path = out / "records" / f"{method}.json"
        rec = load_progress(path)
        if rec is None:
            rec = run_method(method, copy.deepcopy(base), names, blocks, args, settings_, out)
            rec["samples"] = lm_report.samples({method: rec}, blocks, names)
            del rec["model"]
            save_progress(path, rec)
        records[method] = rec
    results = lm_report.summarize(
        names, first_row, first_seconds, records, base_params=count_parameters(base)
    )
    results["config"] = {"model": config.to_dict(), "methods": dataclasses.asdict(settings_),
                         "args": {k: v for k, v in vars(args).items()
                                  if k not in ("func", "run_dir")}}  # fmt: skip
    results["environment"] = environment()
    results["samples"] = "\n".join(r["samples"][:-1] for r in records.values()) + "\n"
    if not args.no_reload_check:
        results["reload"] = reload_check(out, records, first_row)
    text = lm_report.tables(results)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    atomic_write_text(out / "samples.txt", results["samples"])
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    print(f"run folder: {os.fspath(out)}")
    return 0 if results.get("reload", {}).get("identical", True) else 1


__all__ = ["DEFAULT_DOMAINS", "add_arguments", "evaluate", "main", "run_method"]
