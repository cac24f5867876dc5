"""Training and evaluation loops for :class:`peer_ll.models.PEERLM` on next-token blocks.

Plain torch loops, no Avalanche template: blocks are LongTensors (N, T + 1) as
:meth:`peer_ll.data.text.TextDomainBenchmark.get_split` returns them (inputs
``[:, :-1]``, targets ``[:, 1:]``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from peer_ll.evaluation.metrics import routing_share
from peer_ll.experts.checks import check_int
from peer_ll.models.lm import PEERLM
from peer_ll.models.lm import LMOwners as Domain
from peer_ll.optim import make_optimizer

GradHook = Callable[[PEERLM], None]


def sample_batches(
    blocks: torch.Tensor, *, batch_size: int, steps: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """``steps`` batches (B, T + 1) drawn by seeded shuffled passes over the blocks."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(
            f"blocks must be a non-empty (N, T + 1) tensor, got shape {tuple(blocks.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(blocks.shape[0], generator=gen)])
        yield blocks[order[:batch_size]]
        order = order[batch_size:]


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up, cosine decay to 10 %."""
    scale = min(1.0, (step + 1) / max(1, warmup))
    return scale * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def train_lm(
    model: PEERLM,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup: int = 20,
    seed: int = 0,
    domain: Domain = None,
    grad_hook: GradHook | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train the parameters that require grad, with :func:`peer_ll.optim.make_optimizer`.

    Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of ``lr``.
    Frozen PEER rows and parameters without ``requires_grad`` never change.

    Args:
        model: the model, trained in place.
        blocks: (N, T + 1) token blocks.
        steps: optimizer steps.
        batch_size: blocks per step.
        lr: peak learning rate.
        warmup: warm-up steps.
        seed: seeds the batch order.
        domain: the route to train through (see :meth:`PEERLM.forward`).
        grad_hook: called after each backward, before the step (to edit gradients).
        desc: progress bar label.
        progress: show a tqdm bar.

    Returns:
        {"seconds": wall time, "loss": mean loss of the last 10 % of steps}.
    """
    check_int("steps", steps, minimum=0)
    opt = make_optimizer(model, lr=lr)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    for step, batch in enumerate(
        sample_batches(blocks, batch_size=batch_size, steps=steps, seed=seed)
    ):
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(step, steps, warmup)
        _, loss = model(batch[:, :-1], batch[:, 1:], owners=domain)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        opt.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    tail = losses[-max(1, steps // 10) :] if losses else [float("nan")]
    return {"seconds": time.perf_counter() - start, "loss": sum(tail) / len(tail)}


@torch.no_grad()
def perplexity(
    model: PEERLM, blocks: torch.Tensor, *, domain: Domain = None, batch_size: int = 32
) -> float:
    """exp(mean next-token cross-entropy) over every target of ``blocks`` (N, T + 1)."""
    model.eval()
    total, count = 0.0, 0
    for batch in blocks.split(batch_size):
        logits, _ = model(batch[:, :-1], owners=domain)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).double(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def domain_accuracy(model: PEERLM, blocks: torch.Tensor, domain: int, *, batch_size: int = 32):
    """Share of positions of ``blocks`` that :meth:`PEERLM.infer_domains` reads as ``domain``."""
    hits, count = 0, 0
    for batch in blocks.split(batch_size):
        inferred = model.infer_domains(batch[:, :-1])
        hits, count = hits + int((inferred == domain).sum()), count + inferred.numel()
    return hits / count


@torch.no_grad()
def routing_shares(
    model: PEERLM, blocks: torch.Tensor, *, domain: Domain = None, batch_size: int = 32
) -> dict[int, float]:
    """Share of the router mass that ``blocks``' tokens put on each owner's experts.

    Summed over the model's PEER layers. For an old domain after growth, the
    share on newer owners is the routing drift.
    """
    layers = model.peer_layers
    for layer in layers:
        layer.reset_routing_stats()
    model.eval()
    for batch in blocks.split(batch_size):
        model(batch[:, :-1], owners=domain)
    mass = torch.cat([layer.expert_mass for layer in layers])
    expert_owner = torch.cat([layer.owners for layer in layers])
    for layer in layers:
        layer.reset_routing_stats()
    return routing_share(mass, expert_owner)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter entries (a tied weight counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def touched_entries(before: dict[str, torch.Tensor], model: nn.Module) -> tuple[int, int]:
    """(changed old, new) parameter entries of ``model`` since a ``state_dict`` snapshot.

    An old entry is one in use at the snapshot: every entry of a 0-D/1-D parameter,
    and the entries of rows that were not all zero (spare rows of a PEER table are
    zero). *Changed old* counts old entries whose value differs now. *New* counts
    the non-zero entries of parameters created since, and of rows not in use then
    (grown experts, adapters).
    """
    changed, new = 0, 0
    for name, p in model.named_parameters():
        now = p.detach()
        old = before.get(name)
        if old is None:
            new += int((now != 0).sum())
            continue
        old = old.to(now.device)
        if now.dim() and now.shape[0] > old.shape[0]:  # reallocated: pad with spare rows
            old = torch.cat([old, old.new_zeros(now.shape[0] - old.shape[0], *old.shape[1:])])
        if now.dim() > 1:
            in_use = (old != 0).flatten(1).any(dim=1).view(-1, *[1] * (now.dim() - 1))
            in_use = in_use.expand_as(now)
        else:
            in_use = torch.ones_like(now, dtype=torch.bool)
        changed += int(((now != old) & in_use).sum())
        new += int(((now != 0) & ~in_use).sum())
    return changed, new


def load_blocks(args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    """{domain: {"train": (N, T+1), "test": (M, T+1)}} token blocks of the stream."""
    from peer_ll.data.text import text_domain_stream
    from peer_ll.data.text_domains import text_domain

    domains = []
    for spec in args.domains:
        name, sep, path = spec.partition("=")
        domains.append(text_domain(name, path) if sep else spec)
    stream = text_domain_stream(
        domains, block_size=args.block_size, max_bytes_per_domain=args.max_bytes, seed=args.seed
    )
    return {
        name: {
            "train": stream.get_split(name, "train"),
            "test": stream.get_split(name, "test")[: args.eval_blocks],
        }
        for name in stream.domain_names
    }
