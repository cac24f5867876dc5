"""Optimizers for PEER models: lazy (row-sparse) Adam for expert tables, AdamW elsewhere.

A PEER layer gives its expert tables row-sparse gradients and tags each table with a
``peer_frozen_rows`` mask. :class:`SparseAdamW` updates only the rows a step retrieved
and never touches frozen rows: no gradient, no moment update, no weight decay.

A stock optimizer does not know about frozen rows: ``torch.optim.AdamW`` keeps
decaying them and keeps applying their old momentum, so frozen experts drift. Stock
Adam/AdamW also reject sparse gradients; build the layer with ``sparse_grad=False``
to use them (each step then costs O(N)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.expert_state_dtype = expert_state_dtype

    def __getstate__(self):  # torch's keeps defaults, state and groups only
        return {**super().__getstate__(), "expert_state_dtype": self.expert_state_dtype}

    def __setstate__(self, state):
        super().__setstate__({"expert_state_dtype": None, **state})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                frozen = getattr(p, "peer_frozen_rows", None)
                if p.grad.is_sparse:
                    self._sparse_update(p, _coalesced(p.grad), state, group, frozen)
                else:
                    self._dense_update(p, p.grad, state, group, frozen)
        return loss

    @staticmethod
    def _rows_update(param, rows, grad, state, group) -> None:
        """AdamW update of ``param[rows]`` (or of every row when ``rows`` is None).

        Rows are gathered with ``index_select``, updated by torch's fused AdamW kernel
        where it exists, and written back with ``index_copy_``.
        """
        every = rows is None
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        p = param if every else param.index_select(0, rows)
        m = m_all if every else m_all.index_select(0, rows)
        v = v_all if every else v_all.index_select(0, rows)
        if m.dtype != p.dtype:  # lower-precision moments: update in the parameter's dtype
            m, v = m.to(p.dtype), v.to(p.dtype)
        _adamw(p, grad.to(p.dtype), m, v, state["step"], group)
        if every:
            if m is not m_all:
                m_all.copy_(m)
                v_all.copy_(v)
            return
        param.index_copy_(0, rows, p)
        m_all.index_copy_(0, rows, m.to(m_all.dtype))
        v_all.index_copy_(0, rows, v.to(v_all.dtype))

    def _sparse_update(self, p, grad, state, group, frozen) -> None:
        rows, values = grad.indices()[0], grad.values()
        if frozen is not None and bool(frozen.any()):
            keep = ~frozen[rows]
            rows, values = rows[keep], values[keep]
        # Chunks bound the temporary gathered rows (3 tensors of chunk × width).
        for start in range(0, rows.numel(), _ROW_CHUNK):
            chunk = slice(start, start + _ROW_CHUNK)
            self._rows_update(p, rows[chunk], values[chunk], state, group)

    def _dense_update(self, p, grad, state, group, frozen) -> None:
        if frozen is None or not bool(frozen.any()):
            self._rows_update(p, None, grad, state, group)
            return
        rows = (~frozen[: p.shape[0]]).nonzero().flatten()
        self._rows_update(p, rows, grad[rows], state, group)


_FUSED = hasattr(torch, "_fused_adamw_")
_ROW_CHUNK = 1 << 15


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


def _adamw(p, grad, m, v, step, group) -> None:
    """One in-place AdamW step on tensors of equal shape (step already incremented)."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    if _FUSED:
        torch._fused_adamw_(
            [p], [grad], [m], [v], [], [step], lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
        )
        return
    t = float(step)  # slow, correct fallback for torch builds without the fused kernel
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if wd:
        p.mul_(1 - lr * wd)
    denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def make_optimizer(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    expert_state_dtype: torch.dtype | None = None,
) -> SparseAdamW:
    """One optimizer for a whole model: lazy Adam for expert tables, AdamW for the rest.

    It is a plain ``torch.optim.Optimizer``, so Avalanche strategies accept it.
    Parameters with ``requires_grad=False`` are included (Avalanche may unfreeze them
    later); they are skipped while they have no gradient. ``expert_state_dtype``: see
    :class:`SparseAdamW`.
    """
    return SparseAdamW(
        model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        expert_state_dtype=expert_state_dtype,
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
    out = torch.zeros_like(new)
    rows = min(old.shape[0], new.shape[0])
    out[:rows] = value[:rows]
    return out

