"""Growth into one pool on Permuted Fashion-MNIST: everything old frozen, one retrieval.

Model: PEER directly on the pixels (784 -> 128, 4 heads, top-8, dim_key 32, LayerNorm
queries, 16² experts per segment), GELU, a Linear head. Experience 0 trains everything.
Each later experience grows one segment owned by it and freezes everything old (query
network, head, old experts, old sub-keys); only the new experts, sub-keys and (with
calibration) the new owner's query scale and shift train. Test: one top-k over the whole
pool, no task label, no owner inference, except ``owner-restricted (task known)``, which
trains and tests each experience on its own segment only: the best any owner-restricted
method can do with this model, and ``full finetuning (no growth)``, which trains every
parameter of the one-segment model on each experience in turn.

    python benchmarks/pool_growth.py --seeds 0 1 2          # table + RESULTS.md section

Variants switch the parts of ``peer_ll.strategies.pool_growth.PoolGrowthConfig``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.cli.results import environment_line, write_section
from peer_ll.data.images import load_images
from peer_ll.evaluation.metrics import average_accuracy, forgetting, learning_accuracy
from peer_ll.evaluation.segments import own_segment_share
from peer_ll.experts import PEER
from peer_ll.strategies.pool_growth import PoolGrowth, PoolGrowthConfig

OFF = dict(kmeans=False, calibrate=False, win_weight=0.0, keep_weight=0.0)
OWN = dict(calibrate=False, own_query=True, pseudo="inputs")
VARIANTS = {
    "grow-only (paper, random keys)": OFF,
    "k-means keys": {**OFF, "kmeans": True},
    "calibration": {**OFF, "calibrate": True},
    "regulariser": {**OFF, "win_weight": 1.0, "keep_weight": 1.0},
    "k-means + calibration": {**OFF, "kmeans": True, "calibrate": True},
    "k-means + regulariser": {**OFF, "kmeans": True, "win_weight": 1.0, "keep_weight": 1.0},
    "k-means + calibration + regulariser": {},
    "k-means + calibration + regulariser, keep ×2": {"keep_weight": 2.0},
    "k-means + calibration + regulariser, pseudo-inputs": {"pseudo": "inputs"},
    "far k-means + calibration + regulariser": {"far_fraction": 0.5},
    "own query (random keys)": {**OFF, **OWN},
    "own query + k-means": {**OFF, **OWN, "kmeans": True},
    "own query + regulariser": {**OWN, "kmeans": False},
    "own query + k-means + regulariser": {**OWN},
    "own query + far k-means + regulariser": {**OWN, "far_fraction": 0.5},
    "own query rank 32 + k-means + regulariser": {**OWN, "own_query_rank": 32},
    "owner-restricted (task known)": None,
    "full finetuning (no growth)": "full",
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.peer = PEER(
            784,
            dim_out=128,
            num_keys=16,
            heads=4,
            topk=8,
            dim_key=32,
            query_norm="layer",
            backend="torch",
        )
        self.peer.sparse_grad = False  # a stock optimizer trains it
        self.head = nn.Linear(128, 10)

    def forward(self, x, owners=None):
        return self.head(F.gelu(self.peer(x, owners=owners)))


def stream(n_exp, n_train, n_test, seed):
    data = load_images("fashion-mnist")
    rng = np.random.default_rng(seed)
    tr = rng.choice(len(data.train_labels), n_train * n_exp, replace=False)
    te = rng.choice(len(data.test_labels), n_test, replace=False)
    xtr = torch.tensor(data.train_images[tr].reshape(len(tr), -1), dtype=torch.float32) / 255
    xte = torch.tensor(data.test_images[te].reshape(len(te), -1), dtype=torch.float32) / 255
    ytr, yte = torch.tensor(data.train_labels[tr]), torch.tensor(data.test_labels[te])
    out = []
    for e in range(n_exp):
        perm = torch.from_numpy(rng.permutation(784))
        sl = slice(e * n_train, (e + 1) * n_train)
        out.append((xtr[sl][:, perm], ytr[sl], xte[:, perm], yte))
    return out


def run(variant, exps, seed, *, epochs=1, batch=64, lr=1e-3):
    torch.manual_seed(seed)
    net, cfg = Net(), VARIANTS[variant]
    oracle, full = cfg is None, cfg == "full"
    growth = PoolGrowth(PoolGrowthConfig(**(OFF if oracle or full else cfg)))
    gen = torch.Generator().manual_seed(seed)
    T = len(exps)
    R = np.zeros((T, T))
    for t, (x, y, _, _) in enumerate(exps):
        if t > 0 and not full:
            with torch.no_grad():
                q = net.peer.query(x[:4096])
            growth.grow(net.peer, 16, owner=t, queries=q)
            for p in net.parameters():
                p.requires_grad_(False)
            net.peer.freeze(list(range(t)), keys=True, query=True)
            for p in (net.peer.down, net.peer.up, net.peer.sub_keys):
                p.requires_grad_(True)
            if net.peer.query_adapter is not None:
                net.peer.freeze([], keys=False)  # syncs the adapters' trainability
            if growth.config.own_query:  # the new owner's query network trains
                for p in net.peer.query_adapter.nets[str(t)].parameters():
                    p.requires_grad_(True)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        owners = t if oracle else None
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                loss = F.cross_entropy(net(x[idx], owners), y[idx])
                if t > 0 and growth.config.regularised and not (oracle or full):
                    q = net.peer.query(x[idx])
                    loss = loss + growth.loss(net.peer, q, owner=t, generator=gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            growth.record(net.peer, t, net.peer.query(x[:4096]), inputs=x[:4096])
            for j in range(t + 1):
                xt, yt = exps[j][2], exps[j][3]
                pred = net(xt, j if oracle else None).argmax(-1)
                R[t, j] = 100 * float((pred == yt).float().mean())
    shares = []
    with torch.no_grad():
        for j in range(T):
            _, ids = net.peer.retrieve(exps[j][2], j if oracle else None)
            shares.append(own_segment_share(net.peer.owners[ids], j)["slots"])
    return {
        "variant": variant,
        "seed": seed,
        "R": R.tolist(),
        "acc": average_accuracy(R),
        "forgetting": forgetting(R),
        "learning": learning_accuracy(R),
        "own_share": shares,
    }


def table(records):
    by = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    lines = [
        "| variant | final acc | forgetting | learning acc | own-segment share "
        "(exp 0 … 4, final) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        rs = by.get(v)
        if not rs:
            continue
        m = {k: np.mean([r[k] for r in rs]) for k in ("acc", "forgetting", "learning")}
        s = {k: np.std([r[k] for r in rs]) for k in ("acc", "forgetting", "learning")}
        share = np.mean([r["own_share"] for r in rs], axis=0)
        lines.append(
            f"| {v} | {m['acc']:.1f} ± {s['acc']:.1f} | {m['forgetting']:.1f} ± "
            f"{s['forgetting']:.1f} | {m['learning']:.1f} ± {s['learning']:.1f} | "
            + " ".join(f"{100 * x:.0f}" for x in share)
            + f" | {len(rs)} |"
        )
    return "\n".join(lines)


def plot(records, path):
    """Own-segment share of each experience's test queries after the last one, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # one colour per variant
    for v in VARIANTS:
        rs = [r for r in records if r["variant"] == v]
        if rs:
            share = 100 * np.mean([r["own_share"] for r in rs], axis=0)
            ax.plot(range(len(share)), share, marker="o", label=v)
    ax.set(
        xlabel="experience (test queries)",
        ylabel="top-k slots on its own segment (%)",
        title="Permuted Fashion-MNIST, after the last experience",
        ylim=(0, 105),
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--experiences", type=int, default=5)
    ap.add_argument("--train", type=int, default=10000, help="training images per experience")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/records/pool_growth.jsonl")
    ap.add_argument("--results", default=None, help="RESULTS.md to write a section into")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="override PoolGrowthConfig fields of every variant that uses them",
    )
    ap.add_argument(
        "--report", action="store_true", help="only read --out and write the table (and --results)"
    )
    args = ap.parse_args(argv)
    for item in args.set:
        name, value = item.split("=", 1)
        for cfg in VARIANTS.values():
            if isinstance(cfg, dict) and cfg.get(name, 1) != 0 and cfg.get(name) is not False:
                cfg[name] = type(getattr(PoolGrowthConfig(), name))(value)
    records = []
    if args.report:
        with open(args.out) as f:
            records = [json.loads(line) for line in f if line.strip()]
    for seed in [] if args.report else args.seeds:
        exps = stream(args.experiences, args.train, args.test, seed)
        for v in args.variants:
            start = time.time()
            rec = run(v, exps, seed)
            rec["seconds"] = round(time.time() - start, 1)
            records.append(rec)
            print(
                json.dumps(
                    {
                        k: rec[k]
                        for k in (
                            "variant",
                            "seed",
                            "acc",
                            "forgetting",
                            "learning",
                            "own_share",
                            "seconds",
                        )
                    }
                )
            )
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    text = table(records)
    print(text)
    plot(records, "benchmarks/figures/pool_growth_share.png")
    if args.results:
        cmd = "python benchmarks/pool_growth.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(
            args.results,
            "## Growth into one pool (Permuted Fashion-MNIST)",
            f"{environment_line()}  \nCommand: `{cmd}`\n\n{text}\n\n"
            "![own-segment share](figures/pool_growth_share.png)",
            replace=True,
            keep_from="NOTES",
        )


if __name__ == "__main__":
    main()
