"""Owner inference alone, used as a classifier: the input-statistics baseline.

``peer_protect(inference="input")`` routes each input to the owner whose per-(owner,
class) Gaussians of the raw inputs (:class:`~peer_ll.protect.input_stats.InputOwnerStats`,
probabilistic PCA) explain it best. Those Gaussians are a generative classifier by
themselves: p(class | x) ∝ Σ_owners n(owner, class) · N(x; μ, C)(owner, class).
:class:`InputStatsClassifier` is exactly that, with no network, so a table can show what
the PEER pool adds beyond its owner inference. :func:`input_stats_classifier` wraps it
as an Avalanche strategy that runs in the same loop as the others; it makes one pass
per experience and does no backpropagation.

With task labels (task-incremental streams) the owner is the task label and only its
Gaussians are scored, as a multi-head classifier reads the label.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from peer_ll.experts.checks import check_bool, check_int, check_owner
from peer_ll.experts.per_owner import MASKED_LOGIT
from peer_ll.protect.input_stats import InputOwnerStats

__all__ = ["InputStatsClassifier", "StatsClassifierStrategy", "input_stats_classifier"]


class InputStatsClassifier(nn.Module):
    """Per-(owner, class) PPCA Gaussians as a classifier: x (B, ...) -> scores (B, C).

    Args:
        num_classes: classes the labels take (per task with task labels).
        rank: principal directions per Gaussian (as :class:`InputOwnerStats`).
        min_var: variance floor (as :class:`InputOwnerStats`).

    The scores are log p(x, class) up to a constant shared by all classes: the
    log-sum over owners of ``log n(owner, class) + log N(x | owner, class)``;
    classes without a Gaussian score :data:`~peer_ll.experts.per_owner.MASKED_LOGIT`.
    """

    takes_owners = True

    def __init__(self, num_classes: int, *, rank: int = 20, min_var: float = 1e-4) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        # One InputOwnerStats "owner" per (owner, class) group, so the Gaussians are
        # those that per_class=True fits for the owner.
        self.stats = InputOwnerStats(rank, per_class=False, min_var=min_var)
        self.groups: dict[int, tuple[int, int, int]] = {}  # key -> (owner, class, count)

    @property
    def owners(self) -> list[int]:
        """Owners with Gaussians, ascending."""
        return sorted({o for o, _, _ in self.groups.values()})

    @torch.no_grad()
    def fit(self, owner: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set ``owner``'s Gaussians from its inputs x (N, ...) with labels y (N,).

        Replaces what ``owner`` had; nothing changes if an argument is bad.
        """
        owner = check_owner("owner", owner)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) < 1:
            raise ValueError(f"x must be a tensor (N, ...) with N >= 1, got {type(x).__name__}")
        if not isinstance(y, torch.Tensor) or y.shape != (len(x),):
            got = getattr(y, "shape", type(y).__name__)
            raise ValueError(f"y must be a tensor of shape ({len(x)},), got {got}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(
                f"y must be in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )
        dim = x[0].numel()
        if self.stats.dim is not None and dim != self.stats.dim:
            raise ValueError(f"x must have {self.stats.dim} values per sample, got {dim}")
        old = [k for k, (o, _, _) in self.groups.items() if o == owner]
        for k in old:
            del self.groups[k], self.stats.groups[k]
        key = max(self.groups, default=-1) + 1
        for c in y.unique().tolist():
            part = x[y == c]
            self.stats.fit(None, key, part)
            self.groups[key] = (owner, int(c), len(part))
            key += 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor, owners: int | torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, C) of x (B, ...); ``owners`` (int or (B,) ints) restricts the groups."""
        out = x.new_full((len(x), self.num_classes), MASKED_LOGIT, dtype=torch.float32)
        if not self.groups:
            return out.zero_()
        keys, ll = self.stats.log_likelihood(x)  # (B, K) float64
        meta = torch.tensor([self.groups[k] for k in keys], device=x.device)  # (K, 3)
        ll = ll.to(x.device) + meta[:, 2].double().log()
        if owners is not None:
            owners = torch.as_tensor(owners, device=x.device).expand(len(x))
            ll = ll.masked_fill(owners[:, None] != meta[None, :, 0], float("-inf"))
        scores = torch.full((len(x), self.num_classes), float("-inf"), dtype=torch.float64,
                            device=x.device)  # fmt: skip
        for c in meta[:, 1].unique().tolist():
            scores[:, c] = torch.logsumexp(ll[:, meta[:, 1] == c], dim=1)
        best = scores.max(dim=1, keepdim=True).values.clamp_min(-1e300)
        scores = (scores - best).clamp_min(MASKED_LOGIT)  # the best class scores 0
        return out.copy_(scores.float())


class StatsClassifierStrategy(SupervisedTemplate):
    """Fits an :class:`InputStatsClassifier` once per experience; no optimizer.

    The owner of an experience is its id, or with ``task_labels`` its task label, which
    also restricts every forward to that owner's Gaussians.
    """

    def __init__(self, *, model: InputStatsClassifier, task_labels: bool = False, **kwargs):
        if not isinstance(model, InputStatsClassifier):
            raise TypeError(f"model must be an InputStatsClassifier, got {type(model).__name__}")
        self.task_labels = check_bool("task_labels", task_labels)
        super().__init__(model=model, optimizer=None, **kwargs)  # type: ignore[arg-type]

    def make_optimizer(self, **kwargs):
        """No optimizer: the Gaussians are fitted in closed form."""

    def forward(self):
        return self.model(self.mb_x, owners=self.mb_task_id if self.task_labels else None)

    def training_epoch(self, **kwargs):
        """One pass: the plugin callbacks of Avalanche's loop, then one closed-form fit."""
        xs, ys = [], []
        for mbatch in self.dataloader:
            self.mbatch = mbatch
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_update(**kwargs)
            xs.append(self.mb_x.detach())
            ys.append(self.mb_y.detach())
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)
        exp = self.experience
        owner = int(exp.task_label) if self.task_labels else int(exp.current_experience)
        self.model.fit(owner, torch.cat(xs), torch.cat(ys))


def input_stats_classifier(
    in_features: int,
    n_classes: int,
    *,
    task_labels: bool = False,
    rank: int = 20,
    min_var: float = 1e-4,
    train_mb_size: int = 256,
    eval_mb_size: int = 256,
    device: str | torch.device = "cpu",
    plugins: Iterable[object] = (),
    **template_kwargs,
) -> StatsClassifierStrategy:
    """The input-statistics classifier (owner inference alone) as a baseline strategy.

    Args:
        in_features: values of one flattened input (used to check the data).
        n_classes: classes the labels take (per task with ``task_labels``).
        task_labels: owners are task labels and restrict every forward (task-incremental
            streams); False: owners are experience ids, every Gaussian competes.
        rank: principal directions per Gaussian, as ``peer_protect(inference="input")``.
        min_var: variance floor, as there.
        train_mb_size, eval_mb_size: inputs per forward pass.
        device: where the statistics are scored.
        plugins: extra Avalanche plugins (a new list is built).
        **template_kwargs: passed to ``SupervisedTemplate`` (``evaluator``, ``eval_every``).

    Returns:
        The strategy; ``strategy.model`` is the :class:`InputStatsClassifier`.
    """
    check_int("in_features", in_features, minimum=1)
    if "train_epochs" in template_kwargs:
        raise ValueError(
            f"train_epochs must not be given: the Gaussians are fitted in one pass, got "
            f"train_epochs={template_kwargs['train_epochs']}"
        )
    model = InputStatsClassifier(n_classes, rank=rank, min_var=min_var)
    return StatsClassifierStrategy(
        model=model, task_labels=task_labels, criterion=nn.CrossEntropyLoss(), train_epochs=1,
        train_mb_size=train_mb_size, eval_mb_size=eval_mb_size, device=device,
        plugins=list(plugins), **template_kwargs,
    )  # fmt: skip
