"""Optimizers for PEER models: lazy (row-sparse) Adam for expert tables, AdamW elsewhere.

A PEER layer gives its expert tables row-sparse gradients and tags each table with a
``peer_frozen_rows`` mask. :class:`SparseAdamW` updates only the rows a step retrieved
and never touches frozen rows: no gradient, no moment update, no weight decay.

A stock optimizer does not know about frozen rows: ``torch.optim.AdamW`` keeps
decaying them and keeps applying their old momentum, so frozen experts drift. Stock
Adam/AdamW also reject sparse gradients; set ``layer.sparse_grad = False``
to use them (each step then costs O(N)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts.checks import check_float
from peer_ll.kernels.lazy_adamw import LAZY_ADAMW_BACKENDS, adamw_, lazy_adamw_
from peer_ll.kernels.memory import huge_zeros_like


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that is lazy for row-sparse gradients and respects frozen rows.

    Dense gradients get ordinary AdamW (decoupled weight decay), restricted to
    unfrozen rows if the parameter carries a ``peer_frozen_rows`` mask. Sparse COO
    gradients get lazy Adam: only the rows present in the gradient have their
    moments, weight decay and value updated, with bias correction by the global step
    (as ``torch.optim.SparseAdam``).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        weight_decay: decoupled weight decay (AdamW), applied to touched rows only.
        expert_state_dtype: dtype of Adam's moments for PEER expert tables (parameters
            tagged with ``peer_frozen_rows``); default: the parameter's dtype.
            ``torch.bfloat16`` halves the optimizer memory of a large pool, at the
            cost of rounding the moments (a departure from plain Adam).
        backend: how rows are updated (:func:`peer_ll.kernels.lazy_adamw.lazy_adamw_`):
            "auto" (Triton on CUDA, the in-place C kernel on CPU where it builds, torch
            otherwise), "torch", "native" or "triton".
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        expert_state_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in LAZY_ADAMW_BACKENDS:
            raise ValueError(f"backend must be one of {LAZY_ADAMW_BACKENDS}, got {backend!r}")
        check_float("lr", lr, minimum=0.0)
        check_float("eps", eps, minimum=0.0)
        check_float("weight_decay", weight_decay, minimum=0.0)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for b in betas:
            check_float("betas", b, minimum=0.0)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        dtype = expert_state_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"expert_state_dtype must be a floating torch.dtype or None, "
                f"got {expert_state_dtype!r}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.expert_state_dtype = expert_state_dtype
        self.backend = backend

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; keep our
        # settings too (Avalanche's checkpoints pickle the optimizer).
        return {
            **super().__getstate__(),
            "expert_state_dtype": self.expert_state_dtype,
            "backend": self.backend,
        }

    def __setstate__(self, state: dict) -> None:
        state = {"expert_state_dtype": None, "backend": "auto", **state}
        super().__setstate__(state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # checked first: a failed step changes nothing
            for p in group["params"]:
                _check_current(p)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    dtype = p.dtype
                    if self.expert_state_dtype is not None and hasattr(p, "peer_frozen_rows"):
                        dtype = self.expert_state_dtype
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = huge_zeros_like(p, dtype=dtype)  # rows far apart
                    state["exp_avg_sq"] = huge_zeros_like(p, dtype=dtype)
                state["step"] += 1
                frozen = getattr(p, "peer_frozen_rows", None)
                if p.grad.is_sparse:
                    self._sparse_update(p, _coalesced(p.grad), state, group, frozen)
                else:
                    self._dense_update(p, p.grad, state, group, frozen)
        return loss

    def _update(self, p, rows, grad, state, group, *, grad_by_row: bool = False) -> None:
        beta1, beta2 = group["betas"]
        lazy_adamw_(
            p,
            state["exp_avg"],
            state["exp_avg_sq"],
            grad,
            rows,
            step=float(state["step"]),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            grad_by_row=grad_by_row,
            backend=self.backend,
        )

    def _sparse_update(self, p, grad, state, group, frozen) -> None:
        rows, values = grad._indices()[0], grad._values()
        if frozen is not None and bool(frozen.any()):
            keep = ~frozen[rows]
            rows, values = rows[keep], values[keep]
        self._update(p, rows, values, state, group)

    def _dense_update(self, p, grad, state, group, frozen) -> None:
        if frozen is None or not bool(frozen.any()):  # every row: torch's fused AdamW
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if m.dtype == p.dtype:
                adamw_(p, grad, m, v, state["step"], group)
                return
            m32, v32 = m.to(p.dtype), v.to(p.dtype)
            adamw_(p, grad.to(p.dtype), m32, v32, state["step"], group)
            m.copy_(m32)
            v.copy_(v32)
            return
        rows = (~frozen[: p.shape[0]]).nonzero().flatten()
        self._update(p, rows, grad, state, group, grad_by_row=True)


def _check_current(p: torch.Tensor) -> None:
    """Raise if ``p`` is a PEER table that its layer replaced when it grew past capacity.

    The layer then trains the new table, which this optimizer does not hold: it would
    silently stop updating the experts.
    """
    if getattr(p, "peer_replaced", False):
        raise ValueError(
            f"optimizer must hold the PEER layer's current tables, got a {tuple(p.shape)} "
            "table that the layer replaced when it grew past capacity: call "
            "peer_ll.optim.migrate_state(optimizer, layer) after growing (or reserve "
            "capacity beforehand)"
        )


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """``grad.coalesce()`` without the sort when its row indices already increase strictly.

    PEER's kernels return coalesced gradients, but autograd's accumulation drops the flag.
    """
    if grad.is_coalesced():
        return grad
    rows = grad._indices()
    if rows.shape[0] == 1 and bool((rows[0, 1:] > rows[0, :-1]).all()):
        return torch.sparse_coo_tensor(
            rows, grad._values(), grad.shape, is_coalesced=True, check_invariants=False
        )
    return grad.coalesce()


def make_optimizer(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    expert_state_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> SparseAdamW:
    """One optimizer for a whole model: lazy Adam for expert tables, AdamW for the rest.

    It is a plain ``torch.optim.Optimizer``, so Avalanche strategies accept it.
    Parameters with ``requires_grad=False`` are included (Avalanche may unfreeze them
    later); they are skipped while they have no gradient. ``expert_state_dtype`` and
    ``backend``: see :class:`SparseAdamW`.
    """
    return SparseAdamW(
        model.parameters(),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        expert_state_dtype=expert_state_dtype,
        backend=backend,
    )


def migrate_state(optimizer: torch.optim.Optimizer, layer: nn.Module) -> int:
    """Carry optimizer state over after ``layer`` reallocated its tables past capacity.

    Old rows keep their moments (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
    ``momentum_buffer``), new rows start at zero; scalar state such as ``step`` is
    kept. The replaced Parameters are swapped for the new ones in the optimizer's
    parameter groups. Clears ``layer.replaced_parameters``.

    Returns:
        The number of parameters migrated.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    replaced = getattr(layer, "replaced_parameters", None)
    if replaced is None:
        raise TypeError(f"layer must be a PEER layer, got {type(layer).__name__}")
    moved = 0
    for old, new in replaced.values():
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    moved += 1
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {name: _resized(t, old, new) for name, t in state.items()}
    layer.replaced_parameters = {}
    return moved


def _resized(value, old: torch.Tensor, new: torch.Tensor):
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value
    out = huge_zeros_like(new, dtype=value.dtype)  # keeps the state's dtype (e.g. bf16)
    rows = min(old.shape[0], new.shape[0])
    out[:rows] = value[:rows]
    return out
