"""Lazy AdamW on listed rows of a table, in place: the row update of ``SparseAdamW``.

For each listed row ``r`` (and only those), with ``t`` the global step:

    m[r] = β1·m[r] + (1-β1)·g[r]
    v[r] = β2·v[r] + (1-β2)·g[r]²
    p[r] = p[r]·(1 - lr·wd) - lr/(1-β1^t) · m[r] / (sqrt(v[r])/sqrt(1-β2^t) + ε)

Backends:

- ``"native"`` (CPU, fp32 tables; fp32 or bf16 moments): a small C kernel
  (:mod:`peer_ll.kernels._native`) that reads and writes each row once, in place;
- ``"triton"`` (CUDA): the same in one Triton kernel (:mod:`peer_ll.kernels._adamw_triton`);
- ``"torch"``: the fallback for every case; it gathers rows in cache-sized chunks,
  runs torch's fused AdamW on them and writes them back.

``"auto"`` picks Triton on CUDA, the C kernel on CPU where it builds and the dtypes
fit, and torch otherwise.
"""

from __future__ import annotations

import math

import torch

from peer_ll.kernels.backend import resolve_backend

LAZY_ADAMW_BACKENDS = ("auto", "torch", "native", "triton")
_FUSED = hasattr(torch, "_fused_adamw_")
# Bytes of one gathered (chunk, C) copy in the torch path. Smaller chunks keep the copies
# in cache but multiply small ops; with 2 threads on a loaded machine 256 KiB chunks took
# 10x longer than 2 MiB ones (thread hand-offs per op), so 2 MiB it is.
_CHUNK_BYTES = 1 << 21


def lazy_adamw_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_by_row: bool = False,
    backend: str = "auto",
) -> None:
    """AdamW update of ``param[rows]`` and its moments, in place (see module docstring).

    Args:
        param: (N, C...) table, updated in place; a row is ``param[r]``.
        exp_avg: (N, C...) first moments, in ``param``'s dtype or lower (e.g. bf16).
        exp_avg_sq: (N, C...) second moments, same dtype as ``exp_avg``.
        grad: (R, C...) gradient of each listed row, or (N, C...) when ``grad_by_row``.
        rows: (R,) int64 distinct row ids.
        step: the global step t (already counted for this update), t >= 1.
        lr, beta1, beta2, eps, weight_decay: AdamW's hyperparameters.
        grad_by_row: ``grad`` is a whole-table gradient indexed by row id.
        backend: "auto", "torch", "native" or "triton".

    Raises:
        ValueError: unknown backend, or shapes that do not agree.
        RuntimeError: "native" asked for where the C kernel cannot run.
    """
    if backend not in LAZY_ADAMW_BACKENDS:
        raise ValueError(f"backend must be one of {LAZY_ADAMW_BACKENDS}, got {backend!r}")
    expect = tuple(param.shape) if grad_by_row else (rows.numel(), *param.shape[1:])
    if param.dim() < 2 or tuple(grad.shape) != expect or exp_avg.shape != param.shape:
        raise ValueError(
            f"param (N, C...), exp_avg (N, C...) and grad {'(N' if grad_by_row else '(R'}, "
            f"C...) must agree, got param {tuple(param.shape)}, exp_avg "
            f"{tuple(exp_avg.shape)}, grad {tuple(grad.shape)}, rows {tuple(rows.shape)}"
        )
    if rows.numel() == 0:
        return
    chosen = _choose(backend, param, exp_avg, exp_avg_sq, grad)
    if chosen in ("native", "triton"):  # both need contiguous tables: see _choose
        param, exp_avg, exp_avg_sq = (t.view(t.shape[0], -1) for t in (param, exp_avg, exp_avg_sq))
        grad = grad.reshape(grad.shape[0], -1)
    if chosen == "native":
        _native(
            param,
            exp_avg,
            exp_avg_sq,
            grad,
            rows,
            step,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            grad_by_row,
        )
        return
    if chosen == "triton":
        from peer_ll.kernels._adamw_triton import lazy_adamw_triton

        scalars = _scalars(step, lr, beta1, beta2, eps, weight_decay)
        lazy_adamw_triton(param, exp_avg, exp_avg_sq, grad.contiguous(), rows, grad_by_row, scalars)
        return
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    step_t = torch.tensor(float(step), dtype=torch.float32)
    chunk = max(1, _CHUNK_BYTES // max(1, param[0].numel() * param.element_size()))
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        g = grad.index_select(0, part) if grad_by_row else grad[start : start + chunk]
        _rows_update(param, part, g, exp_avg, exp_avg_sq, step_t, group)


def native_available() -> bool:
    """True when the C kernel of the "native" backend builds and loads here."""
    from peer_ll.kernels import _native

    return _native.load() is not None


def _choose(backend, param, exp_avg, exp_avg_sq, grad) -> str:
    contiguous = all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq))
    if backend == "torch" or (backend == "auto" and not contiguous):
        return "torch"
    if backend == "triton":
        if not contiguous:
            raise RuntimeError("backend='triton' needs contiguous tables and moments")
        return resolve_backend(backend, param, grad)
    fits = (
        param.device.type == "cpu"
        and param.dtype == grad.dtype == torch.float32
        and exp_avg.dtype == exp_avg_sq.dtype
        and exp_avg.dtype in (torch.float32, torch.bfloat16)
        and contiguous
    )
    if backend == "native":
        if not fits or not native_available():
            raise RuntimeError(
                "backend='native' needs contiguous fp32 CPU tables with fp32 or bf16 moments "
                f"and a C compiler; got param {param.dtype} on {param.device}, moments "
                f"{exp_avg.dtype}, native kernel available: {native_available()}"
            )
        return "native"
    if param.is_cuda:
        return resolve_backend("auto", param, grad)
    return "native" if fits and native_available() else "torch"


def _native(param, m, v, grad, rows, step, lr, beta1, beta2, eps, wd, grad_by_row) -> None:
    from peer_ll.kernels import _native

    grad = grad.contiguous()
    rows = rows.to(torch.int64).contiguous()
    _native.load().peer_lazy_adamw(
        param.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        grad.data_ptr(),
        rows.data_ptr(),
        rows.numel(),
        param.shape[1],
        int(grad_by_row),
        int(m.dtype == torch.bfloat16),
        torch.get_num_threads(),
        lr,
        beta1,
        beta2,
        eps,
        wd,
        float(step),
    )


def _scalars(step, lr, beta1, beta2, eps, wd) -> tuple[float, ...]:
    """(decay, β1, 1-β1, β2, 1-β2, step size, sqrt(bias correction 2), ε) in double."""
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    return (1.0 - lr * wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1, math.sqrt(bc2), eps)


def _rows_update(param, rows, grad, m_all, v_all, step, group) -> None:
    """Gather ``rows``, run torch's fused AdamW on the copies, write them back."""
    p = param.index_select(0, rows)
    m = m_all.index_select(0, rows)
    v = v_all.index_select(0, rows)
    if m.dtype != p.dtype:  # lower-precision moments: update in the parameter's dtype
        m, v = m.to(p.dtype), v.to(p.dtype)
    adamw_(p, grad.to(p.dtype), m, v, step, group)
    param.index_copy_(0, rows, p)
    m_all.index_copy_(0, rows, m.to(m_all.dtype))
    v_all.index_copy_(0, rows, v.to(v_all.dtype))


def adamw_(p, grad, m, v, step, group) -> None:
    """One in-place AdamW step on tensors of equal shape (``step`` already counted)."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    if _FUSED:
        torch._fused_adamw_(
            [p],
            [grad],
            [m],
            [v],
            [],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=wd,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    t = float(step)  # slow, correct fallback for torch builds without the fused kernel
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if wd:
        p.mul_(1 - lr * wd)
    denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
