"""Owner inference learned from replayed inputs: a small gate on the shared query.

With a replay budget, owner inference need not be generative. :class:`ReplayOwnerGate`
keeps an experience-balanced buffer of ``mem_size`` training inputs (the budget of
Avalanche's ``Replay(mem_size=...)``), and after each experience fits, per PEER layer,
a small classifier of owners (:class:`OwnerGate`, in the spirit of Expert Gate,
Aljundi et al. 2017) on the layer's shared query ``norm(W_q x)``: the whole current
experience against the buffered inputs of older experiences, with class-balanced
weights. :class:`GateOwnerInference` then scores owners by the gate's log-probabilities,
hard or soft, like any :class:`~peer_ll.experts.OwnerInference`. The replayed inputs
are used for nothing else: the frozen old function needs no rehearsal.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import nn

from peer_ll.experts import PEER, OwnerInference
from peer_ll.experts import peer_layers as named_peer_layers
from peer_ll.experts.checks import check_int
from peer_ll.strategies.capture import PEERInputs
from peer_ll.strategies.protect_plugins import experience_loader


class OwnerGate(nn.Module):
    """Standardised query -> MLP -> owner logits: (T, H, d) -> (T, O).

    Args:
        dim: H·d, the flattened query size.
        owners: the O owners it tells apart, in column order.
        hidden: width of the hidden layer.
    """

    def __init__(self, dim: int, owners: list[int], *, hidden: int = 128) -> None:
        super().__init__()
        self.owners = list(owners)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(owners)))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        flat = q.reshape(q.shape[0], -1).to(self.mean)
        return self.net((flat - self.mean) / self.std)


class GateOwnerInference(OwnerInference):
    """Owner inference by an :class:`OwnerGate` per layer (fit with :meth:`fit`).

    Args:
        soft, top, temperature: as for :class:`~peer_ll.experts.OwnerInference`.
        hidden: gate width.
        steps: full-batch Adam steps per fit.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        *,
        soft: bool = False,
        top: int = 2,
        temperature: float = 1.0,
        hidden: int = 128,
        steps: int = 200,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__("margin", soft=soft, top=top, temperature=temperature)
        self.method = "gate"
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.steps = check_int("steps", steps, minimum=1)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.gates: dict[PEER, OwnerGate] = {}

    def __repr__(self) -> str:
        return (
            f"GateOwnerInference(soft={self.soft}, top={self.top}, "
            f"temperature={self.temperature}, hidden={self.hidden})"
        )

    def candidate_owners(self, layer: PEER) -> list[int]:
        """The owners the layer's gate tells apart (and ``candidates``, if set)."""
        if layer not in self.gates:
            raise ValueError("layer has no owner gate yet: fit one with GateOwnerInference.fit")
        owners = self.gates[layer].owners
        if self.candidates is not None:
            owners = [o for o in owners if o in self.candidates]
        if not owners:
            known = self.gates[layer].owners
            raise ValueError(
                f"no owner can be inferred: the gate knows {known}, "
                f"candidates are {self.candidates}"
            )
        return owners

    @torch.no_grad()
    def scores(self, layer: PEER, q: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, log-probabilities (T, O)) of the gate for queries q (T, H, d)."""
        owners = self.candidate_owners(layer)
        gate = self.gates[layer]
        cols = torch.tensor([gate.owners.index(o) for o in owners], device=q.device)
        return owners, gate(q)[:, cols].log_softmax(dim=1).to(q.dtype)

    @torch.enable_grad()
    def fit(self, layer: PEER, queries: torch.Tensor, owners: torch.Tensor) -> float:
        """Fit the layer's gate on queries (N, H, d) with owner labels (N,).

        Returns:
            The gate's accuracy on its (class-balanced) training data.
        """
        if queries.dim() != 3 or queries.shape[0] != owners.shape[0]:
            raise ValueError(
                f"queries must have shape (N, H, d) and owners (N,), got "
                f"{tuple(queries.shape)} and {tuple(owners.shape)}"
            )
        queries = queries.detach()
        known = sorted(set(owners.tolist()))
        gate = OwnerGate(queries[0].numel(), known, hidden=self.hidden).to(queries.device)
        flat = queries.reshape(len(queries), -1).float()
        gate.mean.copy_(flat.mean(0))
        gate.std.copy_(flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones_like(gate.std))
        target = torch.searchsorted(torch.tensor(known, device=owners.device), owners)
        counts = torch.bincount(target, minlength=len(known)).float()
        weight = (counts.sum() / (len(known) * counts.clamp_min(1))).to(flat)
        opt = torch.optim.Adam(gate.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(gate(queries), target, weight=weight).backward()
            opt.step()
        gate.eval()
        self.gates[layer] = gate
        with torch.no_grad():
            right = (gate(queries).argmax(1) == target).float()
        return float((right * weight[target]).sum() / weight[target].sum())


class ReplayOwnerGate(SupervisedPlugin):
    """Keeps ``mem_size`` replayed inputs and refits a :class:`GateOwnerInference` per experience.

    Use it with :class:`~peer_ll.strategies.protect_plugins.OwnerRouting` given the same
    ``inference`` object (``peer_protect(inference="gate", mem_size=...)`` does).

    Args:
        inference: the gate inference to fit.
        mem_size: inputs kept in all, balanced over the experiences seen.

    Attributes:
        buffer: ``{experience: (x (n, ...), task labels (n,))}``.
        fit_accuracy: ``{layer name: accuracy}`` of the latest fit.
    """

    def __init__(self, inference: GateOwnerInference, *, mem_size: int) -> None:
        super().__init__()
        if not isinstance(inference, GateOwnerInference):
            raise TypeError(
                f"inference must be a GateOwnerInference, got {type(inference).__name__}"
            )
        self.inference = inference
        self.mem_size = check_int("mem_size", mem_size, minimum=1)
        self.buffer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fit_accuracy: dict[str, float] = {}

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        owner = int(strategy.experience.current_experience)
        xs, ts = [], []
        for x, _, *task in experience_loader(strategy):
            xs.append(x)
            ts.append(task[0] if task else torch.zeros(len(x), dtype=torch.long))
        current = (torch.cat(xs), torch.cat(ts))
        old = {o: v for o, v in self.buffer.items() if o != owner}
        data = [*old.values(), current]
        x = torch.cat([d[0] for d in data])
        task = torch.cat([d[1] for d in data])
        labels = torch.cat(
            [
                torch.full((len(d[0]),), o, dtype=torch.long)
                for o, d in zip([*old, owner], data, strict=True)
            ]
        )
        queries = self._queries(strategy, x, task, labels)
        self.fit_accuracy = {
            name: self.inference.fit(layer, queries[name], labels.to(queries[name].device))
            for name, layer in named_peer_layers(strategy.model).items()
        }
        self._store(owner, current)

    def _queries(self, strategy, x, task, labels) -> dict[str, torch.Tensor]:
        """Each layer's shared queries (N, H, d), its earlier layers routed to the true owner."""
        model, device = strategy.model, strategy.device
        layers = named_peer_layers(model)
        modes = {m: m.training for m in model.modules()}
        saved = [(layer, layer.eval_owners, layer.track_routing) for layer in layers.values()]
        inputs = PEERInputs(model)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        try:
            model.eval()
            for batch in torch.arange(len(x)).split(strategy.eval_mb_size):
                owners = labels[batch].to(device)
                for layer in layers.values():
                    layer.eval_owners, layer.track_routing = owners, False
                with inputs.recording():
                    avalanche_forward(model, x[batch].to(device), task[batch].to(device))
                for name, layer in layers.items():
                    q = layer.query(inputs.inputs[layer][0])
                    out[name].append(q.reshape(-1, layer.heads, layer.dim_key))
        finally:
            inputs.remove()
            for m, mode in modes.items():
                m.train(mode)
            for layer, eval_owners, track in saved:
                layer.eval_owners, layer.track_routing = eval_owners, track
        return {name: torch.cat(qs) for name, qs in out.items()}

    def _store(self, owner: int, current: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Experience-balanced buffer: every experience seen keeps mem_size // count inputs."""
        self.buffer[owner] = current
        quota = max(1, self.mem_size // len(self.buffer))
        for o, (x, t) in self.buffer.items():
            if len(x) > quota:
                keep = torch.randperm(len(x))[:quota] if o == owner else torch.arange(quota)
                self.buffer[o] = (x[keep], t[keep])
