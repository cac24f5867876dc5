"""Owner scoring learned from replayed inputs: a small gate on a PEER layer's shared query.

With a replay budget, owner scoring need not be generative. :class:`OwnerGate` is fit
after each experience (in the spirit of Expert Gate, Aljundi et al. 2017): a small MLP
classifies owners from the shared query ``norm(W_q x)`` of the model's first PEER layer
(or ``layer``), trained on the whole current experience against the replayed inputs of
older experiences (``replay``, kept by :class:`~peer_ll.protect.plugin.OwnerRouting`
with ``mem_size``), with class-balanced weights. The replayed inputs are used for
nothing else: the frozen old function needs no rehearsal.
"""

from __future__ import annotations

import torch
from torch import nn

from peer_ll.experts.checks import check_float, check_int, check_owner
from peer_ll.protect.routed import CHUNK, layer_input, pick_layer


class OwnerGate(nn.Module):
    """Standardised query -> MLP -> owner log-probabilities; an owner scorer.

    Args:
        hidden: width of the hidden layer.
        steps: full-batch Adam steps per fit.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        layer: name of the PEER layer whose query is classified (None: the first).

    Attributes:
        fit_accuracy: the latest fit's class-balanced accuracy on its training data.
    """

    needs_replay = True

    def __init__(
        self,
        *,
        hidden: int = 128,
        steps: int = 200,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        layer: str | None = None,
    ) -> None:
        super().__init__()
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.steps = check_int("steps", steps, minimum=1)
        self.lr = check_float("lr", lr, minimum=0.0)
        self.weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
        self.layer = layer
        self.net: nn.Sequential | None = None
        self.fit_accuracy = float("nan")
        self.register_buffer("owner_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))

    @property
    def owners(self) -> list[int]:
        """The owners the gate tells apart, in column order (none before a fit)."""
        return self.owner_ids.tolist()

    def _build(self, dim: int, owners: int) -> nn.Sequential:
        return (
            nn.Sequential(nn.Linear(dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, owners))
            .requires_grad_(False)
            .eval()
        )

    def _logits(self, q: torch.Tensor) -> torch.Tensor:
        flat = q.reshape(q.shape[0], -1).to(self.mean)
        return self.net((flat - self.mean) / self.std)

    @torch.no_grad()
    def _queries(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layer = pick_layer(model, self.layer)
        parts = [layer.query(layer_input(model, layer, p)) for p in x.split(CHUNK)]
        return torch.cat(parts).reshape(len(x), -1).float()

    def fit(
        self,
        model: nn.Module,
        owner: int,
        x: torch.Tensor,
        y=None,
        replay: dict[int, torch.Tensor] | None = None,
    ) -> float:
        """Fit the gate on ``owner``'s inputs x (N, ...) and ``replay`` {older owner: x}.

        Returns:
            The gate's class-balanced accuracy on its training data.
        """
        owner = check_owner("owner", owner)
        data = {o: v for o, v in (replay or {}).items() if o != owner and len(v)}
        data[owner] = x
        known = sorted(data)
        flat = torch.cat([self._queries(model, data[o].to(x.device)) for o in known])
        target = torch.cat(
            [torch.full((len(data[o]),), i, dtype=torch.long) for i, o in enumerate(known)]
        ).to(flat.device)
        net = self._build(flat.shape[1], len(known)).to(flat.device).requires_grad_(True)
        self.mean = flat.mean(0)
        self.std = flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones_like(self.mean)
        self.net, self.owner_ids = net, torch.tensor(known, device=self.owner_ids.device)
        counts = torch.bincount(target, minlength=len(known)).float()
        weight = (counts.sum() / (len(known) * counts.clamp_min(1))).to(flat)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        net.train()
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                nn.functional.cross_entropy(self._logits(flat), target, weight=weight).backward()
                opt.step()
        net.requires_grad_(False)  # trained here only, never by the strategy's optimizer
        net.eval()
        with torch.no_grad():
            right = (self._logits(flat).argmax(1) == target).float()
        self.fit_accuracy = float((right * weight[target]).sum() / weight[target].sum())
        return self.fit_accuracy

    @torch.no_grad()
    def scores(self, model: nn.Module, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, log-probabilities (B, O)) of the gate for inputs x (B, ...)."""
        if self.net is None:
            raise ValueError("the gate must be fit before scoring (OwnerGate.fit), got none")
        return self.owners, self._logits(self._queries(model, x)).log_softmax(dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Build the gate a checkpoint holds (its sizes are in the checkpoint) first."""
        first, ids = state_dict.get(prefix + "net.0.weight"), state_dict.get(prefix + "owner_ids")
        if first is not None and ids is not None:
            self.net = self._build(first.shape[1], len(ids))
            self.owner_ids = torch.zeros_like(ids)
            self.mean, self.std = torch.zeros(first.shape[1]), torch.ones(first.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["OwnerGate"]
