"""``peer-ll run``: train a small PEER classifier on scikit-learn digits (interim main job)."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def main(args: argparse.Namespace) -> int:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=args.seed, stratify=y
    )
    x_tr, x_te = (torch.tensor(a, dtype=torch.float32) for a in (x_tr, x_te))
    y_tr, y_te = (torch.tensor(a) for a in (y_tr, y_te))
    model = nn.Sequential(
        nn.Linear(64, 64), PEER(64, num_keys=16, heads=4, topk=8, dim_key=32), nn.Linear(64, 10)
    )
    opt = make_optimizer(model, lr=3e-3)
    start = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc="digits", unit="epoch"):
        model.train()
        for batch in torch.randperm(len(x_tr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[batch]), y_tr[batch]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    print(f"PEER classifier on digits: test accuracy {acc:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0
