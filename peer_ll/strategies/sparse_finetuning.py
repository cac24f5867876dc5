"""Sparse expert finetuning: each step updates only the top-t expert rows by TF-IDF.

After Lin et al., *Continual Learning via Sparse Memory Finetuning* (arXiv
2510.15103, 2025), with PEER experts as the memory slots. For one step and one layer:

- TF of expert i: how many (token, head) retrievals in the current batch picked i;
- IDF of expert i: ``ln((1 + n) / (1 + df_i)) + 1``, where n is the number of training
  steps on earlier experiences and df_i the number of them that retrieved i (the
  smoothed IDF of scikit-learn; on the first experience it is 1 for every row, so the
  ranking is by TF alone);
- only the t rows with the highest TF·IDF, among the retrieved and unfrozen ones, keep
  their gradient in ``down`` and ``up``, and only their sub-key rows keep theirs in
  ``sub_keys``.

While the optimizer steps, the other rows are also marked frozen for
``peer_ll.optim.make_optimizer``, so momentum does not move them either. (A stock
optimizer with momentum still moves rows whose gradient is zero but whose moments are
not, when gradients are dense.)
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_bool, check_int
from peer_ll.strategies.capture import PEERInputs, recompute_ids


class SparseExpertFinetuning(SupervisedPlugin):
    """Updates only the top-t expert rows per step and layer, ranked by TF-IDF.

    Args:
        top_t: rows per layer that may change in one step.
        train_others: let the rest of the model (encoder, head, query network)
            train as usual; if False, only the selected expert rows change.

    Attributes:
        last_selected: ``{layer: (t',) int64 rows}`` chosen in the latest step.
    """

    def __init__(self, top_t: int, *, train_others: bool = True) -> None:
        super().__init__()
        self.top_t = check_int("top_t", top_t, minimum=1)
        self.train_others = check_bool("train_others", train_others)
        self._inputs: PEERInputs | None = None
        self._doc_freq: dict[PEER, torch.Tensor] = {}  # steps of earlier experiences
        self._docs = 0
        self._exp_freq: dict[PEER, torch.Tensor] = {}  # steps of this experience
        self._exp_docs = 0
        self._masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.last_selected: dict[PEER, torch.Tensor] = {}

    # ----------------------------------------------------------------- hooks
    def before_training_exp(self, strategy, **kwargs) -> None:
        self._inputs = PEERInputs(strategy.model)
        self._exp_freq, self._exp_docs = {}, 0

    def before_forward(self, strategy, **kwargs) -> None:
        self._inputs.inputs, self._inputs.active = {}, True

    def after_forward(self, strategy, **kwargs) -> None:
        self._inputs.active = False

    def before_update(self, strategy, **kwargs) -> None:
        self.last_selected = {}
        table_params = set()
        if self._inputs.inputs:
            self._exp_docs += 1
        for layer, (x, owners) in self._inputs.inputs.items():
            counts = self._count(layer, x, owners)
            rows = self._select(layer, counts)
            self.last_selected[layer] = rows
            self._restrict(layer, rows)
            table_params.update(map(id, (layer.down, layer.up, layer.sub_keys)))
        if not self.train_others:
            for p in strategy.model.parameters():
                if id(p) not in table_params:
                    p.grad = None

    def after_update(self, strategy, **kwargs) -> None:
        for param, mask in self._masks:
            param.peer_frozen_rows = mask
        self._masks = []

    def after_training_exp(self, strategy, **kwargs) -> None:
        for layer, freq in self._exp_freq.items():
            self._doc_freq[layer] = (
                _padded(self._doc_freq.get(layer), len(freq), freq.device) + freq
            )
        self._docs += self._exp_docs
        self._exp_freq, self._exp_docs = {}, 0
        if self._inputs is not None:
            self._inputs.remove()
            self._inputs = None

    # -------------------------------------------------------------- ranking
    def idf(self, layer: PEER) -> torch.Tensor:
        """(capacity,) smoothed IDF of every row of ``layer`` from earlier experiences."""
        df = _padded(self._doc_freq.get(layer), layer.capacity, layer.down.device)
        return torch.log((1.0 + self._docs) / (1.0 + df)) + 1.0

    def _count(self, layer: PEER, x: torch.Tensor, owners) -> torch.Tensor:
        ids = recompute_ids(layer, x.detach(), owners)
        ids = ids[ids >= 0]
        counts = torch.bincount(ids, minlength=layer.capacity).float()  # (capacity,)
        freq = _padded(self._exp_freq.get(layer), layer.capacity, counts.device)
        self._exp_freq[layer] = freq + (counts > 0).float()
        return counts

    def _select(self, layer: PEER, counts: torch.Tensor) -> torch.Tensor:
        score = counts * self.idf(layer)
        eligible = (counts > 0) & ~layer.expert_frozen
        score = torch.where(eligible, score, torch.full_like(score, -1.0))
        t = min(self.top_t, int(eligible.sum()))
        return score.topk(t).indices.sort().values if t else counts.new_zeros(0).long()

    def _restrict(self, layer: PEER, rows: torch.Tensor) -> None:
        keep = torch.zeros_like(layer.expert_frozen)
        keep[rows] = True
        left, right = layer.pool.key_rows(rows)
        keep_keys = torch.zeros_like(layer.key_frozen)
        keep_keys[left] = True
        keep_keys[right] = True
        for param, rows_kept in ((layer.down, keep), (layer.up, keep), (layer.sub_keys, keep_keys)):
            if param.grad is not None:
                param.grad = _masked_grad(param.grad, rows_kept)
            frozen = getattr(param, "peer_frozen_rows", None)
            if frozen is not None:
                self._masks.append((param, frozen))
                param.peer_frozen_rows = frozen | ~rows_kept


def _masked_grad(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``grad`` with only the rows where ``keep`` (rows,) is True (sparse stays sparse)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        sel = keep[grad.indices()[0]]
        return torch.sparse_coo_tensor(
            grad.indices()[:, sel], grad.values()[sel], grad.shape
        ).coalesce()
    return grad * keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)


def _padded(t: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
    """``t`` zero-padded to ``size`` rows (a zero vector if ``t`` is None)."""
    if t is None:
        return torch.zeros(size, device=device)
    if len(t) >= size:
        return t
    return torch.cat([t, t.new_zeros(size - len(t))])
